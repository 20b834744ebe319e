"""`yuan convert SRC OUT --to official|native`: rewrite a checkpoint folder in either format.

SRC is an official or native folder, or a training run's checkpoint (any world size), which is
gathered into one model first; with --merge-lora, a LoRA run's checkpoint, folded into its base."""

from __future__ import annotations

import argparse
import re

from ..checkpoint import DEFAULT_MAX_SHARD_BYTES, FORMATS, from_pretrained, save_pretrained
from ..device import add_device_options


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2GiB" or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write it like 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between the official and this project's format",
                       description="Load SRC (official Yuan2-M32-hf folder, native folder, or a training run's "
                                   "checkpoint of any world size and parallel layout) and write it to OUT in "
                                   "the chosen format; tokenizer files are carried over.")
    p.add_argument("src", help="checkpoint folder to read")
    p.add_argument("out", help="folder to write (replaced if it is a checkpoint folder already)")
    p.add_argument("--to", choices=FORMATS, required=True, help="format of OUT")
    # The model is only read and written, so the CPU (and its memory) is the natural place for it.
    add_device_options(p, "cast the weights (default: keep the stored dtype, which makes the conversion exact)",
                       device_default="cpu")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                   help="largest weight file before sharding, e.g. 5GB (default 5GiB)")
    p.add_argument("--merge-lora", action="store_true",
                   help="SRC is a checkpoint of a LoRA run: fold its adapters into their base and write the result")
    p.add_argument("--base", help="with --merge-lora: the base model, if it moved since training (default: the "
                                  "one the run started from)")
    p.add_argument("--tokenizer", help="tokenizer to include (a tokenizer folder, checkpoint or tokenizer.model); "
                                       "default: the one in SRC, if any")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tokenizer import check_same_tokenizer, load_tokenizer

    if args.merge_lora:
        from ..checkpoint import load_adapted

        model = load_adapted(args.src, base=args.base, dtype=args.dtype, device=args.device)
    elif args.base:
        raise ValueError("--base goes with --merge-lora")
    else:
        model = from_pretrained(args.src, dtype=args.dtype, device=args.device)
    try:
        own = load_tokenizer(args.src)
    except FileNotFoundError:
        own = None
    tokenizer = own
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        if own is not None:  # a folder without one can only be checked by vocabulary and special ids
            check_same_tokenizer(f"--tokenizer {args.tokenizer}", tokenizer.fingerprint(), args.src,
                                 own.fingerprint(), "leave out --tokenizer to keep the one SRC holds")
    out = save_pretrained(model, args.out, tokenizer=tokenizer, fmt=args.to, max_shard_bytes=args.max_shard_size)
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"wrote {out} ({args.to} format, {gb:.3f} GB of {model.dtype} weights"
          f"{', with tokenizer' if tokenizer else ''})")
    return 0
