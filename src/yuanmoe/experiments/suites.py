"""The paper's two comparisons at small scale: routers at equal parameters (Table 1) and expert
counts at equal active parameters (Table 2)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ROUTERS, YuanConfig
from ..routers import shared_expert_config
from ..utils import atomic_write_text
from .corpus import open_dataset
from .report import file_stem, write_results
from .runner import Budget, train_variant

# Test loss in the paper (Yuan 2.0-M32 report): Table 1 at 8 experts, 30B tokens; Table 2 at top-2, 50B tokens.
PAPER_TABLE1 = {"attention": 2.109, "linear": 2.117, "shared": 2.117}
PAPER_TABLE2 = {"8 experts": 1.820, "16 experts": 1.787, "32 experts": 1.754}
ROUTER_VARIANTS = (*ROUTERS, "shared")  # every router, and DeepSeekMoE's shared experts
PARAMETER_TOLERANCE = 0.01  # router variants must match the first one's total parameters this closely


@dataclass
class Scale:
    """Model size and training budget of every run in a suite."""

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int  # of one expert
    num_experts: int
    top_k: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    seeds: int
    vocab_size: int
    eval_windows: int


# --quick: a few minutes on a 2-core CPU. Default: what one such CPU trains in well under an hour.
QUICK = Scale(hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128, num_experts=8, top_k=2,
              seq_len=128, batch_size=8, steps=150, lr=3e-3, seeds=2, vocab_size=2048, eval_windows=48)
DEFAULT = Scale(hidden_size=128, num_layers=4, num_heads=4, ffn_hidden_size=256, num_experts=8, top_k=2,
                seq_len=256, batch_size=8, steps=500, lr=2e-3, seeds=3, vocab_size=4096, eval_windows=96)


def base_config(scale: Scale, meta: dict) -> YuanConfig:
    return YuanConfig(vocab_size=meta["vocab_size"], hidden_size=scale.hidden_size, num_layers=scale.num_layers,
                      num_heads=scale.num_heads, attention_projection_size=scale.hidden_size,
                      max_position_embeddings=scale.seq_len, num_experts=scale.num_experts, top_k=scale.top_k,
                      ffn_hidden_size=scale.ffn_hidden_size, router="attention", eod_token_id=meta["eod_id"],
                      sep_token_id=meta["sep_id"], pad_token_id=meta["pad_id"])


def router_variants(base: YuanConfig, names: list[str]) -> dict[str, YuanConfig]:
    """The same model with each router; `shared` is DeepSeekMoE's fine-grained split of the same
    expert parameters with 2 always-on experts and a linear gate (the paper's 2 shared + top-2 of 14)."""
    unknown = [name for name in names if name not in ROUTER_VARIANTS]
    if unknown:
        raise ValueError(f"unknown router variant {unknown[0]!r}; choose from {', '.join(ROUTER_VARIANTS)}")
    return {name: shared_expert_config(base) if name == "shared" else base.replace(router=name) for name in names}


def expert_variants(base: YuanConfig, counts: list[int]) -> dict[str, YuanConfig]:
    """The same active parameters (top-k experts of the same width) with more experts to choose from."""
    return {f"{count} experts": base.replace(num_experts=count) for count in counts}


def check_matched_parameters(variants: dict[str, YuanConfig]) -> None:
    from ..info import model_stats

    totals = {name: model_stats(config)["total_params"] for name, config in variants.items()}
    reference_name, reference = next(iter(totals.items()))
    for name, total in totals.items():
        if abs(total - reference) > PARAMETER_TOLERANCE * reference:
            raise ValueError(f"variant {name} has {total:,} parameters, more than 1% away from {reference_name} "
                             f"({reference:,}); the comparison would not be at equal size")


def run_suite(out: Path, title: str, variants: dict[str, YuanConfig], scale: Scale, data: Path, baseline: str,
              paper: dict[str, float], paper_label: str, command: str, device: str = "auto",
              dtype: str = "auto", optimizer: dict | None = None, plots: bool = True) -> list[dict]:
    """Train every variant with every seed (reusing runs already in OUT/runs with the same settings)
    and write the report (with its plots if `plots`); returns its rows. `optimizer` holds Budget's
    router optimizer settings."""
    budget = Budget(steps=scale.steps, batch_size=scale.batch_size, seq_len=scale.seq_len, lr=scale.lr,
                    eval_windows=scale.eval_windows, **(optimizer or {}))
    runs = []
    for seed in range(scale.seeds):
        open_dataset(data, scale.seq_len, seed)  # one clear sentence when the held-out part is too short
        for name, config in variants.items():
            path = out / "runs" / f"{file_stem(name)}-seed{seed}.json"
            settings = {"config": config.to_dict(), "budget": dataclasses.asdict(budget), "data": str(data)}
            if path.is_file():
                stored = json.loads(path.read_text())
                if {key: stored.get(key) for key in settings} == settings:
                    runs.append(stored)
                    continue
            run = {**train_variant(name, config, data, budget, seed, path.with_suffix(""), device, dtype),
                   "data": str(data)}
            atomic_write_text(path, json.dumps(run) + "\n")
            runs.append(run)
    runs.sort(key=lambda run: (list(variants).index(run["variant"]), run["seed"]))
    return write_results(out, title, runs, baseline, paper, paper_label, command, plots)
