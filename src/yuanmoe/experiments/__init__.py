"""`yuan experiment routers|experts`: the paper's Tables 1 and 2 at small scale, on your data;
`yuan experiment compare`: recipe ablations side by side."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
from pathlib import Path

from ..data import load_meta
from ..device import add_device_options
from . import compare
from .corpus import prepare_corpus
from .suites import (DEFAULT, PAPER_TABLE1, PAPER_TABLE2, QUICK, ROUTER_VARIANTS, Scale, base_config,
                     check_matched_parameters, expert_variants, router_variants, run_suite)
from .sweep import run_sweep, token_count

SWEEP_TOKENS = [2 ** 19, 2 ** 20, 2 ** 21, 2 ** 22, 2 ** 23]  # 0.5M to 8M: 16x
SWEEP_WIDTHS = [64, 128]


def comma_list(kind, what: str):
    """argparse `type=`: one or more distinct comma-separated values, each read by `kind`; a suite
    over no variants or budgets has nothing to report, and a repeated one would count twice."""
    def parse(text: str) -> list:
        try:
            values = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of {what}, got {text!r}")
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise argparse.ArgumentTypeError(f"{repeated} is listed twice in {text!r}; list each value once")
        return values
    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not positive")
    return value


def router_variant(name: str) -> str:
    if name not in ROUTER_VARIANTS:
        raise ValueError(f"unknown router variant {name!r}")
    return name


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for results.md/json, plots, runs and data")
    p.add_argument("--quick", action="store_true", help="a tiny model and budget: a few minutes on 2 CPU cores")
    p.add_argument("--data", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="add a corpus (text/code/JSON/JSONL file or folder, e.g. ../shared/corpus); repeatable")
    p.add_argument("--no-code-corpus", action="store_true",
                   help="leave out the default code corpus (the Python standard library's source)")
    p.add_argument("--prepared", type=Path, help="train on a folder made by `yuan data prepare` instead")
    add_device_options(p, "autocast dtype of training (default auto)", "auto")
    for field in dataclasses.fields(Scale):
        p.add_argument("--" + field.name.replace("_", "-"), type=float if field.type == "float" else int,
                       help=f"override the scale (quick {getattr(QUICK, field.name)}, "
                            f"default {getattr(DEFAULT, field.name)})")
    recipe = p.add_argument_group("router recipe, for ablations (the defaults are the official recipe)")
    recipe.add_argument("--router-init-scale", type=float,
                        help="router weights start with std initializer_range x this (default 1)")
    recipe.add_argument("--router-lr-scale", type=float,
                        help="learning-rate multiplier of the router weights (default 1)")
    recipe.add_argument("--no-router-weight-decay", action="store_true", help="no weight decay on the router weights")
    recipe.add_argument("--router-temperature", type=float,
                        help="attention router: softmax(q k^T / temperature) (default 1: none, as official)")
    recipe.add_argument("--no-norm-topk-prob", action="store_true",
                        help="combine the experts with their top-k probabilities as they are, not renormalised")
    recipe.add_argument("--router-autocast", action="store_true",
                        help="compute the router scores in the autocast dtype instead of fp32")
    recipe.add_argument("--aux-loss-coef", type=float,
                        help="Switch load-balancing loss coefficient (default 0: balancing off, as official)")


def scale_from_args(args) -> Scale:
    scale = QUICK if args.quick else DEFAULT
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Scale) if getattr(args, f.name) is not None}
    for name, value in overrides.items():
        if not 0 < value < math.inf:
            raise ValueError(f"--{name.replace('_', '-')} must be positive and finite, got {value}")
    return dataclasses.replace(scale, **overrides)


def recipe_from_args(args) -> tuple[dict, dict]:
    """The router recipe flags as (YuanConfig changes, Budget's router optimizer settings)."""
    for name in ("router_init_scale", "router_lr_scale", "router_temperature"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise ValueError(f"--{name.replace('_', '-')} must be positive and finite, got {value}")
    if args.aux_loss_coef is not None and not 0 <= args.aux_loss_coef < math.inf:
        raise ValueError(f"--aux-loss-coef must be zero or more and finite, got {args.aux_loss_coef}")
    config = {name: getattr(args, name) for name in ("router_init_scale", "router_temperature", "aux_loss_coef")
              if getattr(args, name) is not None}
    if args.no_norm_topk_prob:
        config["norm_topk_prob"] = False
    if args.router_autocast:
        config["router_fp32"] = False
    optimizer = {"router_lr_scale": args.router_lr_scale} if args.router_lr_scale is not None else {}
    if args.no_router_weight_decay:
        optimizer["router_weight_decay"] = False
    return config, optimizer


def prepare(args, scale: Scale) -> tuple[Path, dict]:
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_corpus(args.out, args.data, not args.no_code_corpus, scale.vocab_size, args.prepared)
    return data, load_meta(data)


def command_line(args) -> str:
    """An equivalent command line for the report, rebuilt from the parsed options."""
    words = ["yuan", "experiment", args.suite]
    for name, value in vars(args).items():
        if name in ("command", "suite", "func") or value in (None, False, []):
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif name == "data":
            words += [part for spec in value for part in (flag, spec)]
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(words)


def run_routers(args) -> int:
    scale = scale_from_args(args)
    changes, optimizer = recipe_from_args(args)
    if scale.top_k > scale.num_experts:
        raise ValueError(f"--top-k must be at most --num-experts ({scale.num_experts}), got {scale.top_k}")
    if args.sweep and (args.steps is not None or args.hidden_size is not None):
        raise ValueError("--sweep sets the steps and the width itself; give them with --sweep-tokens and "
                         "--sweep-widths instead of --steps and --hidden-size")
    if not args.sweep and (args.sweep_tokens or args.sweep_widths):
        raise ValueError("--sweep-tokens and --sweep-widths apply only with --sweep")
    data, meta = prepare(args, scale)

    def make_variants(point: Scale) -> dict:
        return router_variants(base_config(point, meta).replace(**changes), args.routers)

    variants = make_variants(scale)
    check_matched_parameters(variants)
    baseline = "linear" if "linear" in variants else next(iter(variants))
    if args.sweep:
        summary = run_sweep(args.out, scale, args.sweep_widths or SWEEP_WIDTHS, args.sweep_tokens or SWEEP_TOKENS,
                            make_variants, baseline, data, command_line(args), args.device, args.dtype, optimizer)
        for variant, fits in summary["fits"].items():
            for group, fit in fits.items():
                print(f"{variant} - {baseline}, {group}: {'too few points' if fit is None else fit['verdict']}")
        print(f"wrote {args.out / 'sweep.md'} and {args.out / 'gap_vs_tokens.png'}")
        return 0
    rows = run_suite(args.out, "Routers at equal parameters (paper Table 1, small scale)", variants, scale, data,
                     baseline, PAPER_TABLE1, "paper (Table 1)", command_line(args), args.device, args.dtype, optimizer)
    print_summary(args.out, rows)
    return 0


def run_experts(args) -> int:
    if args.num_experts is not None:
        raise ValueError("--num-experts does not apply to `yuan experiment experts`; use --expert-counts")
    scale = scale_from_args(args)
    changes, optimizer = recipe_from_args(args)
    if min(args.expert_counts) < scale.top_k:
        raise ValueError(f"--expert-counts must each be at least --top-k ({scale.top_k}), got "
                         f"{min(args.expert_counts)}")
    data, meta = prepare(args, scale)
    base = base_config(scale, meta).replace(router=args.router, **changes)
    variants = expert_variants(base, args.expert_counts)
    rows = run_suite(args.out, "Expert count at equal active parameters (paper Table 2, small scale)", variants,
                     scale, data, next(iter(variants)), PAPER_TABLE2, "paper (Table 2)", command_line(args),
                     args.device, args.dtype, optimizer)
    print_summary(args.out, rows)
    return 0


def print_summary(out: Path, rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['variant']:>16}: held-out loss {row['mean']:.4f} +- {row['std']:.4f} "
              f"({len(row['seeds'])} seeds, {row['total_params'] / 1e6:.2f}M params)")
    print(f"wrote {out / 'results.md'}")


def register(sub) -> None:
    p = sub.add_parser("experiment", help="reproduce the paper's router and expert-count comparisons")
    suites = p.add_subparsers(dest="suite", required=True)

    routers = suites.add_parser("routers", help="attention vs linear vs shared-expert routing at equal parameters")
    add_common_options(routers)
    routers.add_argument("--routers", default=["attention", "linear", "shared"],
                         type=comma_list(router_variant, f"router variants ({', '.join(ROUTER_VARIANTS)})"),
                         help=f"variants to compare, from {', '.join(ROUTER_VARIANTS)} "
                              f"(default attention,linear,shared)")
    routers.add_argument("--sweep", action="store_true",
                         help="run the suite at every --sweep-tokens budget and --sweep-widths width; writes sweep.md, "
                              "sweep.json and gap_vs_tokens.png with the fitted trend of the gaps")
    routers.add_argument("--sweep-tokens", type=comma_list(token_count, "token budgets of at least 1, e.g. 500k,1M"),
                         help="training-token budgets of --sweep, e.g. 500k,1M,2M,4M,8M (default: 2^19 to 2^23)")
    routers.add_argument("--sweep-widths", type=comma_list(positive_int, "positive whole numbers"),
                         help="model widths (hidden size; the expert FFN scales with it) of --sweep (default 64,128)")
    routers.set_defaults(func=run_routers)

    experts = suites.add_parser("experts", help="8 vs 16 vs 32 experts at equal active parameters")
    add_common_options(experts)
    experts.add_argument("--expert-counts", type=comma_list(positive_int, "positive whole numbers"),
                         default=[8, 16, 32], help="expert counts to compare (default 8,16,32)")
    experts.add_argument("--router", default="attention", choices=["attention", "linear", "noisy_topk"],
                         help="router of every variant (default attention, as in the paper)")
    experts.set_defaults(func=run_experts)

    compare.register(suites)
