"""Where a run's numbers go: metrics.jsonl (one JSON object per record), TensorBoard, loss.png."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..utils import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to `run/metrics.jsonl` and mirrors their scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            # Steps after the checkpoint will be run again: drop their old records.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            for layer, load in enumerate(record.get("expert_load", [])):
                # The busiest expert's share relative to a perfectly even split (1.0 = balanced).
                self.writer.add_scalar(f"expert_load/layer{layer}_max_over_mean", max(load) * len(load), record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_loss(run_dir: Path) -> Path:
    """loss.png: training loss per logged step and the held-out loss, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = Path(run_dir) / PLOT_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path
