"""`yuan experiment compare BASE OTHER...`: recipe ablations side by side, paired by seed.

Each folder is a finished `yuan experiment routers|experts --out` run of the same suite with one
recipe (one flag) changed. Per folder the table shows each variant's held-out loss, the gap of every
variant to the suite's baseline variant (e.g. attention - linear), and how the flag moved the gap
and each variant's own loss against BASE: all as paired differences over the seeds both folders
ran (same seed = same initialisation and data order), mean +- standard error. A variant an ablation
did not run (a flag that cannot touch it, e.g. a temperature of the attention router for `linear`)
is taken from BASE and marked so.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np

from ..utils import atomic_write_text

# Options that say where a run reads and writes, not what it trains.
_PLACE = {"--out", "--prepared", "--data", "--device", "--routers", "--expert-counts"}


def load_suite(folder: Path) -> dict:
    """A suite folder's results.json as {variant: {seed: loss}} plus its command and baseline."""
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no results.json: give the --out folder of a finished "
                                f"`yuan experiment routers` or `experts` run")
    try:
        results = json.loads(path.read_text())
        losses = {row["variant"]: dict(zip(row["seeds"], row["heldout_loss"])) for row in results["variants"]}
        suite = {"folder": str(folder), "command": results.get("command", ""), "baseline": results["baseline"],
                 "budget": results["budget"], "losses": losses}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not the results.json of a `yuan experiment` run "
                         f"({type(exc).__name__}: {exc}); rerun that suite's command to rewrite it") from None
    # A mean or a gap over no seeds is no result.
    empty = next((name for name, seeds in losses.items() if not seeds), None)
    if not losses or empty is not None:
        raise ValueError(f"{path} holds no runs{'' if empty is None else ' of ' + empty}; rerun that suite's "
                         f"command to rewrite it")
    return suite


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """a - b over the seeds both have: mean, standard error (None for one seed), the seeds' values."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
    stderr = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else None
    return {"mean": float(diffs.mean()), "stderr": stderr, "per_seed": diffs.tolist(), "seeds": seeds}


def recipe_flags(command: str, base_command: str) -> str:
    """The options of `command` that differ from `base_command`, leaving out where it ran."""
    def options(text: str) -> dict[str, str]:
        words, found = shlex.split(text), {}
        for i, word in enumerate(words):
            if word.startswith("--") and word not in _PLACE:
                following = words[i + 1] if i + 1 < len(words) else ""
                found[word] = "" if following.startswith("--") or not following else following
        return found
    mine, base = options(command), options(base_command)
    changed = [f"{k} {v}".strip() for k, v in mine.items() if base.get(k) != v]
    changed += [f"(no {k})" for k in base if k not in mine]
    return " ".join(changed) or "same options"


def compare(base_folder: Path, others: list[Path]) -> dict:
    base = load_suite(base_folder)
    baseline, variants = base["baseline"], list(base["losses"])
    rows = []
    for suite in [base] + [load_suite(folder) for folder in others]:
        if suite is not base and not set(suite["losses"]) & set(variants):
            raise ValueError(f"{suite['folder']} ran {', '.join(suite['losses'])} and {base['folder']} "
                             f"{', '.join(variants)}: compare folders of the same suite")
        if suite is not base and suite["budget"]["steps"] != base["budget"]["steps"]:
            raise ValueError(f"{suite['folder']} trained {suite['budget']['steps']} steps and {base['folder']} "
                             f"{base['budget']['steps']}: compare folders of the same budget")
        losses = {v: suite["losses"].get(v, base["losses"][v]) for v in variants}
        borrowed = [v for v in variants if v not in suite["losses"]]
        row = {"folder": suite["folder"], "recipe": "official recipe" if suite is base else
               recipe_flags(suite["command"], base["command"]), "borrowed": borrowed,
               "mean": {v: float(np.mean(list(losses[v].values()))) for v in variants},
               "gap": {v: paired(losses[v], losses[baseline]) for v in variants if v != baseline}}
        if suite is not base:
            base_gaps = {v: {s: base["losses"][v][s] - base["losses"][baseline][s]
                             for s in base["losses"][v] if s in base["losses"][baseline]} for v in row["gap"]}
            row["gap_change"] = {v: paired({s: d for s, d in zip(g["seeds"], g["per_seed"])}, base_gaps[v])
                                 for v, g in row["gap"].items() if g is not None}
            row["change"] = {v: paired(losses[v], base["losses"][v]) for v in variants if v not in borrowed}
        rows.append(row)
    return {"base": str(base_folder), "baseline": baseline, "variants": variants, "rows": rows}


def _pm(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:+.4f}" + ("" if stat["stderr"] is None else f" +- {stat['stderr']:.4f}")


def compare_markdown(summary: dict) -> str:
    baseline, variants = summary["baseline"], summary["variants"]
    others = [v for v in variants if v != baseline]
    header = (["folder", "recipe"] + variants + [f"gap {v} - {baseline}" for v in others]
              + [f"change of gap ({v})" for v in others] + [f"change, {v}" for v in variants]
              + [f"gap per seed ({v})" for v in others])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        cells = [row["folder"], row["recipe"] if row["recipe"] == "official recipe" else f"`{row['recipe']}`"]
        cells += [f"{row['mean'][v]:.4f}" + (" *" if v in row["borrowed"] else "") for v in variants]
        cells += [_pm(row["gap"][v]) for v in others]
        cells += [_pm(row.get("gap_change", {}).get(v)) for v in others]
        cells += [_pm(row["change"].get(v)) if "change" in row else "-" for v in variants]
        cells += [", ".join(f"{d:+.3f}" for d in row["gap"][v]["per_seed"]) if row["gap"][v] else "-" for v in others]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Held-out loss (nats), mean over seeds. Gaps are paired by seed (mean +- standard error); "
              f"'change' columns pair each folder's seeds with {summary['base']}'s: the change of a gap is "
              f"(gap with the flag) - (gap without), per seed."]
    if any(row["borrowed"] for row in summary["rows"]):
        lines.append(f"* not run in that folder (its flag does not touch the variant): {summary['base']}'s runs "
                     f"stand in.")
    return "\n".join(lines) + "\n"


def run_compare(args) -> int:
    summary = compare(args.base, args.others)
    text = compare_markdown(summary)
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out, text)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def register(suites) -> None:
    p = suites.add_parser("compare", help="recipe ablations side by side: gaps and changes against a base "
                                          "folder, paired by seed")
    p.add_argument("base", type=Path, help="--out folder of the official-recipe run")
    p.add_argument("others", type=Path, nargs="+", help="--out folders of the same suite with one flag changed")
    p.add_argument("--out", type=Path, help="also write this markdown file (and its .json beside it)")
    p.set_defaults(func=run_compare)
