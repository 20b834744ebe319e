"""The training loop: packed batches, bf16 autocast, gradient accumulation, clipping, the official
schedule, held-out evaluation, atomic checkpoints that resume exactly, and clean stops.

A run folder holds:

    checkpoints/step-0000200/  config.json, model.safetensors, tokenizer, trainer_state.pt
    metrics.jsonl              one record per logged step (and per evaluation)
    tensorboard/               the same numbers for TensorBoard
    loss.png                   the loss curve, drawn at the end
"""

from __future__ import annotations

import dataclasses
import functools
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..config import ConfigError, YuanConfig
from ..data import IGNORE_INDEX, TokenDataset, load_meta
from ..model import YuanForCausalLM
from ..routers import update_expert_bias
from .metrics import MetricsLog, plot_loss
from .optim import build_optimizer, learning_rate

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss, a mismatched checkpoint); the message says why."""


@dataclass
class TrainConfig:
    data: str
    out: str
    max_steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = True
    activation_checkpointing: bool = False
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    answer_only: bool = False
    init_from: str | None = None  # a checkpoint whose weights a new run starts from (fine-tuning)
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 200
    keep_last: int = 3
    time_limit_s: float | None = None  # stop (evaluate, save) once training has run this long
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every",
                     "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.fim_rate <= 1:
            raise ValueError(f"the FIM rate must be between 0 and 1, got {self.fim_rate}")


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> training loss, this process only
    eval_loss: float | None = None  # last held-out loss
    checkpoint: Path | None = None
    interrupted: bool = False


def train(model_config: YuanConfig | None, cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train `model_config` from scratch on cfg.data, start from the weights of cfg.init_from, or
    continue the latest checkpoint in cfg.out. With a checkpoint `model_config` may be None; if
    given it must match the checkpoint's architecture."""
    from ..tokenizer import load_tokenizer

    run_dir, data_dir = Path(cfg.out), Path(cfg.data)
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir / meta["tokenizer"])
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise FileNotFoundError(f"--resume: {run_dir / CHECKPOINTS} holds no checkpoint to continue from")
    if not resume and latest is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue them or choose another --out")
    start_from = latest if resume else (Path(cfg.init_from) if cfg.init_from else None)
    if start_from is not None:
        model_config = checkpoint_config(start_from, model_config)
    if model_config is None:
        raise ConfigError("no model configuration given")
    check_data_matches(model_config, meta, data_dir)
    if cfg.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq-len {cfg.seq_len} exceeds the model's context ({model_config.max_position_embeddings})")

    torch.manual_seed(cfg.seed)
    model = YuanForCausalLM(model_config)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    step = 0
    if resume:
        step = load_checkpoint(latest, model, optimizer)
    elif start_from is not None:
        from ..checkpoint import from_pretrained

        model.load_state_dict(from_pretrained(start_from).state_dict())
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    dataset = TokenDataset(data_dir, cfg.seq_len, seed=cfg.seed, fim_rate=cfg.fim_rate,
                           fim_spm_rate=cfg.fim_spm_rate, answer_only=cfg.answer_only)
    if dataset.num_valid_windows == 0:
        tqdm.write(f"note: {data_dir} has no held-out window of {cfg.seq_len + 1} tokens; no held-out loss")

    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, resume_step=step if resume else None, tensorboard=cfg.tensorboard)
    result = TrainResult(step=step, checkpoint=latest if resume else None)
    samples_per_step = cfg.batch_size * cfg.grad_accum
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    meter = Throughput(step, samples_per_step * cfg.seq_len)
    try:
        with StopOnSignal() as stop:
            while step < cfg.max_steps:
                lr, batches = begin_step(optimizer, dataset, cfg, step)
                loss, aux, load = train_step(model, batches, cfg.bf16)
                if not np.isfinite(loss):
                    raise TrainingError(f"the training loss became {loss} at step {step + 1}; stopping before "
                                        f"it spoils the model (lower --lr, raise --warmup-steps, or resume "
                                        f"from the last checkpoint)")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                if not np.isfinite(grad_norm):
                    raise TrainingError(f"the gradient norm became {grad_norm} at step {step + 1}; stopping "
                                        f"before it spoils the model (lower --lr or resume from the last checkpoint)")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update_expert_bias(model)
                step += 1
                result.step, result.losses[step] = step, loss
                meter.add(load)
                out_of_time = cfg.time_limit_s is not None and meter.elapsed() >= cfg.time_limit_s
                finished = step == cfg.max_steps or out_of_time

                if step % cfg.log_every == 0 or finished or stop.signum:
                    record = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                              **meter.take(step)}
                    if model_config.is_moe:
                        record["aux_loss"] = round(aux, 6)
                    log.write(record)
                    bar.set_postfix_str(f"loss {loss:.3f}  {record['tokens_per_s']:,.0f} tok/s  lr {lr:.2e}",
                                        refresh=False)
                bar.update(1)
                if dataset.num_valid_windows and (step % cfg.eval_every == 0 or finished):
                    result.eval_loss = evaluate(model, dataset, cfg)
                    log.write({"step": step, "eval_loss": round(result.eval_loss, 6)})
                    bar.write(f"step {step}: held-out loss {result.eval_loss:.4f}")
                if step % cfg.save_every == 0 or finished or stop.signum:
                    state = trainer_state(step, optimizer, cfg, step * samples_per_step)
                    result.checkpoint = save_checkpoint(run_dir, model, tokenizer, state, cfg.keep_last)
                if stop.signum:
                    bar.write(f"{signal.Signals(stop.signum).name} received: saved {result.checkpoint}; "
                              f"continue with --resume")
                    result.interrupted = True
                    break
                if out_of_time:
                    bar.write(f"time limit of {cfg.time_limit_s:.0f} s reached after step {step} of {cfg.max_steps}")
                    break
    finally:
        bar.close()
        log.close()
    plot_loss(run_dir)
    return result


class Throughput:
    """Tokens per second and per-layer expert load, accumulated between two log records."""

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.started = self.since = time.perf_counter()
        self.since_step = step
        self.load: list[list[int]] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def add(self, load: list[list[int]]) -> None:
        self.load = load if self.load is None else [[a + b for a, b in zip(x, y)] for x, y in zip(self.load, load)]

    def take(self, step: int) -> dict:
        now = time.perf_counter()
        record = {"tokens_per_s": round(self.tokens_per_step * (step - self.since_step) / (now - self.since), 1),
                  "tokens": step * self.tokens_per_step}
        if self.load:
            # Per MoE layer, the share of routed token copies each expert received.
            record["expert_load"] = [[round(c / max(1, sum(row)), 4) for c in row] for row in self.load]
        self.since, self.since_step, self.load = now, step, None
        return record



def begin_step(optimizer, dataset: TokenDataset, cfg: TrainConfig, step: int) -> tuple[float, list]:
    """Set the scheduled learning rate of optimizer step `step` (0-based) and return it with the
    step's micro-batches: sample i of the data is a pure function of i, so a resumed run continues
    with exactly the samples an uninterrupted one would have seen."""
    lr = learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    first = step * cfg.batch_size * cfg.grad_accum
    batches = [dataset.batch(range(first + m * cfg.batch_size, first + (m + 1) * cfg.batch_size))
               for m in range(cfg.grad_accum)]
    return lr, batches

def train_step(model: YuanForCausalLM, batches: list[dict], bf16: bool) -> tuple[float, float, list[list[int]]]:
    """Forward and backward over the micro-batches of one optimizer step. The cross entropy is
    averaged over all the step's target tokens (not per micro-batch), so accumulation gives the
    same gradient as one big batch. Returns (loss, aux loss, tokens per expert per layer)."""
    model.train()
    num_targets = max(1, sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches))
    total_ce, total_aux, load = 0.0, 0.0, None
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["input_ids"], position_ids=batch["position_ids"], output_router=True)
        ce_sum = F.cross_entropy(out.logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        aux = out.aux_loss / len(batches)
        (ce_sum / num_targets + aux).backward()
        total_ce += float(ce_sum.detach())
        total_aux += float(aux.detach())
        counts = [r.tokens_per_expert.tolist() for r in out.router_outputs]
        load = counts if load is None else [[a + b for a, b in zip(x, y)] for x, y in zip(load, counts)]
    return total_ce / num_targets, total_aux, load or []


@torch.no_grad()
def evaluate(model: YuanForCausalLM, dataset: TokenDataset, cfg: TrainConfig) -> float:
    """Mean cross entropy per target token over a fixed, evenly spread set of held-out windows."""
    model.eval()
    count = min(dataset.num_valid_windows, cfg.eval_batches * cfg.batch_size)
    indices = np.unique(np.linspace(0, dataset.num_valid_windows - 1, count).astype(np.int64))
    total, num_targets = 0.0, 0
    for lo in range(0, len(indices), cfg.batch_size):
        batch = dataset.batch(indices[lo: lo + cfg.batch_size], valid=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        num_targets += int((batch["targets"] != IGNORE_INDEX).sum())
    return total / max(1, num_targets)


def enable_activation_checkpointing(model: YuanForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations.
    The layers' `forward` is wrapped in place (not the modules replaced) so parameter names, and
    with them the checkpoints, stay the same."""
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# --------------------------------------------------------------------------- checkpoints
def trainer_state(step: int, optimizer: torch.optim.Optimizer, cfg: TrainConfig, samples_seen: int) -> dict:
    return {
        "step": step,
        "samples_seen": samples_seen,
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(cfg),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }


def save_checkpoint(run_dir: Path, model: YuanForCausalLM, tokenizer, state: dict, keep_last: int) -> Path:
    """checkpoints/step-NNNNNNN: a folder `from_pretrained` loads, plus the trainer state. Written
    under a temporary name and renamed, so a crash never leaves a half-written checkpoint; only
    the newest `keep_last` are kept."""
    from ..checkpoint import save_pretrained

    root = run_dir / CHECKPOINTS
    final = root / f"step-{state['step']:07d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_config(path: Path, expected: YuanConfig | None) -> YuanConfig:
    """The checkpoint's config; if `expected` is given, it must describe the same architecture."""
    from ..checkpoint import load_config

    config, _ = load_config(path)
    if expected is not None:
        differ = [f"{k} ({v} in the checkpoint, {getattr(expected, k)} asked for)"
                  for k, v in config.to_dict().items() if getattr(expected, k) != v]
        if differ:
            raise TrainingError(f"checkpoint {path} has another architecture: {'; '.join(differ)}")
    return config


def load_checkpoint(path: Path, model: YuanForCausalLM, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer moments and RNG states; returns the step to continue from."""
    from ..checkpoint import from_pretrained

    model.load_state_dict(from_pretrained(path).state_dict())
    state = torch.load(path / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def check_data_matches(config: YuanConfig, meta: dict, data_dir: Path) -> None:
    """Token ids only mean something with the tokenizer they came from: the model's vocabulary
    must hold them all and agree on <eod>, which the packing relies on."""
    if meta["vocab_size"] > config.vocab_size:
        raise ConfigError(f"{data_dir} was tokenized with a vocabulary of {meta['vocab_size']} tokens but the model "
                          f"has {config.vocab_size}; prepare the data with the model's tokenizer or set vocab_size")
    if meta["eod_id"] != config.eod_token_id:
        raise ConfigError(f"{data_dir} was made with another tokenizer: <eod> is token {meta['eod_id']} there but "
                          f"{config.eod_token_id} in the model config")


def config_for_data(config: YuanConfig, meta: dict) -> YuanConfig:
    """A preset's architecture with the vocabulary and special tokens of the data's tokenizer."""
    return config.replace(vocab_size=meta["vocab_size"], eod_token_id=meta["eod_id"], sep_token_id=meta["sep_id"],
                          pad_token_id=meta["pad_id"])


class StopOnSignal:
    """SIGINT/SIGTERM ask the loop to save and stop after the current step; a second SIGINT
    interrupts at once. Only the main thread can own signal handlers, elsewhere this does nothing."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
