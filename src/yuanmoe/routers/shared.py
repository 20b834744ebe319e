"""DeepSeekMoE-style shared experts: split each expert into finer ones and make a few always on.

Not a router of its own: the routed part uses any router (the paper's variant, a linear gate),
and `MoE` adds the shared experts' output, unweighted, for every token.
"""

from __future__ import annotations

from ..config import ConfigError, YuanConfig


def shared_expert_config(config: YuanConfig, num_shared: int = 2, granularity: int = 2,
                         router: str = "linear") -> YuanConfig:
    """The shared-expert variant of `config` with the same total and active expert parameters.

    Every expert of width F becomes `granularity` experts of width F / granularity; `num_shared`
    of them are always on and the rest are routed, each token taking top_k * granularity -
    num_shared of them. From 8 experts, top-2, this is the paper's 2 shared + top-2 of 14.
    Only the router's own (tiny) weight count changes.
    """
    if config.ffn_hidden_size % granularity:
        raise ConfigError(f"granularity {granularity} must divide ffn_hidden_size ({config.ffn_hidden_size})")
    routed = config.num_experts * granularity - num_shared
    active = config.top_k * granularity - num_shared
    if num_shared < 1 or active < 1:
        raise ConfigError(f"{num_shared} shared experts leave no routed expert active; "
                          f"use fewer than top_k * granularity ({config.top_k * granularity})")
    return config.replace(num_experts=routed, top_k=active, ffn_hidden_size=config.ffn_hidden_size // granularity,
                          num_shared_experts=num_shared, router=router)
