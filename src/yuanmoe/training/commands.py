"""`yuan data prepare` and `yuan train`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import PRESETS, ConfigError, YuanConfig, preset
from .config import add_train_options, train_config_from_args


def register(sub) -> None:
    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize text, code, JSONL or JSON (Alpaca, chat messages) files into token shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT[:WEIGHT]",
                   help="a file or folder; several inputs are blended by their weights (default 1 each)")
    p.add_argument("--out", required=True, help="folder to write meta.json, token shards and the tokenizer to")
    p.add_argument("--overwrite", action="store_true", help="replace the prepared data already in --out")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="tokenizer to use: the official tokenizer.model, or a tokenizer folder")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                     help="train a byte-level BPE tokenizer of this vocabulary size on the inputs")
    p.add_argument("--heldout", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: CPU count, at most 8)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out split")
    p.add_argument("--official-lines", action="store_true",
                   help="text files are in the official Yuan layout: a document per line, newlines written <n>, "
                        "prompt <sep> answer")
    p.set_defaults(func=run_prepare)

    t = sub.add_parser("train", help="train a model from scratch on prepared data, or resume a run")
    arch = t.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS),
                      help="architecture preset; vocabulary and special tokens come from the data's tokenizer")
    arch.add_argument("--config", help="a config.json (taken as is; it must match the data's tokenizer)")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set num_layers=4 --set router=linear")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out "
                                                        "(saved at any world size)")
    t.add_argument("--resume-from", type=int, metavar="STEP",
                   help="continue from the checkpoint of this step (implies --resume)")
    add_train_options(t)
    t.set_defaults(func=run_train)


def run_prepare(args) -> int:
    from ..data import prepare_dataset

    meta = prepare_dataset(args.inputs, args.out, tokenizer=args.tokenizer, train_tokenizer_vocab=args.train_tokenizer,
                           heldout_fraction=args.heldout, seed=args.seed, workers=args.workers,
                           official_lines=args.official_lines, overwrite=args.overwrite)
    for s in meta["sources"]:
        train = sum(x["tokens"] for x in s["train"])
        valid = sum(x["tokens"] for x in s["valid"])
        print(f"{s['name']}: {train:,} training and {valid:,} held-out tokens (weight {s['weight']})")
    print(f"wrote {args.out} (vocabulary {meta['vocab_size']})")
    return 0


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string such as router=linear
    return overrides


def model_config_from_args(args, meta: dict) -> YuanConfig | None:
    overrides = parse_overrides(args.set)
    if args.config:
        from ..info import load_any_config

        config = load_any_config(args.config)
        return config.replace(**overrides) if overrides else config
    if args.preset:
        from .trainer import config_for_data

        return config_for_data(preset(args.preset), meta).replace(**overrides)
    if overrides:
        raise ConfigError("--set needs --preset or --config")
    return None


def run_train(args) -> int:
    from ..data import load_meta
    from .trainer import train

    args.resume = args.resume or args.resume_from is not None
    if not (args.resume or args.init_from or args.preset or args.config):
        raise ConfigError("give --preset, --config or --init for a new run (or --resume to continue one)")
    config = model_config_from_args(args, load_meta(args.data))
    result = train(config, train_config_from_args(args), resume=args.resume, resume_from=args.resume_from)
    held_out = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"step {result.step}: checkpoint {result.checkpoint}{held_out}")
    return 128 + result.interrupted if result.interrupted else 0
