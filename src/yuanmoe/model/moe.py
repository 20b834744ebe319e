"""The mixture-of-experts feed-forward layer: router -> dispatch -> grouped experts -> combine.

Experts hold stacked weights and run as one grouped matmul over the tokens sorted by expert, in
the forward and the backward pass alike: no Python loop over experts, no token dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import YuanConfig
from ..routers import RouterOutput, build_router, expert_counts


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        # The CUDA kernel takes bf16 on Hopper-class GPUs, with 16-byte aligned rows.
        return (x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
                and x.shape[-1] % 8 == 0)
    return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Multiply each group of rows of x by its expert's weight.

    x: [T, in] rows sorted by expert; w: [E, out, in]; counts: [E] rows per expert (sum = T).
    Returns [T, out] with rows of group e equal to x_e @ w[e].T.
    """
    if _grouped_mm_supported(x):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    return _padded_bmm(x, w, counts)


def _padded_bmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Fallback without the grouped kernel: scatter groups into a padded [E, C, in] batch, one bmm."""
    num_experts = w.shape[0]
    capacity = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    padded = x.new_zeros(num_experts, capacity, x.shape[-1])
    padded[expert_of_row, slot] = x
    out = torch.bmm(padded, w.transpose(-2, -1))
    return out[expert_of_row, slot]


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: w1 [E, 2F, d] (gate half then up half), w2 [E, d, F]."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.w1, self.w2
        if torch.is_autocast_enabled(x.device.type):
            # torch._grouped_mm is not on autocast's cast lists: cast as autocast does for matmuls.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        a, b = grouped_matmul(x, w1, counts).chunk(2, dim=-1)
        return grouped_matmul(F.silu(a) * b, w2, counts)


class FeedForward(nn.Module):
    """Dense SwiGLU FFN: w1 [2F, d] whose output halves are [a, b], h = silu(a) * b, then w2 [d, F]."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


def dispatch(expert_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort assignments by expert: returns the sorting permutation and the rows per expert [E]."""
    order = torch.argsort(expert_index, stable=True)
    counts = expert_counts(expert_index, num_experts)
    return order, counts


class MoE(nn.Module):
    def __init__(self, config: YuanConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router = build_router(config)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.ffn_hidden_size)
        self.shared_experts = (
            FeedForward(config.hidden_size, config.num_shared_experts * config.ffn_hidden_size)
            if config.num_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, d]
        routing = self.router(x)
        token_index, expert_index, weight = routing.assignments()
        order, counts = dispatch(expert_index, self.num_experts)
        token_index = token_index[order]
        # index_select, not x[token_index]: its backward is an index_add, where indexing's is an
        # accumulating index_put that runs serially on CPU (20x slower at 2 threads).
        expert_out = self.experts(x.index_select(0, token_index), counts) * weight[order].to(x.dtype).unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_index, expert_out)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape), routing
