"""`make demo`, shortened to a handful of steps: data from the standard library, training, report."""

from __future__ import annotations

import math

import torch

from yuanmoe.checkpoint import from_pretrained
from yuanmoe.training.demo import PROMPT, main, stdlib_files


def test_demo_trains_on_the_standard_library_and_reports(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny steps: threads cost more than they give
    try:
        assert main(["--out", str(tmp_path), "--max-steps", "12", "--corpus-bytes", "400000", "--seq-len", "64",
                     "--batch-size", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "held-out loss" in out and PROMPT in out
    held_out = float(out.split("held-out loss ")[1].split()[0])
    # Twelve small steps already beat a uniform guess over the vocabulary (8.32; 7.82 measured, the
    # untrained model scores above 8.3), so a demo that does not learn fails here.
    assert held_out < math.log(4096) - 0.3, held_out
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000012"
    model = from_pretrained(checkpoint)
    assert model.config.router == "attention" and model.config.num_experts == 8
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_demo_corpus_is_library_source_without_tests():
    files = stdlib_files(200_000)
    assert files and all(f.suffix == ".py" and "test" not in f.parent.parts for f in files)
