"""Routers: each maps tokens to experts behind the one `Router` interface."""

from __future__ import annotations

from ..config import YuanConfig
from .attention_router import AttentionRouter
from .base import Router, RouterOutput
from .linear_router import LinearRouter

ROUTER_CLASSES: dict[str, type[Router]] = {
    "attention": AttentionRouter,
    "linear": LinearRouter,
}


def build_router(config: YuanConfig) -> Router:
    if config.router not in ROUTER_CLASSES:
        raise ValueError(f"router {config.router!r} is not available; choose one of {', '.join(ROUTER_CLASSES)}")
    return ROUTER_CLASSES[config.router](config.hidden_size, config.num_experts, config.top_k, config.norm_topk_prob)


__all__ = ["AttentionRouter", "LinearRouter", "Router", "RouterOutput", "ROUTER_CLASSES", "build_router"]
