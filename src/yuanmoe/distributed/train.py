"""`yuan train` on many processes: the trainer's recipe (data, optimizer, schedule, metrics) with the
step, clipping, evaluation and checkpoints of a `ParallelModel`.

Launched by torchrun, every rank runs this loop on the same global batches (`--batch-size` stays
the global micro-batch, split over the data-parallel ranks), so a run follows the loss curve of
the same command on one process. Checkpoints are distributed (`checkpoints/step-N/`, DCP shards,
resumable at any layout); the final one is also exported to `final/`, a folder `from_pretrained`
loads. Rank 0 alone logs and writes metrics.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import ConfigError, YuanConfig
from ..data import TokenDataset, load_meta
from ..model import YuanForCausalLM
from ..routers import update_expert_bias
from ..training.metrics import MetricsLog, plot_loss
from ..training.optim import build_optimizer
from ..training.trainer import (CHECKPOINTS, StopOnSignal, TrainConfig, TrainingError, TrainResult, begin_step,
                                check_data_matches, enable_activation_checkpointing)
from .checkpoint import CONFIG_FILE, export_checkpoint, load_checkpoint, save_checkpoint
from .mesh import ParallelDims, build_mesh, init_distributed
from .parallel_model import ParallelModel, parallelize

FINAL = "final"


def list_distributed_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if (p / ".metadata").is_file()) if root.is_dir() else []


def train_parallel(model_config: YuanConfig | None, cfg: TrainConfig, dims: ParallelDims, *,
                   data_parallel: str = "fsdp", schedule: str = "1f1b", resume: bool = False) -> TrainResult:
    """Train like `training.train`, over the processes torchrun started, laid out as `dims`."""
    from ..tokenizer import load_tokenizer

    init_distributed()
    leader = dist.get_rank() == 0
    mesh = build_mesh(dims)
    run_dir, data_dir = Path(cfg.out), Path(cfg.data)
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir / meta["tokenizer"])
    found = list_distributed_checkpoints(run_dir)
    latest = found[-1] if found else None
    if resume:
        if latest is None:
            raise FileNotFoundError(f"--resume: {run_dir / CHECKPOINTS} holds no distributed checkpoint to continue from")
        saved = YuanConfig.from_json(latest / CONFIG_FILE)
        if model_config is not None and model_config.to_dict() != saved.to_dict():
            differ = [k for k, v in saved.to_dict().items() if getattr(model_config, k) != v]
            raise TrainingError(f"checkpoint {latest} has another architecture (different {', '.join(differ)})")
        model_config = saved
    elif latest is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue them or choose another --out")
    if model_config is None:
        raise ConfigError("no model configuration given")
    check_data_matches(model_config, meta, data_dir)

    torch.manual_seed(cfg.seed)
    model = YuanForCausalLM(model_config)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    pm = parallelize(model, mesh, dims, data_parallel=data_parallel, schedule=schedule)
    if cfg.batch_size % pm.rows_multiple:
        raise ValueError(f"batch-size {cfg.batch_size} must be a multiple of {pm.rows_multiple}: each of the "
                         f"{dims.dp} data-parallel ranks takes an equal share of every micro-batch"
                         + (f", cut into {pm.microbatches} pipeline micro-batches" if dims.pp > 1 else ""))
    pm.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
    optimizer = build_optimizer(pm, cfg.lr, cfg.weight_decay, cfg.betas)
    step = load_checkpoint(latest, pm, optimizer)["step"] if resume else 0
    dataset = TokenDataset(data_dir, cfg.seq_len, seed=cfg.seed, fim_rate=cfg.fim_rate,
                           fim_spm_rate=cfg.fim_spm_rate, answer_only=cfg.answer_only)

    if leader:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, resume_step=step if resume else None, tensorboard=cfg.tensorboard) if leader else None
    result = TrainResult(step=step, checkpoint=latest if resume else None)
    samples_per_step = cfg.batch_size * cfg.grad_accum
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"training ({dims})", unit="step",
               disable=not (cfg.progress and leader), dynamic_ncols=True)
    last_log_time, last_log_step = time.perf_counter(), step
    try:
        with StopOnSignal() as stop:
            while step < cfg.max_steps:
                lr, batches = begin_step(optimizer, dataset, cfg, step)
                stats = pm.train_step(batches)
                grad_norm = float(pm.clip_grad_norm_(cfg.grad_clip))
                if not (np.isfinite(stats.loss) and np.isfinite(grad_norm)):
                    raise TrainingError(f"the training loss ({stats.loss}) or gradient norm ({grad_norm}) became "
                                        f"non-finite at step {step + 1}; stopping before it spoils the model "
                                        f"(lower --lr or resume from the last checkpoint)")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update_expert_bias(pm.module)
                step += 1
                result.step = step
                result.losses[step] = stats.loss

                if leader and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    now = time.perf_counter()
                    tokens_per_s = samples_per_step * cfg.seq_len * (step - last_log_step) / (now - last_log_time)
                    last_log_time, last_log_step = now, step
                    record = {"step": step, "loss": round(stats.loss, 6), "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                              "grad_norm": round(grad_norm, 6), "tokens": step * samples_per_step * cfg.seq_len}
                    if model_config.is_moe:
                        record["aux_loss"] = round(stats.aux_loss, 6)
                        record["expert_load"] = [[round(c / max(1, sum(row)), 4) for c in row]
                                                 for row in stats.expert_load]
                    log.write(record)
                    bar.set_postfix_str(f"loss {stats.loss:.3f}  {tokens_per_s:,.0f} tok/s  lr {lr:.2e}", refresh=False)
                bar.update(1)

                if dataset.num_valid_windows and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    result.eval_loss = evaluate(pm, dataset, cfg)
                    if leader and result.eval_loss is not None:
                        log.write({"step": step, "eval_loss": round(result.eval_loss, 6)})
                        bar.write(f"step {step}: held-out loss {result.eval_loss:.4f}")
                stopping = _any_rank(stop.signum != 0)  # ranks may see a signal at different steps
                if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                    extra = {"step": step, "samples_seen": step * samples_per_step,
                             "train_config": dataclasses.asdict(cfg), "parallel": str(dims)}
                    result.checkpoint = save_checkpoint(run_dir / CHECKPOINTS / f"step-{step:07d}", pm, optimizer, extra)
                    if leader:
                        for old in list_distributed_checkpoints(run_dir)[:-cfg.keep_last]:
                            shutil.rmtree(old)
                if stopping:
                    bar.write(f"stop requested: saved {result.checkpoint}; continue with --resume")
                    result.interrupted = True
                    break
    finally:
        bar.close()
        if log is not None:
            log.close()
    if leader and not result.interrupted and result.checkpoint is not None:
        export_checkpoint(result.checkpoint, run_dir / FINAL, tokenizer=tokenizer)
        plot_loss(run_dir)
    dist.barrier()
    return result


def _any_rank(flag: bool) -> bool:
    value = torch.tensor(float(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def evaluate(pm: ParallelModel, dataset: TokenDataset, cfg: TrainConfig) -> float | None:
    """Mean cross entropy per target token over the held-out windows `training.evaluate` uses, in
    global batches of batch-size windows; a last partial batch is cut to a multiple of dp, or left
    out under pipeline parallel (whose buffers keep the first batch's shape). None if none is left."""
    count = min(dataset.num_valid_windows, cfg.eval_batches * cfg.batch_size)
    indices = np.unique(np.linspace(0, dataset.num_valid_windows - 1, count).astype(np.int64))
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



def parallel_layout(dp: int | None, ep: int | None, pp: int | None) -> ParallelDims | None:
    """The layout `yuan train --dp/--ep/--pp` asks for; dp defaults to the processes left over by
    pp. None for a plain single-process run (no flag given and no torchrun world)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if dp is None and ep is None and pp is None and world == 1:
        return None
    pp = pp or 1
    if world % pp:
        raise ValueError(f"pp ({pp}) must divide the number of processes ({world})")
    return ParallelDims(dp=dp or world // pp, ep=ep or 1, pp=pp)
