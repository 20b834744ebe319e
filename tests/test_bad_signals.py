"""Class 1 of the bad-input classes: Ctrl-C (SIGINT) or SIGTERM at any point of a command.

"Any point" is enumerated, not guessed: a profile hook counts the calls into yuanmoe's own functions
during one uninterrupted run of a command, then the command runs again with the signal sent at
evenly spread call numbers of that count (setup, reading, writing, renaming, the save of a step).
Every time: exit 130 (SIGINT) or 143 (SIGTERM), no traceback, and either the complete output or none
of it, with no temporary left; a training run always leaves a checkpoint that resumes to the same
weights as the uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CORPUS
from yuanmoe import from_pretrained
from yuanmoe.cli import main

POINTS = 15  # signal points per command and signal (spread over the whole run)
TRAIN = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--no-tensorboard",
         "--dtype", "float32", "--device", "cpu", "--max-steps", "3"]


class SignalAt:
    """A sys.setprofile hook that sends `signum` to this process at the `at`-th call of a yuanmoe function
    (at None: only counts them)."""

    def __init__(self, at: int | None = None, signum: int = signal.SIGINT):
        self.at, self.signum, self.calls = at, signum, 0

    def __call__(self, frame, event, arg) -> None:
        if event == "call" and f"{os.sep}yuanmoe{os.sep}" in frame.f_code.co_filename:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), self.signum)


def run_hooked(args: list[str], hook: SignalAt) -> int:
    sys.setprofile(hook)
    try:
        return main(args)
    finally:
        sys.setprofile(None)


def points(args: list[str], before=None) -> list[int]:
    """Call numbers spread over one uninterrupted run of the command."""
    if before is not None:
        before()
    counter = SignalAt()
    assert run_hooked(args, counter) == 0
    total = counter.calls
    return sorted({max(1, round(total * (i + 0.5) / POINTS)) for i in range(POINTS)})


def interrupted(args: list[str], at: int, signum: int, capsys) -> None:
    """Run the command with the signal at call `at`: the exit code says which, and nothing is a traceback."""
    code = run_hooked(args, SignalAt(at, signum))
    err = capsys.readouterr().err
    assert code == 128 + signum, (at, code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp*")) + sorted(p.name for p in folder.rglob(".*.old-*"))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signals") / "shakespeare.txt"
    path.write_text((CORPUS / "tinyshakespeare.txt").read_text()[:12000])
    return path


@pytest.fixture(scope="module")
def prepared(text) -> Path:
    out = text.parent / "data"
    assert main(["data", "prepare", str(text), "--out", str(out), "--train-tokenizer", "320", "--heldout", "0.1",
                 "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(prepared) -> Path:
    out = prepared.parent / "run"
    assert main(["train", "--data", str(prepared), "--out", str(out), *TRAIN]) == 0
    return out / "checkpoints" / "step-0000003"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["prepare", "prepare-over", "convert", "quantize"])
def test_an_interrupted_command_leaves_all_or_nothing(command, signum, text, prepared, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    if command.startswith("prepare"):
        args = ["data", "prepare", str(text), "--out", str(out), "--train-tokenizer", "300", "--workers", "1"]
    elif command == "convert":
        args = ["convert", str(checkpoint), str(out), "--to", "official"]
    else:
        args = ["quantize", str(checkpoint), str(out), "--bits", "4", "--group-size", "32"]
    if command == "prepare-over":  # replacing prepared data: the old folder survives an interrupt whole
        args.append("--overwrite")
        shutil.copytree(prepared, out)
    before = files(out) if out.exists() else None
    reset = (lambda: None) if before is not None else (lambda: shutil.rmtree(out, ignore_errors=True))
    spread = points(args, reset)
    complete = files(out)
    for at in spread:
        if before is not None:
            shutil.rmtree(out)
            shutil.copytree(prepared, out)
        else:
            shutil.rmtree(out, ignore_errors=True)
        interrupted(args, at, signum, capsys)
        assert leftovers(tmp_path) == [], at
        if out.exists() and files(out) != before:
            assert files(out) == complete, f"signal at call {at}: {out} holds part of the output"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_training_run_always_resumes_to_the_uninterrupted_weights(signum, prepared, checkpoint, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(prepared), "--out", str(out), *TRAIN]
    uninterrupted = from_pretrained(checkpoint).state_dict()
    spread = points(args, lambda: shutil.rmtree(out, ignore_errors=True))
    for at in spread:
        shutil.rmtree(out, ignore_errors=True)
        interrupted(args, at, signum, capsys)
        assert leftovers(tmp_path) == [], at
        saved = sorted((out / "checkpoints").glob("step-*")) if out.exists() else []
        # Only a signal before training began leaves no checkpoint, and then nothing was written at all.
        assert saved or not (out / "checkpoints").exists(), at
        again = args + (["--resume"] if saved else [])
        assert main(again) == 0, capsys.readouterr().err[-2000:]
        resumed = from_pretrained(out / "checkpoints" / "step-0000003").state_dict()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), f"signal at call {at}"


@pytest.mark.slow
def test_ctrl_c_reaches_prepare_workers_without_a_traceback_from_each(prepared, tmp_path):
    """Ctrl-C goes to the terminal's whole process group: the tokenizer worker processes included."""
    big = tmp_path / "big.txt"
    big.write_text((CORPUS / "tinyshakespeare.txt").read_text() * 3)
    child = subprocess.Popen([sys.executable, "-m", "yuanmoe.cli", "data", "prepare", str(big), "--out",
                              str(tmp_path / "out"), "--tokenizer", str(prepared / "tokenizer"), "--workers", "2"],
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, stderr=subprocess.PIPE,
                             start_new_session=True)
    seen = b""
    while b"tokenizing" not in seen:
        chunk = child.stderr.read1(4096)
        assert chunk, seen.decode()[-2000:]
        seen += chunk
    os.killpg(child.pid, signal.SIGINT)
    err = seen + child.stderr.read()
    assert child.wait(timeout=60) == 130, err.decode()[-2000:]
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()[-3000:]
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
