"""Yuan 2.0-M32 for upstream vLLM: an out-of-tree model plugin.

Installed with `pip install -e '.[vllm]'` (vLLM in its own environment), the `vllm.general_plugins`
entry point calls `register()` in every vLLM process, so that

    vllm serve path/to/Yuan2-M32-hf --tokenizer path/to/Yuan2-M32-hf
    vllm.LLM("path/to/Yuan2-M32-hf")

run official `YuanForCausalLM` folders with vLLM's own layers: paged `Attention`, `FusedMoE` with
the Attention Router as its routing scores, and the LFA filter state kept per request in vLLM's
state cache for short-convolution models. See docs/vllm.md.
"""

from __future__ import annotations

ARCHITECTURE = "YuanForCausalLM"


def register() -> None:
    """Make model_type "yuan" and architecture YuanForCausalLM known to transformers and vLLM."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import YuanVllmConfig, YuanVllmSettings

    AutoConfig.register(YuanVllmConfig.model_type, YuanVllmConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "yuanmoe.vllm.model:YuanForCausalLM")
    MODELS_CONFIG_MAP[ARCHITECTURE] = YuanVllmSettings
