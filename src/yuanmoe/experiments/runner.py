"""One training run of one model variant, reduced to what the comparison needs.

Every variant of a suite sees the same batches in the same order (sample i of the packed data is a
pure function of the seed), the same number of tokens and the same optimizer settings, so the
held-out loss differs only by the model. The run is the trainer's own loop (`yuanmoe.training`):
AdamW (0.9, 0.95), linear warmup then cosine decay to a tenth, gradient clipping at 1.0, bf16
autocast, the aux-loss-free bias update after each step; checkpoints off (a run is minutes long).
At every held-out evaluation the routing over the held-out windows is recorded too (per layer:
entropy, load CV, co-selection counts), so its evolution over training can be plotted.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import YuanConfig
from ..data import IGNORE_INDEX, TokenDataset
from ..device import autocast, resolve_dtype
from ..info import model_stats
from ..routers import coselection_kl, coselection_matrix, routing_stats
from ..training import TrainConfig, train
from ..training.trainer import heldout_indices
from ..utils import Terminated


@dataclass
class Budget:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    eval_windows: int = 64
    eval_points: int = 8  # held-out evaluations along the run, for the curves
    router_lr_scale: float = 1.0  # learning-rate multiplier of the router weights
    router_weight_decay: bool = True  # weight decay on the router weights


@torch.no_grad()
def routing_picture(model, dataset: TokenDataset, windows: np.ndarray, batch_size: int, dtype: torch.dtype) -> dict:
    """Expert co-selection counts [layers, E, E] and the routing statistics over held-out windows:
    the layer means (`mean/...`) and, per layer, entropy, load CV and co-selection KL. Leaves the
    model in the mode it found it in."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    coselection, stats, tokens = None, [], 0
    for start in range(0, len(windows), batch_size):
        batch = {k: v.to(device) for k, v in dataset.batch(windows[start: start + batch_size], valid=True).items()}
        with autocast(device, dtype):
            routings = model(batch["input_ids"], position_ids=batch["position_ids"], output_router=True).router_outputs
        layers = torch.stack([coselection_matrix(r).cpu() for r in routings])
        coselection = layers if coselection is None else coselection + layers
        stats.append(routing_stats(routings))
        tokens += int((batch["targets"] != IGNORE_INDEX).sum())
    model.train(training)
    layers = {f"layer{i}/{name}": float(np.mean([s[f"layer{i}/{name}"] for s in stats]))
              for i in range(len(coselection)) for name in ("entropy", "load_cv")}
    layers.update({f"layer{i}/coselection_kl": coselection_kl(matrix) for i, matrix in enumerate(coselection)})
    means = {key: float(np.mean([s[key] for s in stats])) for key in stats[0] if key.startswith("mean/")}
    means["mean/coselection_kl"] = float(np.mean([coselection_kl(matrix) for matrix in coselection]))
    return {"coselection": coselection.tolist(), "tokens": tokens, "routing": {**means, **layers}}


def train_variant(name: str, config: YuanConfig, data: Path, budget: Budget, seed: int, run_dir: Path,
                  device: str = "auto", dtype: str = "auto") -> dict:
    """Train `config` from scratch on the first `budget.steps` batches of `data`; returns the
    training curve, held-out losses along the way and at the end, and the final routing picture."""
    cfg = TrainConfig(data=str(data), out=str(run_dir), max_steps=budget.steps, batch_size=budget.batch_size,
                      seq_len=budget.seq_len, lr=budget.lr, weight_decay=budget.weight_decay,
                      warmup_steps=max(1, int(budget.warmup_fraction * budget.steps)),
                      eval_every=max(1, budget.steps // budget.eval_points),
                      eval_batches=math.ceil(budget.eval_windows / budget.batch_size), seed=seed,
                      router_lr_scale=budget.router_lr_scale, router_weight_decay=budget.router_weight_decay,
                      save=False, tensorboard=False, device=device, dtype=dtype)
    tqdm.write(f"{name}, seed {seed}")
    started = time.time()
    dataset = TokenDataset(data, budget.seq_len, seed=seed)
    windows = heldout_indices(dataset, cfg.eval_batches * cfg.batch_size)
    curve = []

    def observe(step: int, model) -> None:
        picture = routing_picture(model, dataset, windows, budget.batch_size, resolve_dtype(cfg.dtype))
        curve.append({"step": step, **picture})

    result = train(config, cfg, observe=observe if config.is_moe else None)
    if result.interrupted:
        raise Terminated() if result.interrupted == signal.SIGTERM else KeyboardInterrupt()
    # The last evaluation is at the last step: its routing is the final picture.
    picture = curve[-1] if curve else {"coselection": None, "routing": None, "tokens": 0}
    sizes = model_stats(config)
    return {
        "variant": name, "seed": seed, "config": config.to_dict(), "budget": asdict(budget),
        "total_params": sizes["total_params"], "active_params": sizes["active_params"],
        "heldout_loss": result.eval_loss, "heldout_tokens": picture["tokens"] or len(windows) * budget.seq_len,
        "train_curve": [result.losses[s] for s in sorted(result.losses)],
        "heldout_curve": [[s, loss] for s, loss in sorted(result.eval_losses.items())],
        "coselection": picture["coselection"], "routing": picture["routing"], "seconds": time.time() - started,
        "routing_curve": [{"step": point["step"], "routing": point["routing"], "coselection": point["coselection"]}
                          for point in curve],
    }
