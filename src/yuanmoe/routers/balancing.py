"""Load balancing for routers: the Switch auxiliary loss, the router z-loss, and the
auxiliary-loss-free per-expert bias of DeepSeek-V3 (its update step lives on `Router` in base.py)."""

from __future__ import annotations

import torch


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many entries of `expert_index` name each expert. `torch.bincount` with a shape
    that does not depend on the values, so that a compiled decode step stays one graph."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)
    return counts.index_add_(0, expert_index, torch.ones_like(expert_index))


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss  E * sum_e f_e * P_e.

    probs [T, E] routing distribution; expert_index [A] the expert of every routed copy of a token.
    f_e is the share of routed copies that went to expert e (not differentiable), P_e the mean
    probability of e. It is 1 when both are uniform and grows as load concentrates on few experts.
    """
    num_experts = probs.shape[-1]
    share = expert_counts(expert_index, num_experts).to(probs.dtype) / max(expert_index.numel(), 1)
    return num_experts * torch.sum(share * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()
