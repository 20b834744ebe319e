"""Routers: each maps tokens to experts behind the one `Router` interface."""

from __future__ import annotations

from ..config import ROUTERS, YuanConfig
from .attention_router import AttentionRouter
from .balancing import expert_counts, load_balancing_loss, router_z_loss
from .base import Router, RouterOutput, update_expert_bias
from .expert_choice import ExpertChoiceOutput, ExpertChoiceRouter
from .linear_router import LinearRouter
from .noisy_topk import NoisyTopKRouter
from .shared import shared_expert_config
from .stats import coselection_kl, coselection_matrix, layer_stats, routing_stats

# config.ROUTERS is the one list of router names (the config validates against it without importing
# this package); each name maps to its class here, in the same order.
ROUTER_CLASSES: dict[str, type[Router]] = {
    "attention": AttentionRouter,
    "linear": LinearRouter,
    "noisy_topk": NoisyTopKRouter,
    "expert_choice": ExpertChoiceRouter,
}
if tuple(ROUTER_CLASSES) != ROUTERS:
    raise ImportError(f"config.ROUTERS {ROUTERS} and the router classes {tuple(ROUTER_CLASSES)} name different "
                      f"routers; add the new router to both")


def build_router(config: YuanConfig) -> Router:
    if config.router not in ROUTER_CLASSES:
        raise ValueError(f"router {config.router!r} is not available; choose one of {', '.join(ROUTER_CLASSES)}")
    options = dict(aux_loss_coef=config.aux_loss_coef, z_loss_coef=config.z_loss_coef,
                   bias_update_rate=config.bias_update_rate, fp32=config.router_fp32)
    if config.router == "attention":
        options["temperature"] = config.router_temperature
    if config.router == "noisy_topk":
        options["noise_std"] = config.router_noise_std
    if config.router == "expert_choice":
        options["capacity_factor"] = config.capacity_factor
    return ROUTER_CLASSES[config.router](config.hidden_size, config.num_experts, config.top_k,
                                         config.norm_topk_prob, **options)


__all__ = ["AttentionRouter", "ExpertChoiceOutput", "ExpertChoiceRouter", "LinearRouter", "NoisyTopKRouter",
           "ROUTER_CLASSES", "Router", "RouterOutput", "build_router", "coselection_kl", "coselection_matrix",
           "expert_counts", "layer_stats", "load_balancing_loss", "router_z_loss", "routing_stats",
           "shared_expert_config", "update_expert_bias"]
