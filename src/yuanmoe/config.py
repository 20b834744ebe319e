"""The model configuration: one dataclass, named presets, JSON round trip, validation."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ROUTERS = ("attention", "linear", "noisy_topk", "expert_choice")


class ConfigError(ValueError):
    """A configuration the model cannot express; the message says which field and why."""


@dataclass
class YuanConfig:
    vocab_size: int = 135040
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    # q/k/v width; head_dim = attention_projection_size / num_heads (M32: 4096 / 16 = 256).
    attention_projection_size: int = 4096
    # RoPE covers the first rotary_dim dims of each head; None means hidden_size / num_heads.
    rotary_dim: int | None = None
    rope_base: float = 10000.0
    # YaRN context extension as the official vLLM port applies it (spec section 7); None = off.
    # max_position_embeddings is then the extended context, yarn_original_max_position the trained one.
    yarn_scale_factor: float | None = None
    yarn_original_max_position: int | None = None
    yarn_attn_factor: float = 1.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    # Mixture of experts; num_experts = 0 makes every layer a dense SwiGLU FFN of width ffn_hidden_size.
    num_experts: int = 32
    top_k: int = 2
    ffn_hidden_size: int = 8192
    router: str = "attention"
    norm_topk_prob: bool = True
    num_shared_experts: int = 0
    # Router balancing (all off by default, as in the official pre-training run).
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    router_noise_std: float = 1.0
    capacity_factor: float = 1.0
    # Router recipe knobs for ablations; the defaults are the official model's.
    router_init_scale: float = 1.0  # router weights start with std initializer_range * this
    router_temperature: float = 1.0  # attention router: softmax(q k^T / temperature)
    router_fp32: bool = True  # routing scores in fp32 even under autocast (False: autocast's dtype)
    tie_word_embeddings: bool = True
    eod_token_id: int = 77185
    sep_token_id: int = 77187
    pad_token_id: int = 77188
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.attention_projection_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid config: {msg}")

        for name, hint in _field_types().items():
            value = getattr(self, name)
            need(_has_type(value, hint), f"{name} must be {_type_words(hint)}, got {value!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "attention_projection_size", "max_position_embeddings", "ffn_hidden_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.attention_projection_size % self.num_heads == 0,
             f"num_heads ({self.num_heads}) must divide attention_projection_size "
             f"({self.attention_projection_size})")
        need(self.hidden_size % 2 == 0, f"hidden_size ({self.hidden_size}) must be even (the LFA filter halves it)")
        need(self.rope_dim % 2 == 0 and 0 < self.rope_dim <= self.head_dim,
             f"rotary_dim ({self.rope_dim}) must be even and at most head_dim ({self.head_dim})")
        need(self.rope_base > 0, f"rope_base must be positive, got {self.rope_base}")
        need(self.yarn_scale_factor is None or self.yarn_scale_factor > 0,
             f"yarn_scale_factor must be positive (or null for no YaRN), got {self.yarn_scale_factor}")
        need(self.yarn_original_max_position is None or self.yarn_original_max_position > 0,
             f"yarn_original_max_position must be positive, got {self.yarn_original_max_position}")
        need(self.num_experts >= 0, f"num_experts must be >= 0, got {self.num_experts}")
        if self.is_moe:
            need(self.router in ROUTERS, f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
            need(1 <= self.top_k <= self.num_experts,
                 f"top_k ({self.top_k}) must be between 1 and num_experts ({self.num_experts})")
            need(0 <= self.num_shared_experts, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
            need(self.capacity_factor > 0, f"capacity_factor must be positive, got {self.capacity_factor}")
            need(self.router_noise_std >= 0, f"router_noise_std must be >= 0, got {self.router_noise_std}")
            for name in ("router_init_scale", "router_temperature"):
                need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
            need(not (self.router == "expert_choice" and self.bias_update_rate > 0),
                 "expert_choice balances loads by construction; set bias_update_rate to 0")
        for name in ("eod_token_id", "sep_token_id", "pad_token_id"):
            tid = getattr(self, name)
            need(0 <= tid < self.vocab_size, f"{name} ({tid}) is outside the vocabulary (size {self.vocab_size})")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "YuanConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: expected a JSON object of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"invalid config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            from .utils import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "YuanConfig":
        p = Path(path_or_text)
        if isinstance(path_or_text, Path) or _is_file(p):
            try:
                text = p.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        else:
            text = str(path_or_text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)

    def replace(self, **changes) -> "YuanConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"invalid config: unknown field(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # JSON text too long to be a file name
        return False


@functools.cache
def _field_types() -> dict:
    return typing.get_type_hints(YuanConfig)


_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               dict: "a JSON object", type(None): "null"}


def _options(hint) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _has_type(value, hint) -> bool:
    """JSON-level type check of a config value: bools are not integers, integers are numbers."""
    for option in _options(hint):
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is not int and isinstance(value, option):
            return True
    return False


def _type_words(hint) -> str:
    return " or ".join(_TYPE_WORDS[option] for option in _options(hint))


PRESETS: dict[str, dict] = {
    # The released model (Yuan2-M32-hf): 40B total, 3.7B active parameters.
    "yuan2-m32": {},
    # For tests: the shapes of the golden tiny-a checkpoint.
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, attention_projection_size=128,
                 max_position_embeddings=512, num_experts=8, top_k=2, ffn_hidden_size=96,
                 eod_token_id=511, sep_token_id=510, pad_token_id=509),
    # A few tens of millions of parameters: demos and the router experiments on one CPU.
    "small": dict(vocab_size=8192, hidden_size=256, num_layers=8, num_heads=4, attention_projection_size=256,
                  max_position_embeddings=1024, num_experts=8, top_k=2, ffn_hidden_size=768,
                  eod_token_id=0, sep_token_id=1, pad_token_id=2),
}


def preset(name: str, **overrides) -> YuanConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return YuanConfig(**{**PRESETS[name], **overrides})
