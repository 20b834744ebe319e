"""The official optimizer recipe: AdamW (0.9, 0.95) with weight decay on matrices only, and a
linear warmup followed by cosine decay to a floor (10% of the peak in the official run)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    router_lr_scale: float = 1.0, router_weight_decay: bool = True) -> torch.optim.AdamW:
    """Weight decay pulls weights toward zero; norms (scales around one) and biases are vectors and
    are left alone, as in Megatron.

    With a router learning-rate multiplier or without router weight decay (ablations), the MoE
    routers' weights form a third group whose "lr_scale" the schedule multiplies its rate by;
    otherwise they are ordinary matrices (and the groups those of earlier checkpoints).
    AdamW runs its fused kernel where every parameter is a plain CPU or CUDA tensor: on CPU the
    per-tensor loop costs more than the matmuls of a step once the experts hold most parameters."""
    split_router = router_lr_scale != 1.0 or not router_weight_decay
    decay, no_decay, router = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if split_router and ".router." in name:
                router.append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if split_router:
        groups.append({"params": router, "weight_decay": weight_decay if router_weight_decay else 0.0,
                       "lr_scale": router_lr_scale})
    params = decay + no_decay + router
    fused = bool(params) and all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def learning_rate(step: int, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """The rate for optimizer step `step` (0-based): linear warmup to `peak`, then cosine down to
    `min_ratio * peak` at `decay_steps`, flat after. A pure function of the step, so resuming needs
    no scheduler state beyond the step count."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
