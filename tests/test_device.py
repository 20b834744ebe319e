"""One device and dtype policy: `--device auto|cpu|cuda|cuda:N` and `--dtype float32|bfloat16|float16`
on every command that runs a model, parsed by yuanmoe.device."""

from __future__ import annotations

import argparse

import pytest
import torch

from conftest import GOLDEN
from yuanmoe.cli import build_parser, main
from yuanmoe.device import add_device_options, autocast, dtype_name, resolve_device, resolve_dtype
from yuanmoe.evaluation.tasks import TASKS

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


# ------------------------------------------------------------------------------------ the helper
@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """What resolve_device sees on a machine with two GPUs (torch.device needs no GPU to exist)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_is_the_cpu_without_a_gpu(without_cuda):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == resolve_device(torch.device("cpu", 0)) == torch.device("cpu")


def test_auto_and_cuda_are_the_gpu_of_this_rank(two_gpus, monkeypatch):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^device 'cuda:2' does not exist: this machine has 2 GPU\(s\)"):
        resolve_device("cuda:2")


def test_cuda_without_a_gpu_is_one_clear_sentence(without_cuda):
    for name in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match=r"this machine has no usable CUDA GPU .*; use cpu or auto$") as err:
            resolve_device(name)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:x", "cuda:-1", "", "meta"])
def test_unknown_devices_name_the_accepted_ones(name):
    with pytest.raises(ValueError, match=r"^unknown device .*; use auto, cpu, cuda or cuda:N$"):
        resolve_device(name)


@pytest.mark.parametrize("name, dtype", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("torch.bfloat16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16),
    (torch.float16, torch.float16), (None, None),
])
def test_dtype_names_and_aliases(name, dtype):
    assert resolve_dtype(name) == dtype


def test_unknown_dtype_lists_the_choices_and_names_are_canonical():
    with pytest.raises(ValueError, match=r"^unknown dtype 'int8'; choose auto or one of float32, bfloat16, float16$"):
        resolve_dtype("int8")
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8)] == \
        ["float32", "bfloat16", "float16", "int8"]


def test_autocast_only_for_reduced_precision():
    cpu = torch.device("cpu")
    for dtype in (None, torch.float32):
        with autocast(cpu, dtype):
            assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_options_normalise_while_parsing_and_reject_misspellings_in_one_sentence(capsys):
    parser = argparse.ArgumentParser(prog="cmd")
    add_device_options(parser, "what the dtype does", dtype_default="bfloat16")
    assert vars(parser.parse_args([])) == {"device": "auto", "dtype": "bfloat16"}
    assert vars(parser.parse_args(["--device", "CUDA:1", "--dtype", "fp16"])) == \
        {"device": "cuda:1", "dtype": "float16"}
    for bad, message in ((["--device", "gpu"], "argument --device: unknown device 'gpu'"),
                         (["--dtype", "int4"], "argument --dtype: unknown dtype 'int4'")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------- every command
# The positional arguments and required options of each command that runs a model.
MODEL_COMMANDS = {
    "generate": ["generate", "CKPT", "a prompt"],
    "chat": ["chat", "CKPT"],
    "serve": ["serve", "CKPT"],
    "convert": ["convert", "SRC", "OUT", "--to", "native"],
    **{f"eval {task}": ["eval", task, "CKPT"] for task in TASKS},
    "eval perplexity": ["eval", "perplexity", "CKPT", "DATA"],
    "eval harness": ["eval", "harness", "CKPT", "--tasks", "arc_easy"],
    "train": ["train", "--data", "DATA", "--out", "OUT"],
    "experiment routers": ["experiment", "routers", "--out", "OUT"],
    "experiment experts": ["experiment", "experts", "--out", "OUT"],
}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_device_and_dtype(command):
    parser = build_parser()
    args = parser.parse_args(MODEL_COMMANDS[command] + ["--device", "cuda:1", "--dtype", "bf16"])
    assert args.device == "cuda:1" and resolve_dtype(args.dtype) == torch.bfloat16
    default = parser.parse_args(MODEL_COMMANDS[command]).device
    assert default == ("cpu" if command == "convert" else "auto")  # convert only reads and writes weights
    with pytest.raises(SystemExit):
        parser.parse_args(MODEL_COMMANDS[command] + ["--device", "gpu"])


# ------------------------------------------------------------------------------ end to end
def test_generate_on_the_cpu_in_bfloat16(golden_with_tokenizer, capsys):
    from yuanmoe.checkpoint import from_pretrained
    from yuanmoe.inference import SamplingParams, complete
    from yuanmoe.tokenizer import load_tokenizer

    prompt = "To be, or not"
    assert main(["generate", str(golden_with_tokenizer), prompt, "--max-new-tokens", "8",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    model = from_pretrained(golden_with_tokenizer, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    expected = complete(model, load_tokenizer(golden_with_tokenizer), [prompt],
                        SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert len(expected.output_ids) > 0
    assert capsys.readouterr().out == expected.text + "\n"


@no_gpu_here
@pytest.mark.parametrize("command", ["generate", "chat", "serve", "convert", "eval perplexity"])
def test_cuda_on_a_machine_without_one_exits_2_with_one_sentence(command, golden_with_tokenizer, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    argv = [str(golden_with_tokenizer) if a in ("CKPT", "SRC") else str(text) if a == "DATA"
            else str(tmp_path / "out") if a == "OUT" else a for a in MODEL_COMMANDS[command]]
    assert main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda' was asked for but this machine has no usable CUDA GPU")
    assert err.count("\n") == 1 and err.rstrip().endswith("use cpu or auto")


def test_int8_quantization_runs_only_in_bfloat16(golden_with_tokenizer, capsys):
    assert main(["generate", str(golden_with_tokenizer), "To be", "--quantize", "int8", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --quantize int8 computes in bfloat16") and err.count("\n") == 1
    assert main(["generate", str(golden_with_tokenizer), "To be", "--max-new-tokens", "4", "--device", "cpu",
                 "--quantize", "int8"]) == 0


def test_from_pretrained_takes_the_same_device_and_dtype_names():
    from yuanmoe.checkpoint import from_pretrained

    model = from_pretrained(GOLDEN, dtype="fp16", device="auto")
    assert model.dtype == torch.float16
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        from_pretrained(GOLDEN, dtype="float8")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        from_pretrained(GOLDEN, device="tpu")
