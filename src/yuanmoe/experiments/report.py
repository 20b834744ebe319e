"""Turning a suite's runs into results.json, results.md, loss_curves.png, co-selection heatmaps and
the routing statistics over training."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from ..utils import atomic_write_bytes, atomic_write_text


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarize(runs: list[dict], baseline: str) -> list[dict]:
    """One row per variant, in run order: sizes, held-out loss over seeds, and the paired
    difference to `baseline` (same seeds, so same data order and, per seed, comparable noise)."""
    variants = list(dict.fromkeys(run["variant"] for run in runs))
    by_variant = {v: {run["seed"]: run for run in runs if run["variant"] == v} for v in variants}
    rows = []
    for variant in variants:
        seeds = by_variant[variant]
        losses = [seeds[s]["heldout_loss"] for s in sorted(seeds)]
        mean, std = mean_std(losses)
        first = seeds[min(seeds)]
        row = {"variant": variant, "total_params": first["total_params"], "active_params": first["active_params"],
               "seeds": sorted(seeds), "heldout_loss": losses, "mean": mean, "std": std,
               "routing": first["routing"], "routing_mean": mean_routing([seeds[s]["routing"] for s in sorted(seeds)])}
        paired = [seeds[s]["heldout_loss"] - by_variant[baseline][s]["heldout_loss"]
                  for s in sorted(seeds) if s in by_variant.get(baseline, {})]
        if variant != baseline and paired:
            diff_mean, diff_std = mean_std(paired)
            stderr = diff_std / math.sqrt(len(paired))
            row["vs_baseline"] = {"mean": diff_mean, "std": diff_std, "stderr": stderr, "n": len(paired),
                                  "per_seed": paired,
                                  "within_noise": abs(diff_mean) < 2 * stderr if len(paired) > 1 else None}
        rows.append(row)
    return rows


def mean_routing(per_seed: list[dict | None]) -> dict | None:
    """Each routing statistic averaged over seeds (None for a dense model)."""
    if not per_seed or per_seed[0] is None:
        return None
    return {key: float(np.mean([routing[key] for routing in per_seed])) for key in per_seed[0]}


def write_results(out: Path, title: str, runs: list[dict], baseline: str, paper: dict[str, float],
                  paper_label: str, command: str, plots: bool = True) -> list[dict]:
    """results.json and results.md, and with `plots` the loss curves, heatmaps and routing curves."""
    rows = summarize(runs, baseline)
    budget = runs[0]["budget"]
    atomic_write_text(out / "results.json", json.dumps(
        {"title": title, "command": command, "budget": budget, "baseline": baseline, "paper": paper,
         "variants": rows, "runs": [without_coselection(run) for run in runs]}, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(title, rows, baseline, paper, paper_label, budget,
                                                           runs[0]["heldout_tokens"], command))
    if not plots:
        return rows
    plot_loss_curves(out / "loss_curves.png", runs, budget)
    firsts = {variant: min((run for run in runs if run["variant"] == variant), key=lambda run: run["seed"])
              for variant in dict.fromkeys(run["variant"] for run in runs)}
    routed = {variant: run for variant, run in firsts.items() if run["coselection"] is not None}
    for variant, run in routed.items():
        plot_coselection(out / f"coselection_{file_stem(variant)}.png", variant, run)
    if routed:
        plot_coselection_side_by_side(out / "coselection_side_by_side.png", routed)
        plot_routing_over_training(out / "routing_over_training.png", runs, budget)
        plot_coselection_over_training(out / "coselection_over_training.png", routed)
    return rows


def without_coselection(run: dict) -> dict:
    """The run for results.json: the co-selection matrices are in the plots and in runs/."""
    slim = {k: v for k, v in run.items() if k != "coselection"}
    slim["routing_curve"] = [{k: v for k, v in point.items() if k != "coselection"}
                             for point in run.get("routing_curve", [])]
    return slim


def file_stem(variant: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant)


def results_markdown(title: str, rows: list[dict], baseline: str, paper: dict[str, float], paper_label: str,
                     budget: dict, heldout_tokens: int, command: str) -> str:
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"Budget per run: {budget['steps']} steps x {budget['batch_size']} x {budget['seq_len']} tokens = "
             f"{budget['steps'] * budget['batch_size'] * budget['seq_len']:,} training tokens, peak lr "
             f"{budget['lr']}; held-out loss over {heldout_tokens:,} tokens (mean token cross-entropy, nats).", "",
             f"| variant | params | active | held-out loss (mean +- std) | per seed | vs {baseline} (paired) "
             f"| load max/mean | load CV | routing entropy | {paper_label} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        diff = row.get("vs_baseline")
        diff_text = "-" if diff is None else f"{diff['mean']:+.4f} +- {diff['stderr']:.4f} s.e." + {
            True: " (within noise)", False: "", None: " (one seed: noise unknown)"}[diff["within_noise"]]
        routing = row["routing"] or {}
        cells = [row["variant"], f"{row['total_params'] / 1e6:.3f}M", f"{row['active_params'] / 1e6:.3f}M",
                 f"{row['mean']:.4f} +- {row['std']:.4f}", ", ".join(f"{v:.4f}" for v in row["heldout_loss"]),
                 diff_text, f"{routing.get('mean/max_over_mean', float('nan')):.2f}",
                 f"{routing.get('mean/load_cv', float('nan')):.2f}",
                 f"{routing.get('mean/entropy', float('nan')):.2f}",
                 f"{paper[row['variant']]:.3f}" if row["variant"] in paper else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired differences use the same seed (same initialisation seed and data order) for both "
              "variants, shown as mean +- standard error over seeds; 'within noise' means less than two standard "
              "errors. Routing statistics are from the final held-out pass of the first seed, averaged over layers "
              "(eval mode: expert choice shows its causal token-choice fallback there).", ""]
    lines += routing_table(rows)
    return "\n".join(lines)


def routing_table(rows: list[dict]) -> list[str]:
    """Per layer, the final routing entropy, load CV and co-selection KL of every variant (mean over seeds)."""
    routed = [row for row in rows if row.get("routing_mean")]
    if not routed:
        return []
    layers = sorted({int(key.split("/")[0][5:]) for row in routed for key in row["routing_mean"]
                     if key.startswith("layer")})
    if not layers:
        return []
    lines = ["Routing per layer at the end of training, mean over seeds: entropy (nats) / load CV / co-selection "
             "KL (nats; 0 = experts pair up as their loads alone predict, larger = particular pairs preferred).",
             "", "| variant | " + " | ".join(f"layer {i}" for i in layers) + " |",
             "|---|" + "---|" * len(layers)]
    for row in routed:
        stats = row["routing_mean"]
        cells = [f"{stats[f'layer{i}/entropy']:.2f} / {stats[f'layer{i}/load_cv']:.2f} / "
                 f"{stats[f'layer{i}/coselection_kl']:.2f}" for i in layers]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return lines + [""]


def smooth(values: list[float], window: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(array)))
    return np.convolve(array, np.ones(window) / window, mode="valid")


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(path: Path, runs: list[dict], budget: dict) -> None:
    plt = pyplot()
    tokens_per_step = budget["batch_size"] * budget["seq_len"]
    window = max(1, budget["steps"] // 20)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, variant in enumerate(dict.fromkeys(run["variant"] for run in runs)):
        mine = [run for run in runs if run["variant"] == variant]
        color = f"C{i}"
        train = np.mean([smooth(run["train_curve"], window) for run in mine], axis=0)
        x = (np.arange(len(train)) + window) * tokens_per_step
        ax.plot(x, train, color=color, alpha=0.6, label=f"{variant} train")
        steps = [step for step, _ in mine[0]["heldout_curve"]]
        heldout = np.mean([[loss for _, loss in run["heldout_curve"]] for run in mine], axis=0)
        ax.plot(np.asarray(steps) * tokens_per_step, heldout, "o--", color=color, label=f"{variant} held-out")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token), mean over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def coselection_shares(run: dict) -> np.ndarray:
    """[L, E, E] share of the held-out tokens served by both experts, the diagonal (each expert's
    own load, on another scale) left out as NaN."""
    share = np.asarray(run["coselection"], dtype=np.float64) / max(run["heldout_tokens"], 1)
    for matrix in share:
        np.fill_diagonal(matrix, np.nan)
    return share


def draw_coselection(fig, ax, matrix: np.ndarray, title: str, vmax: float | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_ylabel("expert", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, fraction=0.046)


def plot_coselection(path: Path, variant: str, run: dict) -> None:
    plt = pyplot()
    share = coselection_shares(run)
    cols = min(4, len(share))
    rows = math.ceil(len(share) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, 3.4 * cols), 3.2 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(share):]:
        ax.axis("off")
    for layer, (ax, matrix) in enumerate(zip(axes.flat, share)):
        draw_coselection(fig, ax, matrix, f"layer {layer}")
    fig.suptitle(f"{variant}, seed {run['seed']}: share of held-out tokens\nserved by both experts "
                 f"(diagonal left out)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_coselection_side_by_side(path: Path, runs: dict[str, dict]) -> None:
    """One row per variant (its first seed), one column per layer, on one colour scale per layer."""
    plt = pyplot()
    shares = {variant: coselection_shares(run) for variant, run in runs.items()}
    num_layers = max(len(share) for share in shares.values())
    fig, axes = plt.subplots(len(shares), num_layers, figsize=(3.4 * num_layers, 3.0 * len(shares) + 0.6),
                             squeeze=False)
    for layer in range(num_layers):
        vmax = max(float(np.nanmax(share[layer])) for share in shares.values() if layer < len(share))
        for row, (variant, share) in enumerate(shares.items()):
            if layer < len(share):
                draw_coselection(fig, axes[row, layer], share[layer], f"{variant}, layer {layer}", vmax or None)
            else:
                axes[row, layer].axis("off")
    fig.suptitle("share of held-out tokens served by both experts (diagonal left out), first seed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_coselection_over_training(path: Path, runs: dict[str, dict], layer: int = 0, snapshots: int = 4) -> None:
    """How the expert pairs form: one row per variant (its first seed), one column per moment of
    training (evenly spaced held-out evaluations, the last one included), one MoE layer, one colour
    scale per column so the variants compare at equal training."""
    plt = pyplot()
    curves = {variant: run["routing_curve"] for variant, run in runs.items() if run.get("routing_curve")}
    if not curves:
        return
    count = min(len(curve) for curve in curves.values())
    picks = sorted({round(i * (count - 1) / max(1, snapshots - 1)) for i in range(snapshots)})
    tokens_per_step = next(iter(runs.values()))["budget"]["batch_size"] * next(iter(runs.values()))["budget"]["seq_len"]
    shares = {variant: [coselection_shares({"coselection": curve[i]["coselection"],
                                            "heldout_tokens": runs[variant]["heldout_tokens"]})[layer] for i in picks]
              for variant, curve in curves.items()}
    fig, axes = plt.subplots(len(curves), len(picks), figsize=(3.4 * len(picks), 3.0 * len(curves) + 0.6),
                             squeeze=False)
    for column, i in enumerate(picks):
        vmax = max(float(np.nanmax(share[column])) for share in shares.values())
        for row, (variant, curve) in enumerate(curves.items()):
            draw_coselection(fig, axes[row, column], shares[variant][column],
                             f"{variant}, {curve[i]['step'] * tokens_per_step:,} tokens", vmax or None)
    fig.suptitle(f"layer {layer}: share of held-out tokens served by both experts over training (diagonal left out), "
                 f"first seed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


ROUTING_PANELS = (("entropy", "routing entropy (nats)"), ("load_cv", "load CV (std / mean)"),
                  ("coselection_kl", "co-selection KL (nats)"))


def plot_routing_over_training(path: Path, runs: list[dict], budget: dict) -> None:
    """Held-out routing statistics at each evaluation, mean over seeds: per layer (thin) and the
    layer mean (thick), one colour per variant."""
    plt = pyplot()
    tokens_per_step = budget["batch_size"] * budget["seq_len"]
    fig, axes = plt.subplots(1, len(ROUTING_PANELS), figsize=(5.0 * len(ROUTING_PANELS), 4.2))
    for i, variant in enumerate(dict.fromkeys(run["variant"] for run in runs)):
        curves = [run.get("routing_curve") for run in runs if run["variant"] == variant]
        if not all(curves):
            continue
        steps = np.asarray([point["step"] for point in curves[0]]) * tokens_per_step
        keys = curves[0][0]["routing"]
        for ax, (stat, label) in zip(axes, ROUTING_PANELS):
            for key in [k for k in keys if k.startswith("layer") and k.endswith("/" + stat)]:
                values = np.mean([[point["routing"][key] for point in curve] for curve in curves], axis=0)
                ax.plot(steps, values, color=f"C{i}", alpha=0.35, linewidth=0.8)
            values = np.mean([[point["routing"][f"mean/{stat}"] for point in curve] for curve in curves], axis=0)
            ax.plot(steps, values, "o-", color=f"C{i}", linewidth=2, label=variant)
            ax.set_xlabel("training tokens")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out routing over training, mean over seeds (thin: single layers)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
