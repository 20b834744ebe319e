"""Noisy top-k gating (Shazeer 2017): a linear gate plus learned, per-expert Gaussian noise.

In training the logits are  x Wg + eps * softplus(x Wn) * router_noise_std,  eps ~ N(0, 1),
so experts near the top-k boundary get explored; in eval the noise is off and routing is
deterministic (the plain linear gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router


class NoisyTopKRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True, *,
                 noise_std: float = 1.0, **balancing):
        super().__init__(hidden_size, num_experts, top_k, norm_topk_prob, **balancing)
        self.noise_std = noise_std
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.noise = nn.Linear(hidden_size, num_experts, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        clean = F.linear(x, self.gate.weight.float())
        if not self.training or self.noise_std == 0:
            return clean
        scale = F.softplus(F.linear(x, self.noise.weight.float())) * self.noise_std
        return clean + torch.randn_like(clean) * scale
