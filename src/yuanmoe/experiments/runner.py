"""One training run of one model variant, reduced to what the comparison needs.

Every variant of a suite sees the same batches in the same order (sample i of the packed data is a
pure function of the seed), the same number of tokens and the same optimizer settings, so the
held-out loss differs only by the model. The step is the trainer's (`yuanmoe.training`): AdamW
(0.9, 0.95), linear warmup then cosine decay to a tenth, gradient clipping at 1.0, bf16 autocast;
plus the aux-loss-free bias update after each step. No checkpoints: a run is minutes long.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import YuanConfig
from ..data import IGNORE_INDEX, TokenDataset
from ..info import model_stats
from ..model import YuanForCausalLM
from ..routers import coselection_matrix, routing_stats, update_expert_bias
from ..training.optim import build_optimizer, learning_rate
from ..training.trainer import train_step


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


def heldout_loss(model: YuanForCausalLM, batch: dict, output_router: bool):
    """(summed token loss, token count, router outputs); targets are already shifted."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch["input_ids"], position_ids=batch["position_ids"], output_router=output_router)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch["targets"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((batch["targets"] != IGNORE_INDEX).sum()), out.router_outputs


def heldout_windows(dataset: TokenDataset, n: int) -> np.ndarray:
    """n held-out windows spread evenly over all inputs' held-out data (each input in proportion)."""
    total = dataset.num_valid_windows
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))


@torch.no_grad()
def evaluate(model: YuanForCausalLM, dataset: TokenDataset, budget: Budget, with_routing: bool = False) -> dict:
    model.eval()
    windows = heldout_windows(dataset, budget.eval_windows)
    total_loss, total_tokens = 0.0, 0
    coselection, stats = None, []
    for start in range(0, len(windows), budget.batch_size):
        batch = dataset.batch(windows[start: start + budget.batch_size], valid=True)
        loss, count, routings = heldout_loss(model, batch, output_router=with_routing)
        total_loss, total_tokens = total_loss + loss, total_tokens + count
        if with_routing:
            layers = torch.stack([coselection_matrix(r) for r in routings])  # [layers, E, E]
            coselection = layers if coselection is None else coselection + layers
            stats.append(routing_stats(routings))
    model.train()
    result = {"loss": total_loss / max(total_tokens, 1), "tokens": total_tokens}
    if with_routing:
        result["coselection"] = coselection.tolist()
        result["routing"] = {key: float(np.mean([s[key] for s in stats]))
                             for key in stats[0] if key.startswith("mean/")}
    return result


def train_variant(name: str, config: YuanConfig, dataset: TokenDataset, budget: Budget, seed: int) -> dict:
    """Train `config` from scratch on the first `budget.steps` batches of `dataset`; returns the
    training curve, held-out losses along the way and at the end, and the final routing picture."""
    torch.manual_seed(seed)
    model = YuanForCausalLM(config).train()
    optimizer = build_optimizer(model, budget.lr, budget.weight_decay, (0.9, 0.95))
    warmup = max(1, int(budget.warmup_fraction * budget.steps))
    eval_every = max(1, budget.steps // budget.eval_points)
    curve, heldout = [], []
    started = time.time()
    bar = tqdm(range(budget.steps), desc=f"{name} seed {seed}", unit="step", dynamic_ncols=True, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, budget.lr, warmup, budget.steps, 0.1)
        indices = range(step * budget.batch_size, (step + 1) * budget.batch_size)
        loss, _, _ = train_step(model, [dataset.batch(indices)], bf16=True)
        if not math.isfinite(loss):
            raise ValueError(f"{name} (seed {seed}) diverged at step {step + 1}; lower --lr")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_bias(model)
        curve.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % eval_every == 0 and step + 1 < budget.steps:
            heldout.append([step + 1, evaluate(model, dataset, budget)["loss"]])
    final = evaluate(model, dataset, budget, with_routing=config.is_moe)
    heldout.append([budget.steps, final["loss"]])
    sizes = model_stats(config)
    return {
        "variant": name, "seed": seed, "config": config.to_dict(), "budget": asdict(budget),
        "total_params": sizes["total_params"], "active_params": sizes["active_params"],
        "heldout_loss": final["loss"], "heldout_tokens": final["tokens"], "train_curve": curve,
        "heldout_curve": heldout, "coselection": final.get("coselection"), "routing": final.get("routing"),
        "seconds": time.time() - started,
    }
