import json
import math

import numpy as np
import pytest

from conftest import CORPUS
from yuanmoe.cli import main
from yuanmoe.data import prepare_dataset
from yuanmoe.experiments.compare import compare, compare_markdown
from yuanmoe.experiments.report import summarize
from yuanmoe.experiments.suites import QUICK, base_config, check_matched_parameters, router_variants
from yuanmoe.experiments.sweep import fit_trend, token_count

MINUSCULE = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--ffn-hidden-size", "64",
             "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--eval-windows", "4", "--vocab-size", "300"]


def without(options: list[str], *flags: str) -> list[str]:
    """`options` (flag, value pairs) less the given flags."""
    pairs = zip(options[::2], options[1::2])
    return [word for flag, value in pairs if flag not in flags for word in (flag, value)]


@pytest.fixture(scope="module")
def bilingual_corpus(tmp_path_factory):
    """A little English prose, Chinese instructions and Python code, many documents each."""
    folder = tmp_path_factory.mktemp("corpus")
    english = (CORPUS / "tinyshakespeare.txt").read_text()[:30_000].split("\n\n")
    chinese = json.loads((CORPUS / "zh-alpaca-part-00.json").read_text())[:150]
    with open(folder / "mixed.jsonl", "w", encoding="utf-8") as f:
        for text in english:
            f.write(json.dumps({"text": text}) + "\n")
        for record in chinese:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (folder / "code.py").write_text(__import__("inspect").getsource(json))
    return folder


@pytest.fixture(scope="module")
def prepared_corpus(bilingual_corpus, tmp_path_factory):
    prepared = tmp_path_factory.mktemp("prepared")
    prepare_dataset([str(bilingual_corpus)], prepared, train_tokenizer_vocab=300, heldout_fraction=0.1, workers=1,
                    progress=False)
    return prepared


def test_router_experiment_end_to_end(bilingual_corpus, tmp_path, capsys):
    out = tmp_path / "routers"
    args = ["experiment", "routers", "--out", str(out), "--quick", "--no-code-corpus", "--data",
            str(bilingual_corpus), "--seeds", "2", *MINUSCULE]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    variants = {row["variant"]: row for row in results["variants"]}
    assert list(variants) == ["attention", "linear", "shared"]
    totals = [row["total_params"] for row in variants.values()]
    assert max(totals) / min(totals) < 1.01
    for row in variants.values():
        assert row["seeds"] == [0, 1] and all(loss > 0 for loss in row["heldout_loss"])
    assert "vs_baseline" in variants["attention"] and "vs_baseline" not in variants["linear"]
    text = (out / "results.md").read_text()
    assert "2.109" in text and "attention" in text
    for name in ("loss_curves.png", "coselection_attention.png", "coselection_linear.png", "coselection_shared.png",
                 "coselection_side_by_side.png", "routing_over_training.png", "coselection_over_training.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # The routing is recorded at every held-out evaluation, per layer; the last record is the final one.
    run = json.loads((out / "runs" / "attention-seed0.json").read_text())
    assert [point["step"] for point in run["routing_curve"]] == sorted(step for step, _ in run["heldout_curve"])
    assert run["routing_curve"][-1]["routing"] == run["routing"]
    assert {"layer0/entropy", "layer0/load_cv", "layer0/coselection_kl", "mean/coselection_kl"} <= set(run["routing"])
    assert "| attention | " in text.split("Routing per layer")[1]
    # A rerun with the same settings reuses the finished runs instead of training again.
    stamp = (out / "runs" / "attention-seed0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert (out / "runs" / "attention-seed0.json").stat().st_mtime_ns == stamp
    assert "attention seed 0" not in capsys.readouterr().err


def test_expert_experiment_keeps_active_parameters_fixed(prepared_corpus, tmp_path):
    out = tmp_path / "experts"
    assert main(["experiment", "experts", "--out", str(out), "--prepared", str(prepared_corpus),
                 "--expert-counts", "4,8", "--seeds", "1", *MINUSCULE]) == 0
    rows = json.loads((out / "results.json").read_text())["variants"]
    assert [row["variant"] for row in rows] == ["4 experts", "8 experts"]
    # Same experts per token: only the attention router's 3 x hidden x experts weights grow.
    assert rows[1]["active_params"] - rows[0]["active_params"] == 3 * 32 * (8 - 4)
    assert rows[1]["total_params"] > rows[0]["total_params"]


def test_router_variants_match_parameters_and_mismatches_are_refused():
    meta = {"vocab_size": 512, "eod_id": 0, "sep_id": 1, "pad_id": 2}
    base = base_config(QUICK, meta)
    variants = router_variants(base, ["attention", "linear", "shared", "noisy_topk", "expert_choice"])
    check_matched_parameters(variants)
    assert variants["shared"].num_shared_experts == 2 and variants["shared"].num_experts == 14
    with pytest.raises(ValueError, match="1%"):
        check_matched_parameters({"8": base, "16": base.replace(num_experts=16)})
    with pytest.raises(ValueError, match="unknown router variant"):
        router_variants(base, ["sinkhorn"])


def test_paired_differences_against_the_baseline():
    def run(variant, seed, loss):
        return {"variant": variant, "seed": seed, "heldout_loss": loss, "total_params": 1, "active_params": 1,
                "routing": None}

    runs = [run("linear", 0, 2.0), run("linear", 1, 2.5), run("attention", 0, 1.9), run("attention", 1, 2.4),
            run("shared", 0, 2.1), run("shared", 1, 2.3)]
    rows = {row["variant"]: row for row in summarize(runs, "linear")}
    assert rows["linear"]["mean"] == pytest.approx(2.25)
    assert rows["attention"]["vs_baseline"]["mean"] == pytest.approx(-0.1)
    assert rows["attention"]["vs_baseline"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert not rows["attention"]["vs_baseline"]["within_noise"]  # consistent across seeds
    assert rows["shared"]["vs_baseline"]["within_noise"]  # +0.1 and -0.2: no consistent sign


def test_compare_pairs_ablations_with_the_base_by_seed(tmp_path, capsys):
    def suite(name, command, losses, steps=10):
        folder = tmp_path / name
        folder.mkdir()
        variants = [{"variant": v, "seeds": sorted(per_seed), "heldout_loss": [per_seed[s] for s in sorted(per_seed)]}
                    for v, per_seed in losses.items()]
        (folder / "results.json").write_text(json.dumps({"command": command, "baseline": "linear",
                                                         "budget": {"steps": steps}, "variants": variants}))
        return folder

    base = suite("base", "yuan experiment routers --out base --seeds 3",
                 {"attention": {0: 4.5, 1: 4.6, 2: 4.4}, "linear": {0: 4.4, 1: 4.4, 2: 4.4}})
    flag = suite("flag", "yuan experiment routers --out flag --seeds 3 --prepared base/data --router-lr-scale 4.0",
                 {"attention": {0: 4.4, 1: 4.4, 2: 4.5}, "linear": {0: 4.5, 1: 4.4, 2: 4.3}})
    attention_only = suite("temp", "yuan experiment routers --out temp --routers attention --seeds 3 "
                           "--router-temperature 0.5", {"attention": {0: 4.45, 1: 4.55, 2: 4.35}})
    summary = compare(base, [flag, attention_only])
    first, second, third = summary["rows"]
    assert first["recipe"] == "official recipe" and "change" not in first
    assert first["gap"]["attention"]["mean"] == pytest.approx(0.1)  # +0.1, +0.2, 0.0
    assert first["gap"]["attention"]["stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert second["recipe"] == "--router-lr-scale 4.0"
    assert second["gap"]["attention"]["per_seed"] == pytest.approx([-0.1, 0.0, 0.2])
    assert second["gap_change"]["attention"]["per_seed"] == pytest.approx([-0.2, -0.2, 0.2])
    assert second["change"]["attention"]["mean"] == pytest.approx(-0.2 / 3)
    assert second["change"]["linear"]["per_seed"] == pytest.approx([0.1, 0.0, -0.1])
    # The linear router is not touched by a temperature: the base's runs stand in, marked.
    assert third["borrowed"] == ["linear"] and "linear" not in third["change"]
    assert third["gap_change"]["attention"]["per_seed"] == pytest.approx([-0.05, -0.05, -0.05])
    table = compare_markdown(summary)
    assert "| 4.4000 * |" in table and "stand in" in table

    assert main(["experiment", "compare", str(base), str(flag), "--out", str(tmp_path / "ablations.md")]) == 0
    assert (tmp_path / "ablations.md").read_text() == compare_markdown(compare(base, [flag]))
    assert json.loads((tmp_path / "ablations.json").read_text())["rows"][1]["recipe"] == "--router-lr-scale 4.0"
    longer = suite("longer", "yuan experiment routers --out longer --steps 20", {"linear": {0: 4.0}}, steps=20)
    capsys.readouterr()
    assert main(["experiment", "compare", str(base), str(longer)]) == 2
    assert "compare folders of the same budget" in capsys.readouterr().err
    assert main(["experiment", "compare", str(base), str(tmp_path / "missing")]) == 2
    assert "has no results.json" in capsys.readouterr().err
    experts = suite("experts", "yuan experiment experts --out experts", {"8 experts": {0: 4.0}})
    assert main(["experiment", "compare", str(base), str(experts)]) == 2
    assert "compare folders of the same suite" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"variants": [')
    assert main(["experiment", "compare", str(base), str(tmp_path / "broken")]) == 2
    assert "is not the results.json of a `yuan experiment` run" in capsys.readouterr().err


def test_recipe_flags_reach_the_model_and_the_optimizer(prepared_corpus, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["experiment", "routers", "--out", str(out), "--prepared", str(prepared_corpus),
                 "--routers", "attention,linear", "--seeds", "1", *MINUSCULE, "--router-init-scale", "0.5",
                 "--router-lr-scale", "4", "--no-router-weight-decay", "--router-temperature", "2",
                 "--no-norm-topk-prob", "--router-autocast", "--aux-loss-coef", "0.01"]) == 0
    run = json.loads((out / "runs" / "attention-seed0.json").read_text())
    config, budget = run["config"], run["budget"]
    assert (config["router_init_scale"], config["router_temperature"], config["norm_topk_prob"],
            config["router_fp32"], config["aux_loss_coef"]) == (0.5, 2.0, False, False, 0.01)
    assert (budget["router_lr_scale"], budget["router_weight_decay"]) == (4.0, False)
    assert "--router-lr-scale 4.0" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["experiment", "routers", "--out", str(out), "--router-lr-scale", "0", *MINUSCULE]) == 2
    assert "--router-lr-scale must be positive" in capsys.readouterr().err


def test_sweep_runs_every_budget_resumes_and_fits_the_gap(prepared_corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["experiment", "routers", "--out", str(out), "--prepared", str(prepared_corpus),
            "--routers", "attention,linear", "--seeds", "1",
            *without(MINUSCULE, "--steps", "--hidden-size", "--ffn-hidden-size"),
            "--sweep", "--sweep-tokens", "32,64,96", "--sweep-widths", "32"]
    assert main(args) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [(p["variant"], p["width"], p["tokens"], p["steps"]) for p in summary["points"]] == [
        ("attention", 32, 32, 1), ("attention", 32, 64, 2), ("attention", 32, 96, 3)]
    runs = {v: json.loads((out / "width32-tokens96" / "runs" / f"{v}-seed0.json").read_text())
            for v in ("attention", "linear")}
    assert summary["points"][2]["per_seed"] == [pytest.approx(runs["attention"]["heldout_loss"]
                                                              - runs["linear"]["heldout_loss"])]
    fit = summary["fits"]["attention"]["width 32"]
    assert fit["points"] == 3
    assert fit["slope_per_decade"] == pytest.approx(np.polyfit(np.log10([32, 64, 96]),
                                                               [p["gap"] for p in summary["points"]], 1)[0])
    assert (out / "gap_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert "attention - linear, width 32" in (out / "sweep.md").read_text()
    stamp = (out / "width32-tokens96" / "runs" / "attention-seed0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # everything finished: nothing is trained again
    assert (out / "width32-tokens96" / "runs" / "attention-seed0.json").stat().st_mtime_ns == stamp
    assert "seed 0" not in capsys.readouterr().err
    assert main(args + ["--steps", "5"]) == 2
    assert "--sweep sets the steps" in capsys.readouterr().err


def test_trend_fit_finds_the_crossing_of_a_shrinking_gap():
    tokens = [1e6, 1e6, 4e6, 4e6, 16e6, 16e6]
    shrinking = fit_trend(tokens, [0.3 - 0.1 * math.log10(t / 1e6) for t in tokens])
    assert shrinking["slope_per_decade"] == pytest.approx(-0.1)
    assert shrinking["crossing_tokens"] == pytest.approx(1e9)
    assert "cross zero at about 1e+09 tokens" in shrinking["verdict"]
    growing = fit_trend(tokens, [0.1 + 0.05 * math.log10(t / 1e6) + (0.01 if i % 2 else -0.01)
                                 for i, t in enumerate(tokens)])
    assert growing["crossing_tokens"] is None and "does not shrink" in growing["verdict"]
    assert growing["slope_stderr"] > 0
    assert fit_trend([1e6, 1e6], [0.1, 0.2]) is None
    assert [token_count(t) for t in ("512k", "1M", "2.5e6", "96")] == [512_000, 1_000_000, 2_500_000, 96]
