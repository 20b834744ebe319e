"""The training loop, the only one: for one process and for torchrun alike.

Every run goes through `parallelize(model, mesh, dims)`, which wraps nothing in a world of one
process (torchtitan's design), so the step, clipping, evaluation and checkpoints are the same
code at every scale: packed batches, autocast on the run's device, gradient accumulation, the
official schedule, held-out evaluation, run checkpoints that resume exactly at any world size,
and clean stops (a signal or `--time-limit`, agreed on by all ranks).

A run folder holds:

    checkpoints/step-0000200/  a run checkpoint (distributed/checkpoint.py): weights, optimizer,
                               config, tokenizer, trainer state; `from_pretrained` loads it
    metrics.jsonl              one record per logged step (and per evaluation)
    tensorboard/               the same numbers for TensorBoard
    loss.png                   the loss curve, drawn at the end
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..checkpoint import empty_model, from_pretrained
from ..config import ConfigError, YuanConfig
from ..data import TokenDataset, load_meta
from ..device import keep_freed_memory, resolve_dtype
from ..distributed.checkpoint import Checkpointer
from ..distributed.mesh import ParallelDims, build_mesh, init_distributed
from ..distributed.parallel_model import ParallelModel, parallelize
from ..distributed.sharded_start import load_start_weights, materialize
from ..info import model_stats
from ..model import YuanForCausalLM
from ..routers import update_expert_bias
from .config import TrainConfig
from .lora import adapter_record, apply_lora
from .metrics import MetricsLog, plot_loss
from .optim import build_optimizer, learning_rate


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss, a mismatched checkpoint); the message says why."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> training loss of the global batch
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> held-out loss
    eval_loss: float | None = None  # last held-out loss
    checkpoint: Path | None = None
    interrupted: int = 0  # the signal (SIGINT, SIGTERM) that stopped the run early, 0 if none
    model: nn.Module | None = None  # the trained model (this rank's share of it under torchrun)


def train(model_config: YuanConfig | None, cfg: TrainConfig, resume: bool = False,
          resume_from: int | None = None, observe: Callable[[int, nn.Module], None] | None = None) -> TrainResult:
    """Train `model_config` from scratch on cfg.data, start from the weights of cfg.init_from, or
    continue the newest intact checkpoint in cfg.out (saved at any world size), or that of step
    `resume_from`. With a checkpoint `model_config` may be None; if given it must match the
    checkpoint's architecture. Launched by torchrun, every rank calls this with the same arguments.
    `observe(step, model)`, if given, is called after each held-out evaluation (the experiments
    record the routing there). A SIGINT or SIGTERM from the first line on stops the run after the step
    in progress, with a checkpoint of it."""
    with StopOnSignal() as stop:
        return _train(model_config, cfg, resume, resume_from, observe, stop)


def _train(model_config: YuanConfig | None, cfg: TrainConfig, resume: bool, resume_from: int | None,
           observe: Callable[[int, nn.Module], None] | None, stop: "StopOnSignal") -> TrainResult:
    from ..tokenizer import load_tokenizer

    device = init_distributed(cfg.device)
    keep_freed_memory()
    rank, world = dist.get_rank(), dist.get_world_size()
    leader = rank == 0
    dims = ParallelDims.for_world(world, cfg.dp, cfg.ep, cfg.pp)
    run_dir, data_dir = Path(cfg.out), Path(cfg.data)
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir / meta["tokenizer"])
    fingerprint = tokenizer.fingerprint()
    checkpointer = Checkpointer(run_dir, cfg.keep_last, tokenizer)
    if leader:
        checkpointer.remove_temporaries()
    latest = checkpointer.latest()
    if resume and latest is None:
        old_format = sorted(checkpointer.root.glob("step-*/trainer_state.pt")) if checkpointer.root.is_dir() else []
        if old_format:
            raise FileNotFoundError(f"--resume: {old_format[-1].parent} is a checkpoint of an earlier version, which "
                                    f"cannot be resumed; start a new run from its weights with --init")
        raise FileNotFoundError(f"--resume: {checkpointer.root} holds no checkpoint to continue from")
    if not resume and latest is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue them or choose another --out")
    if resume:
        latest = checkpointer.resumable(resume_from)
    start_from = latest if resume else (Path(cfg.init_from) if cfg.init_from else None)
    check_data_tokenizer(fingerprint, meta, data_dir, start_from)
    lora = cfg.lora
    # The weights to build the model from: the --init checkpoint of a new run, the base of a LoRA run
    # (whose checkpoints hold only the adapters), or none when resuming a run of all weights.
    weights_from = Path(cfg.init_from) if cfg.init_from else None
    if lora is not None:
        weights_from = weights_from or (lora_base(latest) if resume else None)
        if weights_from is None:
            raise ConfigError("--lora-rank trains adapters on a trained model: name it with --init")
    elif resume:
        if adapter_record(latest) is not None:
            raise TrainingError(f"{latest} holds LoRA adapters; resume it with the --lora-* options it was started with")
        weights_from = None
    if resume:
        check_resume_settings(latest, cfg)
    if start_from is not None:
        model_config = checkpoint_config(start_from, model_config)
    if model_config is None:
        raise ConfigError("no model configuration given")
    check_data_matches(model_config, meta, data_dir)
    if cfg.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq-len {cfg.seq_len} exceeds the model's context ({model_config.max_position_embeddings})")
    warmup_steps = clamped_warmup(cfg, say=leader)

    torch.manual_seed(cfg.seed)
    train_dtype = resolve_dtype(cfg.dtype)
    # Start weights are read after parallelize, each rank only its shards, into a model built on
    # the meta device (distributed/sharded_start.py); DDP, which replicates, and adapters to fold
    # into their base take the whole model. Full training keeps fp32 weights under autocast; a
    # LoRA base stays in the training dtype.
    sharded_start = weights_from is not None and cfg.data_parallel == "fsdp" and adapter_record(weights_from) is None
    if sharded_start:
        model = empty_model(model_config)
    elif weights_from is not None:
        model = from_pretrained(weights_from, dtype=train_dtype if lora else torch.float32).train()
    else:
        model = YuanForCausalLM(model_config)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable = {}

    def adapt(module: nn.Module) -> None:
        trainable["count"] = apply_lora(module, lora, dtype=train_dtype, seed=cfg.seed)

    pm = parallelize(model, build_mesh(dims, device.type), dims, data_parallel=cfg.data_parallel,
                     schedule=cfg.pp_schedule, adapt=adapt if lora else None,
                     param_dtype=train_dtype if lora else None)
    if sharded_start:
        materialize(pm)
        load_start_weights(pm, weights_from, seed=cfg.seed)
    if lora is not None and leader:
        total = model_stats(model_config)["total_params"]
        tqdm.write(f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {','.join(lora.targets)}: "
                   f"{trainable['count']:,} trainable parameters, {trainable['count'] / total:.3%} of {total:,}; "
                   f"base frozen in {cfg.dtype}")
    if cfg.batch_size % pm.rows_multiple:
        raise ValueError(f"batch-size {cfg.batch_size} must be a multiple of {pm.rows_multiple}: each of the "
                         f"{dims.dp} data-parallel ranks takes an equal share of every micro-batch"
                         + (f", cut into {pm.microbatches} pipeline micro-batches" if dims.pp > 1 else ""))
    pm.autocast_dtype = resolve_dtype(cfg.dtype)
    optimizer = build_optimizer(pm, cfg.lr, cfg.weight_decay, cfg.betas, cfg.router_lr_scale, cfg.router_weight_decay)
    step = checkpointer.load(latest, pm, optimizer)["step"] if resume else 0
    dataset = TokenDataset(data_dir, cfg.seq_len, seed=cfg.seed, fim_rate=cfg.fim_rate,
                           fim_spm_rate=cfg.fim_spm_rate, answer_only=cfg.answer_only)
    if dataset.num_valid_windows == 0 and leader:
        tqdm.write(f"note: {data_dir} has no held-out window of {cfg.seq_len + 1} tokens; no held-out loss")

    if leader:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, resume_step=step if resume else None, tensorboard=cfg.tensorboard) if leader else None
    result = TrainResult(step=step, checkpoint=latest if resume else None, model=pm.module)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training" if world == 1 else f"training ({dims})",
               unit="step", disable=not (cfg.progress and leader), dynamic_ncols=True)
    meter = Throughput(step, cfg.samples_per_step * cfg.seq_len)
    try:
        while step < cfg.max_steps:
            lr, batches = begin_step(optimizer, dataset, cfg, step, warmup_steps)
            stats = pm.train_step(batches)
            if not np.isfinite(stats.loss):
                raise TrainingError(f"the training loss became {stats.loss} at step {step + 1}; stopping before "
                                    f"it spoils the model (lower --lr, raise --warmup-steps, or resume "
                                    f"from the last checkpoint)")
            grad_norm = float(pm.clip_grad_norm_(cfg.grad_clip))
            if not np.isfinite(grad_norm):
                raise TrainingError(f"the gradient norm became {grad_norm} at step {step + 1}; stopping "
                                    f"before it spoils the model (lower --lr or resume from the last checkpoint)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_expert_bias(pm.module)
            step += 1
            result.step, result.losses[step] = step, stats.loss
            meter.add(stats.expert_load)
            # Ranks may see a signal, or reach the time limit, at different steps: stop together.
            signalled, out_of_time = any_rank(stop.signum != 0, cfg.time_limit_s is not None
                                              and meter.elapsed() >= cfg.time_limit_s)
            finished = step == cfg.max_steps or out_of_time

            if leader and (step % cfg.log_every == 0 or finished or signalled):
                record = {"step": step, "loss": round(stats.loss, 6), "lr": lr,
                          "grad_norm": round(grad_norm, 6), **meter.take(step)}
                if model_config.is_moe:
                    record["aux_loss"] = round(stats.aux_loss, 6)
                log.write(record)
                bar.set_postfix_str(f"loss {stats.loss:.3f}  {record['tokens_per_s']:,.0f} tok/s  lr {lr:.2e}",
                                    refresh=False)
            bar.update(1)
            if dataset.num_valid_windows and (step % cfg.eval_every == 0 or finished):
                eval_loss = evaluate(pm, dataset, cfg)
                if eval_loss is not None:
                    result.eval_loss = result.eval_losses[step] = eval_loss
                    if leader:
                        log.write({"step": step, "eval_loss": round(eval_loss, 6)})
                        bar.write(f"step {step}: held-out loss {eval_loss:.4f}")
                if observe is not None:
                    observe(step, pm.module)
            if cfg.save and (step % cfg.save_every == 0 or finished or signalled):
                state = {"samples_seen": step * cfg.samples_per_step, "parallel": str(dims),
                         "train_config": dataclasses.asdict(cfg), "tokenizer_fingerprint": fingerprint}
                if lora is not None:
                    state["lora"] = {**lora.to_dict(), "base": str(weights_from.resolve())}
                result.checkpoint = checkpointer.save(step, pm, optimizer, state)
            if signalled:
                bar.write("stop requested: " + (f"saved {result.checkpoint}; continue with --resume"
                                                if cfg.save else "not saved (checkpoints are off)"))
                result.interrupted = stop.signum or signal.SIGTERM  # another rank's signal
                break
            if out_of_time:
                bar.write(f"time limit of {cfg.time_limit_s:.0f} s reached after step {step} of {cfg.max_steps}")
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    if leader:
        plot_loss(run_dir)
    # A signal after the last step found the work done and saved; the exit status still reports it.
    result.interrupted = result.interrupted or stop.signum
    return result


def clamped_warmup(cfg: TrainConfig, say: bool = True) -> int:
    """The warm-up steps actually used: a warm-up as long as the run would never reach the peak
    learning rate (nor decay from it), so it is cut to a tenth of the run, with a note."""
    if cfg.warmup_steps < cfg.max_steps:
        return cfg.warmup_steps
    clamped = max(1, cfg.max_steps // 10)
    if say:
        tqdm.write(f"note: --warmup-steps {cfg.warmup_steps} is not shorter than the run ({cfg.max_steps} steps); "
                   f"warming up for {clamped} steps instead")
    return clamped


def any_rank(*flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank."""
    values = torch.tensor([float(f) for f in flags])
    if dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values]


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



def begin_step(optimizer, dataset: TokenDataset, cfg: TrainConfig, step: int, warmup_steps: int) -> tuple[float, list]:
    """Set the scheduled learning rate of optimizer step `step` (0-based) and return it with the
    step's global micro-batches: sample i of the data is a pure function of i, so a resumed run
    continues with exactly the samples an uninterrupted one would have seen, at any world size."""
    lr = learning_rate(step, cfg.lr, warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    first = step * cfg.batch_size * cfg.grad_accum
    batches = [dataset.batch(range(first + m * cfg.batch_size, first + (m + 1) * cfg.batch_size))
               for m in range(cfg.grad_accum)]
    return lr, batches

@torch.no_grad()
def evaluate(pm: ParallelModel, dataset: TokenDataset, cfg: TrainConfig) -> float | None:
    """Mean cross entropy per target token over a fixed, evenly spread set of held-out windows, in
    global batches of batch-size windows; a last partial batch is cut to a multiple of dp, or left
    out under pipeline parallel (whose buffers keep the first batch's shape). None if none is left."""
    indices = heldout_indices(dataset, cfg.eval_batches * cfg.batch_size)
    unit = cfg.batch_size if pm.dims.pp > 1 else pm.rows_multiple
    indices = indices[: len(indices) - len(indices) % unit]
    if len(indices) == 0:
        return None
    total, num_targets = 0.0, 0
    for lo in range(0, len(indices), cfg.batch_size):
        ce_sum, targets = pm.eval_loss(dataset.batch(indices[lo: lo + cfg.batch_size], valid=True))
        total += ce_sum
        num_targets += targets
    return total / max(1, num_targets)


def heldout_indices(dataset: TokenDataset, count: int) -> np.ndarray:
    """`count` held-out windows spread evenly over all of the held-out data (each source in proportion)."""
    total = dataset.num_valid_windows
    return np.unique(np.linspace(0, total - 1, min(count, total)).astype(np.int64))


def enable_activation_checkpointing(model: YuanForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations.
    The layers' `forward` is wrapped in place (not the modules replaced) so parameter names, and
    with them the checkpoints, stay the same."""
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# --------------------------------------------------------------------------- starting points
def lora_base(checkpoint: Path) -> Path:
    """The base model a LoRA run's checkpoint was trained on."""
    record = adapter_record(checkpoint)
    if record is None:
        raise TrainingError(f"{checkpoint} is a checkpoint of all weights, not of LoRA adapters; "
                            f"resume it without --lora-rank")
    return Path(record["base"])


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


def check_data_matches(config: YuanConfig, meta: dict, data_dir: Path) -> None:
    """Token ids only mean something with the tokenizer they came from: the model's vocabulary
    must hold them all and agree on <eod>, which the packing relies on."""
    if meta["vocab_size"] > config.vocab_size:
        raise ConfigError(f"{data_dir} was tokenized with a vocabulary of {meta['vocab_size']} tokens but the model "
                          f"has {config.vocab_size}; prepare the data with the model's tokenizer or set vocab_size")
    if meta["eod_id"] != config.eod_token_id:
        raise ConfigError(f"{data_dir} was made with another tokenizer: <eod> is token {meta['eod_id']} there but "
                          f"{config.eod_token_id} in the model config")


def check_resume_settings(checkpoint: Path, cfg: TrainConfig) -> None:
    """A resumed run continues exactly only with the settings that decide its samples; --max-steps
    must leave something to do."""
    from ..distributed.checkpoint import EXTRA_FILE

    state = json.loads((checkpoint / EXTRA_FILE).read_text())
    if cfg.max_steps < state["step"]:
        raise TrainingError(f"--max-steps {cfg.max_steps} is below step {state['step']} of {checkpoint}, so there is "
                            f"nothing to train; raise --max-steps (or resume an earlier step with --resume-from)")
    saved = state.get("train_config", {})
    changed = [f"--{name.replace('_', '-')} {saved[name]} (now {getattr(cfg, name)})"
               for name in ("seq_len", "batch_size", "grad_accum", "seed", "fim_rate", "answer_only")
               if name in saved and saved[name] != getattr(cfg, name)]
    if changed:
        raise TrainingError(f"{checkpoint} was trained with {', '.join(changed)}, and a resumed run continues "
                            f"exactly only with the same; pass the saved values, or start a new run from its "
                            f"weights with --init {checkpoint} --out NEW_FOLDER")


def check_data_tokenizer(fingerprint: str, meta: dict, data_dir: Path, checkpoint: Path | None) -> None:
    """The data's token ids, its tokenizer folder (`fingerprint`, saved with every checkpoint of the run)
    and the checkpoint the run starts from must all come from one tokenizer: weights trained on one
    tokenizer's ids learn nonsense from another's, and a resumed run would save the wrong tokenizer."""
    from ..data.prepare import data_tokenizer_fingerprint
    from ..tokenizer import check_same_tokenizer, folder_fingerprint

    check_same_tokenizer(f"the token ids in {data_dir}", data_tokenizer_fingerprint(data_dir, meta),
                         "its tokenizer folder", fingerprint, "prepare the data again")
    if checkpoint is not None:
        check_same_tokenizer(f"the data in {data_dir}", fingerprint, f"checkpoint {checkpoint}",
                             folder_fingerprint(checkpoint), f"prepare the data with the checkpoint's tokenizer "
                             f"(`yuan data prepare INPUTS --tokenizer {checkpoint}`)")


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
