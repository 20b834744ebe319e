"""Expert-choice routing (Zhou et al. 2022): each expert takes its top tokens, up to a capacity.

Capacity per expert C = ceil(T * top_k * capacity_factor / E), so on average a token is served by
top_k * capacity_factor experts; some tokens get several, some none (dropped: only the residual
carries them). The combine weight is the token's softmax probability for the expert, as in the
paper, not renormalised. Loads are equal by construction.

The choice ranks every token in the batch against the others, future tokens included, so it is
not causal. It is a training-time router: in eval mode (generation, held-out loss) it falls back
to causal token choice - each token takes its own top-k experts by the same gate, weighted by the
same unnormalised probabilities, so the scale of the layer output matches training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, RouterOutput


@dataclass
class ExpertChoiceOutput(RouterOutput):
    """`weights`/`experts` are [T, E]: every expert listed per token, weight 0 where it did not pick
    the token. The flat assignments are kept as chosen, so dispatch computes only those."""

    token_index: torch.Tensor  # [E * C]
    expert_index: torch.Tensor  # [E * C]
    assignment_weights: torch.Tensor  # [E * C]

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.token_index, self.expert_index, self.assignment_weights


class ExpertChoiceRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True, *,
                 capacity_factor: float = 1.0, **balancing):
        # Weights are the raw probabilities in both modes (see the module docstring).
        super().__init__(hidden_size, num_experts, top_k, False, **balancing)
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gate.weight.float())

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(num_tokens * self.top_k * self.capacity_factor / self.num_experts))

    def route(self, logits: torch.Tensor, probs: torch.Tensor) -> RouterOutput:
        if not self.training:
            return super().route(logits, probs)
        num_tokens = probs.shape[0]
        chosen_probs, chosen_tokens = torch.topk(probs.t(), self.capacity(num_tokens), dim=-1)  # [E, C]
        expert_index = torch.arange(self.num_experts, device=probs.device).repeat_interleave(chosen_tokens.shape[1])
        token_index = chosen_tokens.flatten()
        assignment_weights = chosen_probs.flatten()
        weights = probs.new_zeros(probs.shape).index_put((token_index, expert_index), assignment_weights)
        experts = torch.arange(self.num_experts, device=probs.device).expand(num_tokens, -1)
        output = ExpertChoiceOutput(weights, experts, probs, logits, logits.new_zeros(()),
                                    token_index, expert_index, assignment_weights)
        output.aux_loss = self.balancing_loss(output)
        return output
