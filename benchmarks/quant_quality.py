"""Quality of `yuan quantize`: held-out perplexity of a small trained model, int8 and int4 against bf16.

Trains the demo model (`make demo`: Python standard library code, a few minutes) unless given a
checkpoint, quantizes it with `yuan quantize` (int8 one scale per row; int4 group 128 and 32,
symmetric and asymmetric, the head int8, int4 or kept), and scores each on the demo's held-out
split. Targets (issue 12): int8 / bf16 <= 1.005, int4 / bf16 <= 1.05.

    .venv/bin/python benchmarks/quant_quality.py [--checkpoint CKPT --data PREPARED] [--limit 60]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from yuanmoe.checkpoint import from_pretrained
from yuanmoe.evaluation.lm import EvalModel
from yuanmoe.evaluation.perplexity import perplexity
from yuanmoe.quant.convert import quantize_checkpoint
from yuanmoe.tokenizer import load_tokenizer

VARIANTS = {"int8, one scale per row": (8, 0, True, 8), "int4, group 128": (4, 128, True, 8),
            "int4, group 128, head kept": (4, 128, True, 0), "int4, group 128, head int4": (4, 128, True, 4),
            "int4, group 128, asymmetric": (4, 128, False, 8), "int4, group 32": (4, 32, True, 8)}
TARGETS = {8: 1.005, 4: 1.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained checkpoint (default: train the demo model first)")
    parser.add_argument("--data", help="held-out data: a prepared folder (its valid split) or text files")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "yuan-quant-quality"))
    parser.add_argument("--train-minutes", type=float, default=4.0)
    parser.add_argument("--limit", type=int, help="score only the first N held-out documents")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    checkpoint, data = args.checkpoint, args.data
    if checkpoint is None:
        from yuanmoe.training.demo import run_demo

        checkpoint = run_demo(work / "demo", train_minutes=args.train_minutes, max_steps=400)["checkpoint"]
        data = data or work / "demo" / "data"
    if data is None:
        parser.error("--data is needed with --checkpoint")
    tokenizer = load_tokenizer(checkpoint)

    def score(folder, dtype=None) -> float:
        lm = EvalModel(from_pretrained(folder, dtype=dtype), tokenizer, batch_size=8)
        return perplexity(lm, data, limit=args.limit, progress=False)["score"]

    base = score(checkpoint, torch.bfloat16)
    print(f"checkpoint {checkpoint}\nheld-out data {data}\n")
    print(f"{'weights':<30} {'perplexity':>10} {'/ bf16':>8} {'target':>8}")
    print(f"{'bf16':<30} {base:>10.4f}")
    for label, (bits, group_size, symmetric, head_bits) in VARIANTS.items():
        folder = quantize_checkpoint(checkpoint, work / f"q{bits}-{group_size}-{symmetric}-{head_bits}", bits,
                                     group_size, symmetric, head_bits)
        ppl = score(folder)
        ratio = ppl / base
        met = "met" if ratio <= TARGETS[bits] else "MISSED"
        print(f"{label:<30} {ppl:>10.4f} {ratio:>8.4f} {'<= ' + str(TARGETS[bits]):>8} {met}")


if __name__ == "__main__":
    main()
