"""Empty and degenerate work: an eval over zero problems, an experiment over no routers or budgets,
sizes of zero or below, NaN and infinite numbers. Each is refused in one sentence that names the
option and what it accepts (exit 2), prints no result and writes nothing; most before a model loads."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from yuanmoe import preset, save_pretrained
from yuanmoe.cli import main
from yuanmoe.evaluation.tasks import TASKS


def refused(*args: str) -> str:
    """Run the command; it must exit 2 with one `error:` line (the command's own, or argparse's while
    parsing), no traceback and nothing on stdout; returns the line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    errors = [line for line in err.getvalue().splitlines() if "error: " in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err.getvalue(), (code, err.getvalue())
    assert out.getvalue() == "", out.getvalue()
    return errors[0]


# ------------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def checkpoint(model, bpe, tmp_path_factory):
    return save_pretrained(model, tmp_path_factory.mktemp("degenerate") / "ckpt", tokenizer=bpe)


@pytest.fixture(scope="module")
def empty_benchmarks(tmp_path_factory):
    """Every benchmark's files present and without a problem (blank lines at most)."""
    root = tmp_path_factory.mktemp("empty-benchmarks")
    files = {"ARC/ARC_challenge.txt": "\n\n", "MMLU/anatomy.txt": "", "GSM8K/gsm8k.txt": " \n", "MATH/math.txt": "",
             "HUMANEVAL/HumanEval.jsonl": "\n", "HUMANEVAL/HumanEval-textprompts.jsonl": ""}
    for name, text in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    (root / "empty.txt").write_text("")
    return root


EVAL_CASES = [
    *[(["eval", task, "CKPT", "--data", "EMPTY"], [task, "no problems", "--data"]) for task in TASKS],
    (["eval", "mmlu", "CKPT", "--data", "EMPTY", "--limit", "2"], ["mmlu", "no problems"]),
    (["eval", "perplexity", "CKPT", "EMPTY/empty.txt"], ["no documents"]),
    *[(["eval", *command, "--limit", limit], ["--limit must be at least 1", f"got {limit}"])
      for command in (["arc", "CKPT"], ["perplexity", "CKPT", "EMPTY/empty.txt"],
                      ["harness", "CKPT", "--tasks", "arc_easy"]) for limit in ("0", "-3")],
    *[(["eval", *command, "--batch-size", "0"], ["--batch-size must be at least 1"])
      for command in (["gsm8k", "CKPT"], ["perplexity", "CKPT", "EMPTY/empty.txt"])],
    *[(["eval", "harness", "CKPT", "--tasks", tasks], ["--tasks names no task", "e.g. arc_easy"])
      for tasks in ("", ",", " , ")],
    (["eval", "harness", "CKPT", "--tasks", "arc_easy, arc_easy"], ["--tasks lists arc_easy twice"]),
    (["eval", "harness", "CKPT", "--tasks", "arc_easy", "--num-fewshot", "-1"], ["--num-fewshot must be at least 0"]),
]


@pytest.mark.parametrize("args, words", EVAL_CASES, ids=[" ".join(args) for args, _ in EVAL_CASES])
def test_eval_over_nothing_is_refused_and_writes_no_results(checkpoint, empty_benchmarks, tmp_path, args, words):
    out = tmp_path / "results.json"
    argv = [a.replace("CKPT", str(checkpoint)).replace("EMPTY", str(empty_benchmarks)) for a in args]
    line = refused(*argv, "--device", "cpu", "--out", str(out))
    assert all(word in line for word in words), line
    assert not out.exists()


# ------------------------------------------------------------------------------------- experiment
ROUTERS = ["experiment", "routers"]
SWEEP = [*ROUTERS, "--sweep"]
EXPERTS = ["experiment", "experts"]
EXPERIMENT_CASES = [
    *[([*ROUTERS, "--routers", text], ["--routers", "at least one of router variants", "attention, linear"])
      for text in ("", ",", " , ")],
    ([*ROUTERS, "--routers", "linear,linear"], ["--routers", "linear is listed twice"]),
    ([*ROUTERS, "--routers", "linear,nope"], ["--routers", "router variants (attention"]),
    ([*SWEEP, "--sweep-tokens", ""], ["--sweep-tokens", "at least one of token budgets"]),
    *[([*SWEEP, f"--sweep-tokens={text}"], ["--sweep-tokens", "token budgets of at least 1"])  # "=": "-1M" a value
      for text in ("0", "0.1", "-1M", "nan", "inf", "1M,inf")],
    ([*SWEEP, "--sweep-tokens", "1M,1000k"], ["--sweep-tokens", "1000000 is listed twice"]),
    *[([*SWEEP, "--sweep-widths", text], ["--sweep-widths", "positive whole numbers"]) for text in (",", "0", "-64")],
    ([*SWEEP, "--sweep-widths", "64,64"], ["--sweep-widths", "64 is listed twice"]),
    *[([*EXPERTS, "--expert-counts", text], ["--expert-counts", "positive whole numbers"])
      for text in ("", ",", "0", "-8", "8,0")],
    ([*EXPERTS, "--expert-counts", "8,8"], ["--expert-counts", "8 is listed twice"]),
    ([*EXPERTS, "--expert-counts", "1,8"], ["--expert-counts must each be at least --top-k (2)"]),
    ([*ROUTERS, "--top-k", "9"], ["--top-k must be at most --num-experts (8)"]),
    ([*ROUTERS, "--num-experts", "1"], ["--top-k must be at most --num-experts (1)"]),
    *[([*suite, flag, value], [f"{flag} must be positive and finite", f"got {value}"])
      for suite in (ROUTERS, EXPERTS) for flag, value in
      (("--seeds", "0"), ("--steps", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"),
       ("--router-init-scale", "inf"), ("--router-temperature", "nan"), ("--router-lr-scale", "-1"))],
    *[([*ROUTERS, "--aux-loss-coef", value], ["--aux-loss-coef must be zero or more and finite"])
      for value in ("-0.1", "nan", "inf")],
]


@pytest.mark.parametrize("args, words", EXPERIMENT_CASES, ids=[" ".join(args) for args, _ in EXPERIMENT_CASES])
def test_experiments_over_nothing_are_refused_before_their_folder_is_made(tmp_path, args, words):
    out = tmp_path / "out"
    # A missing prepared folder: a guard that did not refuse first would fail here instead, quickly.
    line = refused(*args, "--out", str(out), "--prepared", str(tmp_path / "no-data"), "--device", "cpu")
    assert all(word in line for word in words), line
    assert not out.exists()


def _suite(folder, variants: dict[str, list[int]]):
    folder.mkdir()
    rows = [{"variant": name, "seeds": seeds, "heldout_loss": [4.0] * len(seeds)} for name, seeds in variants.items()]
    (folder / "results.json").write_text(json.dumps({"command": "yuan experiment routers", "baseline": "linear",
                                                     "budget": {"steps": 3}, "variants": rows}))
    return folder


@pytest.mark.parametrize("variants, words", [
    ({}, ["holds no runs;"]),
    ({"attention": [0, 1], "linear": []}, ["holds no runs of linear"]),
    ({"attention": [], "linear": [0, 1]}, ["holds no runs of attention"]),
])
@pytest.mark.parametrize("which", ["base", "other"])
def test_compare_of_suites_without_runs_is_refused(tmp_path, variants, words, which):
    good = _suite(tmp_path / "good", {"attention": [0, 1], "linear": [0, 1]})
    bad = _suite(tmp_path / "bad", variants)
    out = tmp_path / "ablations.md"
    folders = [bad, good] if which == "base" else [good, bad]
    line = refused("experiment", "compare", *map(str, folders), "--out", str(out))
    assert all(word in line for word in words) and str(bad / "results.json") in line, line
    assert not out.exists() and not out.with_suffix(".json").exists()


# ------------------------------------------------------------------------------------ info, plan
@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


SIZES = ["vocab_size", "hidden_size", "num_layers", "num_heads", "attention_projection_size",
         "max_position_embeddings", "ffn_hidden_size", "top_k"]


@settings(max_examples=30, deadline=None)
@given(field=st.sampled_from([*SIZES, "num_experts", "num_shared_experts"]), value=st.integers(max_value=0))
def test_info_of_a_config_with_a_size_of_zero_or_below_names_the_field(config_dir, field, value):
    if field in ("num_experts", "num_shared_experts"):
        value = min(value, -1)  # zero experts is a dense model, zero shared experts the default
    config = {**preset("tiny").to_dict(), field: value}
    path = config_dir / "config.json"
    path.write_text(json.dumps(config))
    line = refused("info", "--config", str(path))
    assert field in line and str(value) in line, line


@settings(max_examples=20, deadline=None)
@given(value=st.integers(max_value=0))
def test_info_at_a_sequence_length_of_zero_or_below_is_refused(value):
    line = refused("info", "--preset", "tiny", "--seq-len", str(value))
    assert "--seq-len must be at least 1" in line and f"got {value}" in line


PLAN_SIZES = {**{flag: st.integers(max_value=0) for flag in ("--gpus", "--seq", "--micro-batch", "--lora-rank")},
              "--gpu-memory": st.one_of(st.floats(max_value=0), st.sampled_from([math.nan, math.inf]))}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(PLAN_SIZES)).flatmap(lambda flag: st.tuples(st.just(flag), PLAN_SIZES[flag])))
@example(("--lora-rank", 0))  # once read as "no LoRA": a full fine-tuning plan
@example(("--gpu-memory", math.nan))
@example(("--gpu-memory", math.inf))
def test_plan_with_sizes_of_zero_or_below_or_not_finite_is_refused(drawn):
    flag, value = drawn
    line = refused("plan", "--preset", "tiny", f"{flag}={value}")  # "=": argparse reads "-inf" as an option
    accepted = "must be at least 1" if flag == "--lora-rank" else "must be positive and finite"
    assert f"{flag} {accepted}" in line and f"got {value}" in line, line
