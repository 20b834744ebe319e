"""Load balancing for routers: the Switch auxiliary loss, the router z-loss, and the
auxiliary-loss-free per-expert bias of DeepSeek-V3 (its update step lives on `Router`)."""

from __future__ import annotations

import torch
from torch import nn


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss  E * sum_e f_e * P_e.

    probs [T, E] routing distribution; expert_index [A] the expert of every routed copy of a token.
    f_e is the share of routed copies that went to expert e (not differentiable), P_e the mean
    probability of e. It is 1 when both are uniform and grows as load concentrates on few experts.
    """
    num_experts = probs.shape[-1]
    share = torch.bincount(expert_index, minlength=num_experts).to(probs.dtype) / max(expert_index.numel(), 1)
    return num_experts * torch.sum(share * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def update_expert_bias(model: nn.Module) -> None:
    """Apply the aux-loss-free bias update to every router in `model`; call once after each
    optimizer step (after all gradient-accumulation micro-batches)."""
    from .base import Router

    for module in model.modules():
        if isinstance(module, Router):
            module.update_expert_bias()
