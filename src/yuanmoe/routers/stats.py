"""Routing statistics, per MoE layer, from the routers' outputs.

`routing_stats(model_output.router_outputs)` gives a flat dict of numbers a trainer can log:
for layer i, `layer{i}/...`, and the mean over layers, `mean/...`:
  tokens_per_expert  list of routed copies each expert received
  max_over_mean      busiest expert's load / mean load (1 = perfectly balanced)
  load_cv            coefficient of variation of the loads (std / mean; 0 = balanced)
  entropy            mean per-token entropy of the routing distribution, in nats
                     (log E = undecided, 0 = one expert takes all the mass)
  dropped_fraction   share of tokens no expert served (only expert choice drops)
`coselection_matrix(output)` counts, for every pair of experts, the tokens both serve, and
`coselection_kl(matrix)` says how far those pairs are from what the loads alone would give.
"""

from __future__ import annotations

import torch

from .base import RouterOutput

SCALARS = ("max_over_mean", "load_cv", "entropy", "dropped_fraction")


def selection_mask(output: RouterOutput) -> torch.Tensor:
    """[T, E] bool: expert e serves token t (with a non-zero weight)."""
    token_index, expert_index, _ = output.assignments()
    mask = torch.zeros(output.probs.shape, dtype=torch.bool, device=output.probs.device)
    mask[token_index, expert_index] = True
    return mask


def coselection_matrix(output: RouterOutput) -> torch.Tensor:
    """[E, E] int64: entry (i, j) is the number of tokens served by both expert i and expert j;
    the diagonal is each expert's own token count."""
    mask = selection_mask(output).to(torch.float64)
    return (mask.t() @ mask).round().to(torch.int64)


@torch.no_grad()
def layer_stats(output: RouterOutput) -> dict:
    load = output.tokens_per_expert.double()
    mean = load.mean()
    probs = output.probs.double()
    served = selection_mask(output).any(dim=-1)
    return {
        "tokens_per_expert": load.long().tolist(),
        "max_over_mean": float(load.max() / mean) if mean > 0 else 0.0,
        "load_cv": float(load.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "entropy": float(-(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()),
        "dropped_fraction": float(1.0 - served.double().mean()) if served.numel() else 0.0,
    }


def routing_stats(router_outputs: list[RouterOutput]) -> dict:
    stats: dict = {}
    per_layer = [layer_stats(output) for output in router_outputs]
    for i, layer in enumerate(per_layer):
        stats.update({f"layer{i}/{key}": value for key, value in layer.items()})
    if per_layer:
        stats.update({f"mean/{key}": sum(layer[key] for layer in per_layer) / len(per_layer) for key in SCALARS})
    return stats


def coselection_kl(matrix: torch.Tensor) -> float:
    """How structured the co-selection is, in nats: the KL divergence of the observed distribution
    of expert pairs (off-diagonal entries i < j of a co-selection matrix) from the pairs that
    independent choices with the same loads would give (each pair in proportion to load_i * load_j).
    0: experts pair up at random; larger: particular experts are chosen together. 0 when no token
    was served by two experts."""
    counts = matrix.double()
    upper = torch.triu(torch.ones_like(counts, dtype=torch.bool), diagonal=1)
    load = counts.diagonal()
    observed, independent = counts[upper], torch.outer(load, load)[upper]
    if observed.sum() == 0 or independent.sum() == 0:
        return 0.0
    p, q = observed / observed.sum(), independent / independent.sum()
    seen = p > 0
    return float((p[seen] * torch.log(p[seen] / q[seen])).sum())
