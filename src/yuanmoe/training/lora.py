"""LoRA: low-rank adapters on a frozen base model, applied from outside it.

Each adapted weight W (a Linear's [out, in] weight, or the stacked experts' w1 [E, 2F, d] and
w2 [E, d, F]) becomes W + (alpha / rank) * B @ A through `torch.nn.utils.parametrize`, with
A [.., rank, in] and B [.., out, rank] (one pair per expert for the stacked weights, multiplied as a
batch). B starts at zero, so an adapted model starts out as its base. This is the mechanism of
peft's `target_parameters`, written here because peft is not a dependency and wraps Hugging Face
models; the model code is untouched and the adapters work with FSDP2, expert and pipeline
parallel, which see parameters (the base as `...parametrizations.<name>.original`, frozen).

The base is frozen and kept in the training dtype (bf16 by default); the adapters are fp32 and
are all a run optimizes and saves. A run checkpoint of a LoRA run holds only the adapters and
names its base (`trainer_state.json` "lora"); `from_pretrained` (checkpoint.load_adapted) loads it
on top of that base and folds the adapters in, so generate/serve/eval/convert take it like any checkpoint.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import ConfigError
from ..model.attention import LocalizedFilteringAttention
from ..model.moe import FeedForward, GroupedExperts
from ..routers import Router

# Which weights each target adapts.
TARGETS = ("attention", "experts", "router", "lfa")
DEFAULT_TARGETS = "attention,experts"
TRAINER_STATE = "trainer_state.json"  # where a run checkpoint records its LoRA settings and base


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TARGETS)}")

    @classmethod
    def parse(cls, rank: int, alpha: float | None, targets: str) -> "LoraSpec":
        """`--lora-rank R --lora-alpha A --lora-targets a,b`; alpha defaults to twice the rank."""
        names = tuple(dict.fromkeys(t.strip() for t in targets.split(",") if t.strip()))
        return cls(rank, float(alpha if alpha is not None else 2 * rank), names)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


class LowRankDelta(nn.Module):
    """The parametrization W -> W + scale * B @ A of one weight ([out, in], or [E, out, in])."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        *batch, out_features, in_features = weight.shape
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(*batch, rank, in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(*batch, out_features, rank, device=weight.device))

    def delta(self) -> torch.Tensor:
        return torch.matmul(self.lora_B, self.lora_A) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def target_weights(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(qualified module name, module, parameter name) of every weight the targets adapt."""
    found = []
    for name, module in model.named_modules():
        if "attention" in targets and isinstance(module, LocalizedFilteringAttention):
            found += [(f"{name}.{p}", getattr(module, p), "weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if "lfa" in targets and isinstance(module, LocalizedFilteringAttention):
            found += [(f"{name}.lf_gate.{p}", getattr(module.lf_gate, p), "weight") for p in ("conv1", "conv2")]
        if "router" in targets and isinstance(module, Router):
            found += [(f"{name}.{n}", m, "weight") for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if "experts" in targets:
            if isinstance(module, GroupedExperts):  # also the expert-parallel slice, a subclass
                found += [(name, module, "w1"), (name, module, "w2")]
            elif isinstance(module, FeedForward):  # a dense model's FFN, or shared experts
                found += [(f"{name}.w1", module.w1, "weight"), (f"{name}.w2", module.w2, "weight")]
    return found


def apply_lora(model: nn.Module, spec: LoraSpec, dtype: torch.dtype | None = None, seed: int = 0) -> int:
    """Freeze `model` (casting its weights to `dtype`, if given) and adapt the spec's targets in
    place; returns the number of trainable parameters (of the whole model, under expert parallel). The adapters' initial values depend on the
    parameter name and seed only: an expert-parallel slice gets the rows of the full init."""
    weights = target_weights(model, spec.targets)
    if not weights:
        raise ConfigError(f"the model has no weights for the LoRA targets {','.join(spec.targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
        if dtype is not None and p.is_floating_point():
            p.data = p.data.to(dtype)
    trainable = 0
    for _, module, param_name in weights:
        delta = LowRankDelta(getattr(module, param_name), spec.rank, spec.scale)
        parametrize.register_parametrization(module, param_name, delta)
        # An expert-parallel slice holds 1/ep of the adapters: count the whole model's.
        trainable += (delta.lora_A.numel() + delta.lora_B.numel()) * getattr(module, "ep_size", 1)
    if not any(p.is_meta for p in model.parameters()):
        init_adapters(model, seed)
    return trainable


def init_adapters(model: nn.Module, seed: int = 0, fill=None) -> None:
    """Set every adapter to its initial value: B = 0 and A ~ U(-1/sqrt(in), 1/sqrt(in)) (as nn.Linear
    draws its weights), drawn from the adapted weight's name and the seed for all experts at once.
    `fill(parameter, full_value)` writes a parameter's part of the full value (default: all of it;
    distributed/sharded_start.py passes one that writes this rank's shard)."""
    fill = fill or (lambda p, value: p.copy_(value))
    for name, delta in model.named_modules():
        if not isinstance(delta, LowRankDelta):
            continue
        owner_name, param_name = re.fullmatch(r"(?:(.*)\.)?parametrizations\.(\w+)\.\d+", name).groups()
        owner = model.get_submodule(owner_name or "")
        target = f"{owner_name}.{param_name}" if owner_name else param_name
        shape = list(delta.lora_A.shape)
        first, ep_size = getattr(owner, "first_expert", 0), getattr(owner, "ep_size", 1)
        local = shape[0] if len(shape) == 3 else None
        if local is not None:
            shape[0] = local * ep_size
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(target.encode()))
        bound = shape[-1] ** -0.5
        value = torch.rand(shape, generator=generator) * 2 * bound - bound
        if local is not None:
            value = value[first: first + local]
        with torch.no_grad():
            fill(delta.lora_A, value)
            fill(delta.lora_B, torch.zeros(delta.lora_B.shape))


def base_name(name: str) -> str:
    """The name a parameter has in the unadapted model: `x.parametrizations.w1.original` -> `x.w1`."""
    return re.sub(r"parametrizations\.(\w+)\.original$", r"\1", name)


def is_adapter_name(name: str) -> bool:
    return re.search(r"parametrizations\.\w+\.\d+\.lora_[AB]$", name) is not None


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankDelta) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (the sum taken in fp32) and drop the parametrizations;
    the model is a plain one again, with trainable weights."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            plist = module.parametrizations[name]
            base = plist.original
            merged = base.float()
            for delta in plist:
                merged = merged + delta.delta().float()
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            getattr(module, name).copy_(merged.to(base.dtype))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------ adapter checkpoints
def adapter_record(folder: str | Path) -> dict | None:
    """The "lora" record of a run checkpoint ({"base", "rank", "alpha", "targets"}), None for
    a checkpoint of a full model."""
    state = Path(folder) / TRAINER_STATE
    if not state.is_file():
        return None
    return json.loads(state.read_text()).get("lora")
