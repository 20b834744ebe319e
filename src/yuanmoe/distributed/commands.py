"""`yuan export-distributed`: a distributed (DCP) checkpoint -> one native or official folder."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export-distributed", help="gather a distributed training checkpoint into one folder",
                       description="Read a checkpoint written by a torchrun training run (checkpoints/step-N, "
                                   "any parallel layout) and write it as a folder from_pretrained loads.")
    p.add_argument("src", help="distributed checkpoint folder (has .metadata and config.json)")
    p.add_argument("out", help="folder to write (replaced if it is a checkpoint folder already)")
    p.add_argument("--to", choices=["native", "official"], default="native", help="format of OUT (default native)")
    p.add_argument("--tokenizer", help="tokenizer to include (a tokenizer folder, checkpoint or tokenizer.model)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tokenizer import load_tokenizer
    from .checkpoint import export_checkpoint

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    out = export_checkpoint(args.src, args.out, fmt=args.to, tokenizer=tokenizer)
    print(f"wrote {out} ({args.to})")
    return 0
