"""`yuan data prepare` and `yuan train`."""

from __future__ import annotations

import json
import os

from ..config import PRESETS, ConfigError, YuanConfig, preset


def register(sub) -> None:
    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize text, code, JSONL or JSON (Alpaca) files into token shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT[:WEIGHT]",
                   help="a file or folder; several inputs are blended by their weights (default 1 each)")
    p.add_argument("--out", required=True, help="folder to write meta.json, token shards and the tokenizer to")
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
    t.add_argument("--data", required=True, help="a folder made by `yuan data prepare`")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, tensorboard, loss.png")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--init", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (native or official) with a fresh optimizer")
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (default: bf16 autocast)")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute layers to save memory")
    t.add_argument("--fim-rate", type=float, default=0.0, help="share of documents in fill-in-the-middle form")
    t.add_argument("--answer-only", action="store_true", help="train only on tokens after <sep> (fine-tuning)")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--log-every", type=int, default=1)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--eval-batches", type=int, default=4)
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--keep-last", type=int, default=3)
    t.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop after this much training time (evaluating and saving first)")
    t.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    par = t.add_argument_group("parallel (launch with torchrun; see docs/distributed.md)")
    par.add_argument("--dp", type=int, help="data-parallel ranks (default: processes / pp)")
    par.add_argument("--ep", type=int, help="expert-parallel ranks, a divisor of dp (default 1)")
    par.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    par.add_argument("--data-parallel", choices=["fsdp", "ddp"], default="fsdp")
    par.add_argument("--pp-schedule", choices=["1f1b", "gpipe"], default="1f1b")
    t.set_defaults(func=run_train)


def run_prepare(args) -> int:
    from ..data import prepare_dataset

    meta = prepare_dataset(args.inputs, args.out, tokenizer=args.tokenizer, train_tokenizer_vocab=args.train_tokenizer,
                           heldout_fraction=args.heldout, seed=args.seed, workers=args.workers,
                           official_lines=args.official_lines)
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
    from .trainer import TrainConfig, train

    if not (args.resume or args.init or args.preset or args.config):
        raise ConfigError("give --preset, --config or --init for a new run (or --resume to continue one)")
    config = model_config_from_args(args, load_meta(args.data))
    cfg = TrainConfig(data=args.data, out=args.out, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                      warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      bf16=args.bf16, activation_checkpointing=args.activation_checkpointing,
                      fim_rate=args.fim_rate, answer_only=args.answer_only, init_from=args.init, seed=args.seed,
                      log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
                      save_every=args.save_every, keep_last=args.keep_last, time_limit_s=args.time_limit,
                      tensorboard=args.tensorboard)
    from ..distributed.train import parallel_layout, train_parallel

    dims = parallel_layout(args.dp, args.ep, args.pp)
    if dims is None:
        result = train(config, cfg, resume=args.resume)
    else:
        result = train_parallel(config, cfg, dims, data_parallel=args.data_parallel, schedule=args.pp_schedule,
                                resume=args.resume)
    held_out = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"step {result.step}: checkpoint {result.checkpoint}{held_out}")
    return 130 if result.interrupted else 0
