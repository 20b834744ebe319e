"""The official optimizer recipe: AdamW (0.9, 0.95) with weight decay on matrices only, and a
linear warmup followed by cosine decay to a floor (10% of the peak in the official run)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """Weight decay pulls weights toward zero; norms (scales around one) and biases are vectors and
    are left alone, as in Megatron."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def learning_rate(step: int, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """The rate for optimizer step `step` (0-based): linear warmup to `peak`, then cosine down to
    `min_ratio * peak` at `decay_steps`, flat after. A pure function of the step, so resuming needs
    no scheduler state beyond the step count."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
