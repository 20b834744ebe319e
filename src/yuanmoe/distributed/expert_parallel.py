"""Expert parallel: each rank of the `ep` group holds num_experts / ep experts; tokens travel.

`ExpertParallelExperts` is a drop-in for `GroupedExperts` with the same `forward(x, counts)`: the
MoE layer still routes and sorts its own tokens by expert; this module sends each expert's rows to
the rank that owns it with one all-to-all of variable split sizes, runs the local experts as one
grouped matmul, and sends the results back in the original order with a second all-to-all. No
capacity limit, no token dropped. The router and all other weights stay replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import GroupedExperts, MoE


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


class ExpertParallelExperts(GroupedExperts):
    """The experts [rank * E/ep, (rank + 1) * E/ep) of a `GroupedExperts`, fed by all-to-all.

    Parameters keep the names w1 / w2 with the local expert count as their first dim; the checkpoint
    code maps them back to the global [E, ...] tensors.
    """

    def __init__(self, experts: GroupedExperts, group: dist.ProcessGroup):
        ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
        if experts.num_experts % ep:
            raise ValueError(f"ep ({ep}) must divide the number of experts ({experts.num_experts})")
        local = experts.num_experts // ep
        _, two_f, d = experts.w1.shape
        # A model built on the meta device (distributed/sharded_start.py) gets meta slices, read later.
        with torch.device("meta" if experts.w1.is_meta else experts.w1.device):
            super().__init__(local, d, two_f // 2)
        self.ep_size, self.ep_rank, self.group = ep, ep_rank, group
        self.first_expert = ep_rank * local
        with torch.no_grad():
            self.w1.copy_(experts.w1[self.first_expert: self.first_expert + local])
            self.w2.copy_(experts.w2[self.first_expert: self.first_expert + local])
        self.bytes_sent = 0  # of token rows sent to other ranks (dispatch and combine, forward only)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, d] rows sorted by global expert; counts: [E] rows per global expert."""
        local = self.num_experts
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [ep * local]: rows from each source rank
        received = received.view(self.ep_size, local)
        send_splits = counts.view(self.ep_size, local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        rows = _AllToAll.apply(x, recv_splits, send_splits, self.group)

        # Arrived grouped by (source rank, local expert); the grouped matmul wants them by local expert.
        expert_of_row = torch.arange(local, device=x.device).repeat(self.ep_size).repeat_interleave(received.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        out = super().forward(rows.index_select(0, order), received.sum(0)).index_select(0, torch.argsort(order))

        row_bytes = x.shape[-1] * x.element_size()
        self.bytes_sent += (sum(send_splits) - send_splits[self.ep_rank]) * row_bytes
        self.bytes_sent += (sum(recv_splits) - recv_splits[self.ep_rank]) * row_bytes
        return _AllToAll.apply(out, send_splits, recv_splits, self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> list[ExpertParallelExperts]:
    """Swap the experts of every MoE layer of `model` for their expert-parallel slice, in place."""
    swapped = []
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(module.experts, group)
            swapped.append(module.experts)
    return swapped


def all_to_all_bytes(model: nn.Module, reset: bool = True) -> int:
    """Bytes of token rows this rank sent to other ranks in the forward all-to-alls since the last reset
    (the backward pass sends the same amount again as gradients)."""
    total = 0
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            total += module.bytes_sent
            if reset:
                module.bytes_sent = 0
    return total
