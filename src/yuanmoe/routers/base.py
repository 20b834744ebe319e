"""The interface every router implements: tokens in, chosen experts and their weights out."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .balancing import expert_counts, load_balancing_loss, router_z_loss


@dataclass
class RouterOutput:
    weights: torch.Tensor  # [T, k] fp32 combine weights of the chosen experts
    experts: torch.Tensor  # [T, k] int64 expert ids, distinct within a row
    probs: torch.Tensor  # [T, E] fp32 routing distribution the choice was made from
    logits: torch.Tensor  # [T, E] fp32 scores before the softmax
    aux_loss: torch.Tensor  # scalar, already scaled by its coefficients; 0 when balancing is off

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat (token, expert, weight) triples, one per routed copy of a token: what dispatch consumes."""
        num_tokens, k = self.experts.shape
        token_index = torch.arange(num_tokens, device=self.experts.device).repeat_interleave(k)
        return token_index, self.experts.flatten(), self.weights.flatten()

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return expert_counts(self.assignments()[1], self.num_experts)


class Router(nn.Module):
    """Token-choice top-k router.

    Subclasses define `scores(x) -> [T, E]` (fp32 logits); this class turns them into a softmax
    distribution, takes the top-k experts and renormalises their weights when `norm_topk_prob`.
    The scores are computed in fp32 even inside a low-precision autocast region; `fp32=False`
    (an ablation) computes them in the region's dtype instead. Softmax and choice stay fp32.

    Balancing, each off at 0:
      aux_loss_coef     Switch load-balancing loss (Fedus 2021) added to `aux_loss`;
      z_loss_coef       router z-loss (ST-MoE) added to `aux_loss`;
      bias_update_rate  auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the
                        probabilities for the *choice* of experts only (the weights stay the plain
                        probabilities), nudged by `update_expert_bias()` after each optimizer step.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True, *,
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
                 fp32: bool = True):
        super().__init__()
        self.fp32 = fp32
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.bias_update_rate = bias_update_rate
        if bias_update_rate > 0:
            # The bias decides routing at inference too, so it is saved with the weights; the load
            # seen since the last update is bookkeeping and is not.
            self.register_buffer("expert_bias", torch.zeros(num_experts))
            self.register_buffer("observed_load", torch.zeros(num_experts), persistent=False)
        else:
            self.expert_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> RouterOutput:
        # Not fp32: the scores' matmuls run in the surrounding autocast region's dtype, if any.
        with torch.autocast(x.device.type, enabled=False) if self.fp32 else contextlib.nullcontext():
            logits = self.scores(x.float()).float()
        with torch.autocast(x.device.type, enabled=False):
            return self.route(logits, torch.softmax(logits, dim=-1))

    def route(self, logits: torch.Tensor, probs: torch.Tensor) -> RouterOutput:
        """Token choice: each token takes its top-k experts."""
        choice = probs if self.expert_bias is None else probs + self.expert_bias
        experts = torch.topk(choice, self.top_k, dim=-1).indices
        weights = probs.gather(-1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        output = RouterOutput(weights, experts, probs, logits, logits.new_zeros(()))
        output.aux_loss = self.balancing_loss(output)
        self.observe_load(output)
        return output

    def balancing_loss(self, output: RouterOutput) -> torch.Tensor:
        loss = output.logits.new_zeros(())
        if self.aux_loss_coef > 0:
            _, expert_index, _ = output.assignments()
            loss = loss + self.aux_loss_coef * load_balancing_loss(output.probs, expert_index)
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * router_z_loss(output.logits)
        return loss

    def observe_load(self, output: RouterOutput) -> None:
        if self.expert_bias is not None and self.training:
            self.observed_load += output.tokens_per_expert.to(self.observed_load.dtype)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """DeepSeek-V3's rule: raise the bias of experts that got less than the mean load since the
        last update, lower it for those that got more, by `bias_update_rate`; then start counting
        afresh. Outside autograd; a no-op when the bias is off or nothing was routed."""
        if self.expert_bias is None or self.observed_load.sum() == 0:
            return
        self.expert_bias += self.bias_update_rate * torch.sign(self.observed_load.mean() - self.observed_load)
        self.observed_load.zero_()


def update_expert_bias(model: nn.Module) -> None:
    """Apply the aux-loss-free bias update to every router in `model`; call once after each
    optimizer step (after all gradient-accumulation micro-batches)."""
    for module in model.modules():
        if isinstance(module, Router):
            module.update_expert_bias()
