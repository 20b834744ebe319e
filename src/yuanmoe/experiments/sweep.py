"""`yuan experiment routers --sweep`: the gap of each router variant to the baseline as a function
of the training-token budget, at several model widths, with a fitted trend.

Every (width, budget) point is an ordinary router suite in OUT/width{W}-tokens{T} (resumable: a
rerun reuses its finished runs), all on one prepared corpus; its results.md is written, its plots
are not (the plain suite with that point's settings and --out draws them from the stored runs).
The trend is a least-squares line of the per-seed paired gaps against log10(tokens); where it
points towards zero, it says at what budget it would cross if it continued.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import YuanConfig
from ..utils import atomic_write_text
from .report import pyplot, save_figure
from .suites import PAPER_TABLE1, Scale, check_matched_parameters, run_suite

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9}


def token_count(text: str) -> int:
    """'512k', '1M', '2.5e6' or '1048576' as a number of tokens."""
    text = text.strip().lower()
    factor = _SUFFIXES.get(text[-1:], 1.0)
    tokens = float(text[:-1] if text[-1:] in _SUFFIXES else text) * factor
    if not 1 <= tokens < math.inf:
        raise ValueError(f"a token budget must be at least 1 token and finite, got {text!r}")
    return int(tokens)


def sweep_scales(scale: Scale, widths: list[int], budgets: list[int]) -> list[tuple[int, int, Scale]]:
    """(width, tokens, scale) per point, small budgets first: the width scales the expert FFN with it
    (same ratio as `scale`), and a budget is rounded to whole steps of batch x seq-len tokens."""
    tokens_per_step = scale.batch_size * scale.seq_len
    points = []
    for tokens in sorted(budgets):
        steps = max(1, round(tokens / tokens_per_step))
        for width in widths:
            ffn = max(1, round(scale.ffn_hidden_size * width / scale.hidden_size))
            points.append((width, steps * tokens_per_step,
                           dataclasses.replace(scale, hidden_size=width, ffn_hidden_size=ffn, steps=steps)))
    return points


def fit_trend(tokens: list[int], gaps: list[float]) -> dict | None:
    """Least squares gap = a + b log10(tokens) over per-seed gaps, with the slope's standard error
    and, if the line heads towards zero beyond the largest budget, the budget where it gets there."""
    x, y = np.log10(np.asarray(tokens, dtype=np.float64)), np.asarray(gaps, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    slope_se = math.sqrt(float(residual @ residual) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    at_largest = intercept + slope * x.max()
    significant = abs(slope) > 2 * slope_se
    crossing = 10 ** (-intercept / slope) if slope != 0 and at_largest * slope < 0 else None
    if at_largest < 0:
        verdict = "the fitted gap is already negative at the largest budget (the paper's sign)"
    elif crossing is not None:
        verdict = (f"the gap shrinks by {-slope:.4f} +- {slope_se:.4f} nats per 10x tokens"
                   f"{'' if significant else ' (less than 2 standard errors from no change)'}; continued, "
                   f"it would cross zero at about {crossing:.3g} tokens")
    else:
        verdict = (f"the gap does not shrink (slope {slope:+.4f} +- {slope_se:.4f} nats per 10x tokens): "
                   f"it does not point towards the paper's sign")
    return {"intercept": float(intercept), "slope_per_decade": float(slope), "slope_stderr": slope_se,
            "slope_significant": bool(significant), "gap_at_largest": float(at_largest),
            "crossing_tokens": crossing, "points": len(x), "verdict": verdict}


def run_sweep(out: Path, scale: Scale, widths: list[int], budgets: list[int],
              make_variants: Callable[[Scale], dict[str, YuanConfig]], baseline: str, data: Path, command: str,
              device: str, dtype: str, optimizer: dict) -> dict:
    """Run every point's suite; after each point (so that an interrupted sweep shows what it has),
    write sweep.json, sweep.md and gap_vs_tokens.png in OUT. Returns the summary."""
    points, summary = [], {}
    for width, tokens, point_scale in sweep_scales(scale, widths, budgets):
        variants = make_variants(point_scale)
        check_matched_parameters(variants)
        rows = run_suite(out / f"width{width}-tokens{tokens}", f"Routers at width {width}, {tokens:,} tokens",
                         variants, point_scale, data, baseline, PAPER_TABLE1, "paper (Table 1)", command, device,
                         dtype, optimizer, plots=False)
        for row in rows:
            if "vs_baseline" in row:
                diff = row["vs_baseline"]
                points.append({"variant": row["variant"], "width": width, "tokens": tokens, "steps": point_scale.steps,
                               "gap": diff["mean"], "stderr": diff["stderr"], "per_seed": diff["per_seed"]})
        summary = {"command": command, "baseline": baseline, "widths": widths, "points": points,
                   "fits": fit_all(points, widths)}
        atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out / "sweep.md", sweep_markdown(summary, scale))
        plot_gaps(out / "gap_vs_tokens.png", summary)
    return summary


def fit_all(points: list[dict], widths: list[int]) -> dict:
    """Per variant, the trend at each width and, with several widths, over all of them."""
    fits = {}
    for variant in dict.fromkeys(p["variant"] for p in points):
        mine = [p for p in points if p["variant"] == variant]
        groups = {f"width {w}": [p for p in mine if p["width"] == w] for w in widths}
        if len(widths) > 1:
            groups["all widths"] = mine
        fits[variant] = {name: fit_trend([p["tokens"] for p in group for _ in p["per_seed"]],
                                         [gap for p in group for gap in p["per_seed"]])
                         for name, group in groups.items()}
    return fits


def sweep_markdown(summary: dict, scale: Scale) -> str:
    baseline = summary["baseline"]
    lines = [f"# Router gap to {baseline} vs training tokens", "", f"Command: `{summary['command']}`", "",
             f"Each point: {scale.num_layers} layers, {scale.num_experts} experts top-{scale.top_k}, expert FFN "
             f"{scale.ffn_hidden_size / scale.hidden_size:g}x the width, batch {scale.batch_size} x {scale.seq_len} "
             f"tokens, peak lr {scale.lr}. Gap = held-out loss of the variant - {baseline} (nats), paired by seed; "
             f"mean +- standard error over seeds.", "",
             "| variant | width | tokens | steps | gap | per seed |", "|---|---|---|---|---|---|"]
    for p in summary["points"]:
        lines.append(f"| {p['variant']} | {p['width']} | {p['tokens']:,} | {p['steps']} | {p['gap']:+.4f} +- "
                     f"{p['stderr']:.4f} | {', '.join(f'{g:+.3f}' for g in p['per_seed'])} |")
    lines += ["", "Trend: least squares of the per-seed gaps on log10(tokens).", ""]
    for variant, fits in summary["fits"].items():
        for group, fit in fits.items():
            text = "too few points for a trend" if fit is None else fit["verdict"]
            lines.append(f"* {variant} - {baseline}, {group}: {text}.")
    return "\n".join(lines) + "\n"


def plot_gaps(path: Path, summary: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "os^Dv"
    for i, (variant, fits) in enumerate(summary["fits"].items()):
        for j, width in enumerate(summary["widths"]):
            mine = [p for p in summary["points"] if p["variant"] == variant and p["width"] == width]
            tokens = np.asarray([p["tokens"] for p in mine], dtype=np.float64)
            ax.errorbar(tokens, [p["gap"] for p in mine], yerr=[p["stderr"] for p in mine], color=f"C{i}",
                        marker=markers[j % len(markers)], capsize=3, linestyle="none",
                        label=f"{variant}, width {width}")
            fit = fits.get(f"width {width}")
            if fit is not None and len(tokens):
                end = tokens.max() * 10 if fit["crossing_tokens"] is None else min(fit["crossing_tokens"],
                                                                                   tokens.max() * 1000)
                xs = np.geomspace(tokens.min(), max(end, tokens.max()), 50)
                ax.plot(xs, fit["intercept"] + fit["slope_per_decade"] * np.log10(xs), color=f"C{i}",
                        linestyle=["--", ":", "-."][j % 3], alpha=0.7)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"held-out loss - {summary['baseline']} (nats), mean +- s.e.")
    ax.set_title("router gap vs token budget (lines: fitted trend, extended)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
