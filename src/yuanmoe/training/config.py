"""`TrainConfig`: every setting of a training run, with its default and help written once; the
`yuan train` options are generated from it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from ..device import device_argument, dtype_argument, dtype_name, resolve_dtype


def setting(default, help: str, flag: str | None = None, cli: bool = True, **argparse_options):
    """A TrainConfig field: its default, its help, and how `yuan train` spells it."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli, **argparse_options})


@dataclass
class TrainConfig:
    data: str = setting(None, "a folder made by `yuan data prepare`", required=True)
    out: str = setting(None, "run folder: checkpoints, metrics.jsonl, tensorboard, loss.png", required=True)
    max_steps: int = setting(1000, "optimizer steps of the run")
    batch_size: int = setting(8, "sequences per micro-batch, over all data-parallel ranks together")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    seq_len: int = setting(256, "tokens per training sequence")
    lr: float = setting(3e-4, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "cosine floor as a fraction of the peak")
    warmup_steps: int = setting(100, "linear warm-up steps (clamped to a tenth of the run if longer than it)")
    weight_decay: float = setting(0.1, "AdamW weight decay of the matrices")
    router_lr_scale: float = setting(1.0, "learning-rate multiplier of the MoE routers' weights")
    router_weight_decay: bool = setting(True, "apply the weight decay to the MoE routers' weights too")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas", cli=False)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this")
    device: str = setting("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N", type=device_argument)
    dtype: str = setting("auto", "autocast dtype (weights stay fp32): float32, bfloat16 or auto (bfloat16 on "
                         "CUDA and on CPUs with native bf16, else float32)", type=dtype_argument)
    activation_checkpointing: bool = setting(False, "recompute each layer in the backward pass to save memory")
    fim_rate: float = setting(0.0, "share of documents in fill-in-the-middle form")
    fim_spm_rate: float = setting(0.5, "share of FIM documents in suffix-prefix-middle order")
    answer_only: bool = setting(False, "train only on tokens after <sep> (fine-tuning)")
    init_from: str | None = setting(None, "start from this checkpoint's weights (native, official or a run's) "
                                          "with a fresh optimizer", flag="--init", metavar="CHECKPOINT", type=str)
    seed: int = setting(1234, "seed of the weights and of the data order")
    log_every: int = setting(1, "steps between metric records")
    eval_every: int = setting(100, "steps between held-out evaluations")
    eval_batches: int = setting(4, "batches of held-out windows per evaluation")
    save: bool = setting(True, "write checkpoints", cli=False)
    save_every: int = setting(200, "steps between checkpoints")
    keep_last: int = setting(3, "checkpoints kept")
    time_limit_s: float | None = setting(None, "stop after this much training time (evaluating and saving first)",
                                         flag="--time-limit", metavar="SECONDS", type=float)
    tensorboard: bool = setting(True, "mirror the metrics to TensorBoard")
    progress: bool = setting(True, "show a progress bar", cli=False)
    dp: int | None = setting(None, "data-parallel ranks (default: processes / pp)", type=int)
    ep: int | None = setting(None, "expert-parallel ranks, a divisor of dp (default 1)", type=int)
    pp: int | None = setting(None, "pipeline stages (default 1)", type=int)
    data_parallel: str = setting("fsdp", "how data-parallel ranks hold the weights", choices=["fsdp", "ddp"])
    pp_schedule: str = setting("1f1b", "pipeline schedule", choices=["1f1b", "gpipe"])
    lora_rank: int | None = setting(None, "train LoRA adapters of this rank on the frozen --init model instead "
                                          "of all weights", type=int, metavar="R")
    lora_alpha: float | None = setting(None, "LoRA scale numerator (the update is alpha / rank * B A; "
                                             "default twice the rank)", type=float, metavar="A")
    lora_targets: str = setting("attention,experts", "weights LoRA adapts, from attention (q/k/v/o), experts "
                                                     "(w1/w2 of every expert), router, lfa (the LFA filter)")

    def __post_init__(self) -> None:
        if not self.data or not self.out:
            raise ValueError("a training run needs its data folder and its output folder")
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every",
                     "eval_batches", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("dp", "ep", "pp"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.fim_rate <= 1:
            raise ValueError(f"the FIM rate must be between 0 and 1, got {self.fim_rate}")
        if not self.router_lr_scale > 0:
            raise ValueError(f"router-lr-scale must be positive, got {self.router_lr_scale}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad-clip must be positive, got {self.grad_clip}")
        if self.lora_rank is not None:
            from .lora import LoraSpec

            LoraSpec.parse(self.lora_rank, self.lora_alpha, self.lora_targets)  # says what is wrong, if anything
        if self.warmup_steps < 0:
            raise ValueError(f"warmup-steps must not be negative, got {self.warmup_steps}")
        check_train_numbers(self)
        self.dtype = dtype_name(resolve_dtype(self.dtype, _device_type(self.device)))
        if self.dtype == "float16":
            raise ValueError("float16 training needs loss scaling, which this trainer does not do; "
                             "use --dtype bfloat16 (or float32)")

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def lora(self):
        """The LoraSpec of a LoRA run, None for full training."""
        from .lora import LoraSpec

        return None if self.lora_rank is None else LoraSpec.parse(self.lora_rank, self.lora_alpha, self.lora_targets)


def check_train_numbers(cfg: TrainConfig) -> None:
    """The floating-point settings: finite, and within the range where they mean something."""
    import math

    checks = {"lr": (cfg.lr, cfg.lr >= 0, "at least 0"), "min-lr-ratio": (cfg.min_lr_ratio, 0 <= cfg.min_lr_ratio <= 1,
                                                                       "between 0 and 1"),
              "weight-decay": (cfg.weight_decay, cfg.weight_decay >= 0, "at least 0"),
              "fim-spm-rate": (cfg.fim_spm_rate, 0 <= cfg.fim_spm_rate <= 1, "between 0 and 1")}
    if cfg.time_limit_s is not None:
        # 0 is allowed: one step, then stop (with its evaluation and checkpoint).
        checks["time-limit"] = (cfg.time_limit_s, cfg.time_limit_s >= 0, "a number of seconds, at least 0")
    for name, (value, ok, words) in checks.items():
        if not (ok and math.isfinite(value)):
            raise ValueError(f"--{name} must be {words}, got {value}")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (`cli=False` ones excepted), named after it."""
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if not meta.pop("cli"):
            continue
        flag = meta.pop("flag") or "--" + f.name.replace("_", "-")
        text = meta.pop("help")
        if isinstance(f.default, bool):
            if f.default:
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=f"do not {text}")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=text)
            continue
        if f.default is not None and "type" not in meta:
            meta["type"] = type(f.default)
        default = f" (default {f.default})" if f.default is not None else ""
        parser.add_argument(flag, dest=f.name, default=f.default, help=text + default, **meta)
    # The spelling before --dtype existed.
    parser.add_argument("--no-bf16", dest="dtype", action="store_const", const="float32", help=argparse.SUPPRESS)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]}
    return TrainConfig(**{name: getattr(args, name) for name in names})


def _device_type(device: str) -> str:
    """cuda or cpu: the kind of device a --device value names (auto: CUDA when present)."""
    import torch

    return "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
