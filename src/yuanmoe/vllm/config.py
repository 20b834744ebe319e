"""The official Yuan config.json as a transformers config for vLLM, and the engine settings the
plugin needs (no prefix caching, eager execution)."""

from __future__ import annotations

from transformers import PretrainedConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = init_logger("vllm.yuanmoe")


class YuanVllmConfig(PretrainedConfig):
    """Official `model_type: "yuan"` keys, plus the derived values vLLM's engine reads: head_dim
    (it would otherwise take hidden / heads), num_key_value_heads, num_experts and
    num_experts_per_tok (expert parallelism checks them), the RoPE base."""

    model_type = "yuan"

    def __init__(self, vocab_size: int = 135040, hidden_size: int = 2048, num_hidden_layers: int = 24,
                 num_attention_heads: int = 16, attention_projection_size: int | None = None,
                 rms_norm_eps: float = 1e-6, max_position_embeddings: int = 4096,
                 intermediate_size: int | None = None, moe_config: dict | None = None,
                 rope_theta: float | None = None, rotary_base: float | None = None, use_yarn: bool = False,
                 tie_word_embeddings: bool = True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.attention_projection_size = attention_projection_size or hidden_size
        self.head_dim = self.attention_projection_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.intermediate_size = intermediate_size
        self.moe_config = moe_config or {}
        self.num_experts = int(self.moe_config.get("moe_num_experts", 0) or 0)
        self.num_experts_per_tok = int(self.moe_config.get("moe_top_k", 2))
        self.rope_theta = rope_theta
        self.rotary_base = rotary_base
        self.use_yarn = use_yarn
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def rope_base(self) -> float:
        """config.json's rope_theta, else the official vLLM port's rotary_base, else 10000 (the
        official HF code's fixed base); see the spec, section 7."""
        for value in (self.rope_theta, self.rotary_base):
            if value is not None:
                return float(value)
        return 10000.0


class YuanVllmSettings(VerifyAndUpdateConfig):
    """Engine settings for YuanForCausalLM, applied by vLLM before the model is built."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        hf = vllm_config.model_config.hf_config
        if getattr(hf, "use_yarn", False):
            raise ValueError("config.json sets use_yarn: the yuanmoe vLLM plugin implements plain RoPE only; "
                             "remove use_yarn (and serve at most max_position_embeddings tokens)")
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching:
            cache.enable_prefix_caching = False
            logger.info("YuanForCausalLM: prefix caching disabled (the LFA filter state of a cached prefix "
                        "is not kept by this plugin)")
        model = vllm_config.model_config
        if not model.enforce_eager:
            model.enforce_eager = True
            logger.info("YuanForCausalLM: running eagerly (enforce_eager), no torch.compile or CUDA graphs "
                        "(the LFA filter reads per-batch state metadata in Python)")
        logger.info("YuanForCausalLM: RoPE base %s on %d of %d dims of each head", hf.rope_base,
                    hf.hidden_size // hf.num_attention_heads, hf.head_dim)
