"""`yuan eval TASK CKPT`, `yuan eval perplexity CKPT DATA` and `yuan eval harness CKPT --tasks ...`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..device import add_device_options
from .readers import HUMANEVAL_PROMPT_STYLES
from .tasks import MC_SCORINGS, TASKS

# The official benchmark files, beside the repository (where this project keeps its shared inputs).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "yuan" / "datasets"


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score a checkpoint on benchmarks or measure its perplexity",
                                   description="Score a checkpoint on the benchmarks the released model is "
                                               "judged on, or measure its perplexity.")
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (with its tokenizer)")
    common.add_argument("--limit", type=int, help="score only the first N problems (MMLU: round-robin over subjects) or documents")
    common.add_argument("--out", help="write the results as JSON to this file")
    common.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    add_device_options(common, "load the weights in this dtype (default: as stored)")

    for name, task in TASKS.items():
        p = tasks.add_parser(name, parents=[common], help=task.description, description=task.description)
        p.add_argument("--data", default=str(DEFAULT_DATA_DIR),
                       help=f"folder holding ARC/, MMLU/, GSM8K/, MATH/, HUMANEVAL/ (default {DEFAULT_DATA_DIR})")
        p.add_argument("--max-new-tokens", type=int, help="generation length limit (default: the task's)")
        if name in ("arc", "mmlu"):
            p.add_argument("--scoring", choices=MC_SCORINGS, default="generate",
                           help="generate an answer and match its letter (official), or pick the option "
                                "letter with the highest log-likelihood")
        if name in ("gsm8k", "math"):
            p.add_argument("--shots", type=int, help="few-shot examples (default: 8 for gsm8k, 4 for math)")
        if name == "humaneval":
            p.add_argument("--prompts", choices=HUMANEVAL_PROMPT_STYLES, default="textprompts",
                           help="which prompt file (default textprompts, as the official run); plain = the "
                                "code prompt itself")
            p.add_argument("--timeout", type=float, default=10.0, help="seconds per test program (default 10)")
            p.add_argument("--memory-mb", type=int, default=1024, help="memory limit per test program (default 1024)")
            p.add_argument("--workers", type=int, default=4, help="test programs run at once (default 4)")
        p.set_defaults(func=run_benchmark)

    p = tasks.add_parser("perplexity", parents=[common], help="perplexity on text files or a prepared dataset",
                         description="Perplexity on text, JSON or JSONL files (or a folder of them), or on a "
                                     "dataset prepared with `yuan data prepare`.")
    p.add_argument("data", metavar="DATA", help="a file, a folder of files, or a prepared data folder")
    p.add_argument("--split", choices=("valid", "train"), default="valid",
                   help="which split of a prepared data folder (default valid)")
    p.set_defaults(func=run_perplexity)

    p = tasks.add_parser("harness", parents=[common], help="run lm-evaluation-harness tasks on a checkpoint",
                         description="Run lm-evaluation-harness tasks (pip install 'yuanmoe[eval]') with this "
                                     "project's `yuanmoe` model. For every lm_eval option use "
                                     "`python -m yuanmoe.evaluation.harness --model yuanmoe --model_args "
                                     "pretrained=CKPT ...`.")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task names, e.g. arc_easy,hellaswag")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--include-path", help="a folder of extra task YAML files")
    p.set_defaults(func=run_harness)

def _load(args):
    from .lm import EvalModel

    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    return EvalModel.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                     batch_size=args.batch_size)


def _report(args, results: dict[str, dict]) -> int:
    from .results import format_table, results_document, write_results

    print(format_table(results))
    if args.out:
        write_results(args.out, results_document(args.checkpoint, results))
        print(f"results written to {args.out}")
    return 0


def run_benchmark(args) -> int:
    from .tasks import TaskSettings, run_task

    settings = TaskSettings(limit=args.limit, max_new_tokens=args.max_new_tokens,
                            scoring=getattr(args, "scoring", "generate"), shots=getattr(args, "shots", None),
                            humaneval_prompts=getattr(args, "prompts", "textprompts"),
                            timeout_s=getattr(args, "timeout", 10.0), memory_mb=getattr(args, "memory_mb", 1024),
                            workers=getattr(args, "workers", 4))
    if settings.max_new_tokens is not None and settings.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {settings.max_new_tokens}")
    if not settings.timeout_s > 0 or settings.timeout_s == float("inf"):
        raise ValueError(f"--timeout must be a positive number of seconds, got {settings.timeout_s}")
    for flag, value, least in (("--memory-mb", settings.memory_mb, 1), ("--workers", settings.workers, 1),
                               ("--shots", settings.shots, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"benchmark data folder {args.data} does not exist; point --data at it")
    result = run_task(args.eval_task, _load(args), args.data, settings)
    return _report(args, {args.eval_task: result.to_dict()})


def run_perplexity(args) -> int:
    from .perplexity import perplexity

    return _report(args, {"perplexity": perplexity(_load(args), args.data, limit=args.limit, split=args.split)})


def run_harness(args) -> int:
    from .harness import evaluate_with_harness

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise ValueError(f"--tasks names no task, got {args.tasks!r}; give comma-separated lm_eval task names, "
                         f"e.g. arc_easy,hellaswag")
    repeated = next((name for i, name in enumerate(tasks) if name in tasks[:i]), None)
    if repeated is not None:
        raise ValueError(f"--tasks lists {repeated} twice; name each task once")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
    results = evaluate_with_harness(_load(args), tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                                    include_path=args.include_path)
    if args.out:
        from .results import results_document, write_results

        write_results(args.out, results_document(args.checkpoint, results))
        print(f"results written to {args.out}")
    return 0
