"""Evaluation results: one JSON file (scores, counts, settings, per-problem records) and a table."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from ..utils import atomic_write_text


def results_document(checkpoint: str | Path, results: dict[str, dict]) -> dict:
    """`results` maps a task name to its result dict (a `score`, counts and settings at least)."""
    return {
        "checkpoint": str(checkpoint),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "results": results,
    }


def write_results(path: str | Path, document: dict) -> None:
    atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def format_table(results: dict[str, dict]) -> str:
    """One row per task: metric, score, the counts it came from, and the settings that matter."""
    rows = [("task", "metric", "score", "n", "settings")]
    for name, r in results.items():
        counts = f"{r['correct']}/{r['total']}" if "correct" in r else str(r.get("tokens", ""))
        score = f"{r['score']:.2f}" if r["metric"] == "perplexity" else f"{100 * r['score']:.2f}%"
        settings = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items() if v is not None)
        rows.append((name, r["metric"], score, counts, settings))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(line.rstrip() for line in lines)
