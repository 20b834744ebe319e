"""`make demo`: train a small Yuan 2.0-M32-architecture model on the Python standard library.

Every machine with Python has the standard library's source files: code with English comments
and docstrings, a stand-in for the half of the paper's data that is code. The demo tokenizes
them (training a byte-level BPE on them first), trains a small model with the attention router
and localized filtering attention for a few minutes on CPU, reports the held-out loss, and writes
a continuation of a Python prompt.

    python -m yuanmoe.training.demo [--out runs/demo] [--max-steps N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sysconfig
import time
from pathlib import Path

import torch

from ..config import preset
from ..data import Source, prepare_dataset
from ..info import model_stats
from .config import TrainConfig
from .trainer import config_for_data, train

PROMPT = 'def read_lines(path):\n    """Return the lines of the file at path."""\n'
# Parts of the standard library that are not representative library code (tests, IDLE, vendored data).
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root if root.is_dir() else Path(os.__file__).parent


def stdlib_files(max_bytes: int) -> list[Path]:
    """The standard library's .py files, in a fixed order, up to about max_bytes of source."""
    root = stdlib_root()
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= max_bytes:
            break
    if not files:
        raise FileNotFoundError(f"found no Python source files under {root}")
    return files


def use_one_thread_if_busy() -> None:
    """On a machine already busy with other work, torch's threads wait on each other for shared
    cores: one thread was measured 3-9x faster per step than two at a load average of 10 on 2 cores."""
    cores = os.cpu_count() or 1
    if cores > 1 and os.getloadavg()[0] >= cores:
        print(f"the machine is busy (load average {os.getloadavg()[0]:.1f} on {cores} cores): training on one thread")
        torch.set_num_threads(1)


def demo_config(meta: dict):
    """The Yuan 2.0-M32 architecture (attention router, LFA, top-2 of 8 experts) at a size that
    learns something in a few CPU minutes."""
    return config_for_data(preset("small"), meta).replace(num_layers=4, ffn_hidden_size=512,
                                                          max_position_embeddings=512)


def run_demo(out: str | Path = "runs/demo", max_steps: int = 300, train_minutes: float = 3.5,
             corpus_bytes: int = 4_000_000, vocab_size: int = 4096, seq_len: int = 256, batch_size: int = 8,
             new_tokens: int = 64, workers: int | None = None, progress: bool = True, device: str = "auto") -> dict:
    """Prepare the corpus, train for max_steps or train_minutes (whichever ends first, so a slow
    or busy machine still finishes in about five minutes), evaluate, sample a continuation."""
    from ..checkpoint import from_pretrained
    from ..inference.generate import generate
    from ..tokenizer import load_tokenizer

    started = time.perf_counter()
    use_one_thread_if_busy()
    out = Path(out)
    run_dir, data_dir = out / "run", out / "data"
    shutil.rmtree(run_dir, ignore_errors=True)  # a demo always starts from scratch

    files = stdlib_files(corpus_bytes)
    print(f"corpus: {len(files)} Python standard library files under {stdlib_root()}")
    meta = prepare_dataset([Source(files, name="python-stdlib")], data_dir, train_tokenizer_vocab=vocab_size,
                           heldout_fraction=0.03, workers=workers, progress=progress, overwrite=True)
    config = demo_config(meta)
    stats = model_stats(config, seq_len)
    print(f"model: {config.num_layers} layers, {config.num_experts} experts (top-{config.top_k}, {config.router} "
          f"router), {stats['total_params'] / 1e6:.1f}M parameters, {stats['active_params'] / 1e6:.1f}M active")
    cfg = TrainConfig(data=str(data_dir), out=str(run_dir), max_steps=max_steps, batch_size=batch_size,
                      seq_len=seq_len, lr=1e-3, warmup_steps=max(1, max_steps // 15), eval_every=max(1, max_steps // 3),
                      eval_batches=4, save_every=max_steps, keep_last=1, log_every=1, time_limit_s=60 * train_minutes,
                      progress=progress, device=device)
    result = train(config, cfg)
    if result.interrupted:
        return {"interrupted": result.interrupted, "checkpoint": result.checkpoint}

    model = from_pretrained(result.checkpoint, device=next(result.model.parameters()).device)
    tokenizer = load_tokenizer(result.checkpoint)
    prompt_ids = tokenizer.encode(PROMPT)
    [generated] = generate(model, [prompt_ids], max_new_tokens=new_tokens, do_sample=True, temperature=0.7,
                           top_k=40, seed=0)
    continuation = tokenizer.decode(generated[len(prompt_ids):], skip_special_tokens=True)
    elapsed = time.perf_counter() - started

    print(f"\nheld-out loss {result.eval_loss:.3f} nats/token after {result.step} steps "
          f"(a model that guessed uniformly would score {torch.tensor(float(config.vocab_size)).log():.2f})")
    print(f"checkpoint  {result.checkpoint}")
    print(f"loss curve  {run_dir / 'loss.png'}")
    print(f"--- prompt + sampled continuation ---\n{PROMPT}{continuation}\n---")
    print(f"demo finished in {elapsed / 60:.1f} minutes; continue the prompt yourself with\n"
          f"  yuan generate {result.checkpoint} 'import os' --temperature 0.7")
    return {"interrupted": 0, "eval_loss": result.eval_loss, "checkpoint": result.checkpoint, "continuation": continuation,
            "losses": result.losses, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the data, checkpoints and loss curve")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--train-minutes", type=float, default=3.5, help="stop training earlier than max-steps "
                        "when this much time has passed")
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000, help="how much standard library source to use")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    outcome = run_demo(args.out, max_steps=args.max_steps, train_minutes=args.train_minutes, corpus_bytes=args.corpus_bytes, seq_len=args.seq_len,
                       batch_size=args.batch_size, device=args.device)
    return 128 + outcome["interrupted"] if outcome["interrupted"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
