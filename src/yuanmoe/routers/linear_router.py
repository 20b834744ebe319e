"""The classical router (Shazeer 2017, Switch, Mixtral): softmax over a linear gate, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router


class LinearRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True, **balancing):
        super().__init__(hidden_size, num_experts, top_k, norm_topk_prob, **balancing)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.gate.weight.float())
