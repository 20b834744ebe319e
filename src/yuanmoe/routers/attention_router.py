"""The Attention Router of Yuan 2.0-M32.

Per token x it forms a query, key and value vector over the N experts and lets the experts
attend to each other:  P = softmax(q k^T) v  with q k^T the N x N outer product, so each
expert's score mixes in the scores of the experts it correlates with. All of it in fp32.
`temperature` divides q k^T before that softmax; the official router has none (temperature 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router


class AttentionRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True, *,
                 temperature: float = 1.0, **balancing):
        super().__init__(hidden_size, num_experts, top_k, norm_topk_prob, **balancing)
        self.temperature = temperature
        self.query = nn.Linear(hidden_size, num_experts, bias=False)
        self.key = nn.Linear(hidden_size, num_experts, bias=False)
        self.value = nn.Linear(hidden_size, num_experts, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        q = F.linear(x, self.query.weight.float())  # [T, N]
        k = F.linear(x, self.key.weight.float())
        v = F.linear(x, self.value.weight.float())
        if self.temperature != 1.0:
            q = q / self.temperature
        attn = torch.softmax(q.unsqueeze(-1) * k.unsqueeze(-2), dim=-1)  # [T, N, N]
        return torch.einsum("tij,tj->ti", attn, v)
