import json

import pytest

from conftest import CORPUS
from yuanmoe.cli import main
from yuanmoe.data import prepare_dataset
from yuanmoe.experiments.report import summarize
from yuanmoe.experiments.suites import QUICK, base_config, check_matched_parameters, router_variants

MINUSCULE = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--ffn-hidden-size", "64",
             "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--eval-windows", "4", "--vocab-size", "300"]


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
    for name in ("loss_curves.png", "coselection_attention.png", "coselection_linear.png", "coselection_shared.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # A rerun with the same settings reuses the finished runs instead of training again.
    stamp = (out / "runs" / "attention-seed0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert (out / "runs" / "attention-seed0.json").stat().st_mtime_ns == stamp
    assert "attention seed 0" not in capsys.readouterr().err


def test_expert_experiment_keeps_active_parameters_fixed(bilingual_corpus, tmp_path):
    prepared = tmp_path / "prepared"
    prepare_dataset([str(bilingual_corpus)], prepared, train_tokenizer_vocab=300, heldout_fraction=0.1, workers=1,
                    progress=False)
    out = tmp_path / "experts"
    assert main(["experiment", "experts", "--out", str(out), "--prepared", str(prepared),
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
