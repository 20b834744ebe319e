"""The interface every router implements: tokens in, chosen experts and their weights out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
    def tokens_per_expert(self) -> torch.Tensor:
        return torch.bincount(self.experts.flatten(), minlength=self.probs.shape[-1])


class Router(nn.Module):
    """Token-choice top-k router.

    Subclasses define `scores(x) -> [T, E]` (fp32 logits); this class turns them into a softmax
    distribution, takes the top-k experts and renormalises their weights when `norm_topk_prob`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.scores(x)
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(weights, experts, probs, logits, logits.new_zeros(()))
