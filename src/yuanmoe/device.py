"""One device and dtype policy for every command: `--device auto|cpu|cuda|cuda:N` and
`--dtype float32|bfloat16|float16`, parsed in one place.

`auto` is CUDA when a GPU is present (under torchrun, the GPU of LOCAL_RANK), else the CPU.
Training uses the dtype for autocast (fp32 master weights); inference loads the weights in it.
`--dtype auto` follows the hardware: bfloat16 on CUDA and on CPUs with native bf16 arithmetic
(AVX-512-BF16, AMX, Arm BF16), float32 on other CPUs, where bf16 is emulated and slower than fp32.

The command line checks the spelling of `--device` while parsing and whether the device exists
when the command runs, so `--device cuda` on a machine without a GPU ends in one sentence (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import re
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Short names people type; help texts list only the canonical ones.
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_DEVICE = re.compile(r"auto|cpu(:\d+)?|cuda(:\d+)?")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch.device that `name` means here, or a one-sentence error when it is not available.
    `cuda` without an index is the GPU of LOCAL_RANK (0 outside torchrun)."""
    text = _device_text(name)
    if text == "auto":
        return _local_gpu() if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {text!r} was asked for but this machine has no usable CUDA GPU "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is false); use cpu or auto")
    device = torch.device(text)
    if device.index is None:
        return _local_gpu()
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _device_text(name: str | torch.device | None) -> str:
    """`name` as canonical text (auto, cpu, cuda, cuda:N), or a one-sentence error for other names."""
    text = "auto" if name is None else str(name).strip().lower()
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"unknown device {str(name)!r}; use auto, cpu, cuda or cuda:N")
    return "cpu" if text.startswith("cpu") else text  # torch has one CPU device, whatever its index


def _local_gpu() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    match = re.search(r"^(flags|Features)\s*:(.*)$", text, re.M)
    return frozenset(match.group(2).split()) if match else frozenset()


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512-BF16 and AMX; Arm's BF16 is "bf16"


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in _NATIVE_BF16_FLAGS)


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """What `--dtype auto` means on `device`: bf16 where the hardware computes it natively, else fp32."""
    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """torch dtype for a name or alias (fp32, bf16, fp16, half; auto: auto_dtype(device)); None stays
    None ('as stored' / 'the default'), a torch.dtype stays itself."""
    if name is None or isinstance(name, torch.dtype):
        return name
    text = str(name).strip().lower().removeprefix("torch.")
    if text == "auto":
        return auto_dtype(device)
    key = _ALIASES.get(text, text)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {str(name)!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype (float32, bfloat16, float16; others as torch spells them)."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def add_device_options(parser: argparse.ArgumentParser, dtype_help: str, dtype_default: str | None = None,
                       device_default: str = "auto") -> None:
    """--device and --dtype, the same on every command that runs a model. args.device is the
    device's text (pass it to resolve_device when the command runs); args.dtype a canonical name
    or dtype_default."""
    parser.add_argument("--device", type=device_argument, default=device_default, metavar="DEVICE",
                        help=f"auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default {device_default})")
    parser.add_argument("--dtype", type=dtype_argument, default=dtype_default, metavar="DTYPE",
                        help=f"auto | {' | '.join(DTYPES)}: {dtype_help} (auto: bfloat16 on CUDA and on CPUs "
                             f"with native bf16, else float32)")


def device_argument(text: str) -> str:
    """argparse `type=` for a device option: the canonical text; misspellings are refused while
    parsing, a missing GPU only when the command runs (resolve_device)."""
    try:
        return _device_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dtype_argument(text: str) -> str:
    """argparse `type=` for a dtype option: the canonical name of a name or alias, or auto (resolved
    when the command knows its device)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return dtype_name(resolve_dtype(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision on `device` in `dtype`; nothing for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let the process reuse the memory of freed CPU tensors instead of faulting in fresh pages.

    glibc serves every block above 32 MB with its own mmap and unmaps it on free, so a training
    step that allocates the same large tensors as the last one (bf16 copies of stacked expert
    weights, their gradients, big activations) pays a page fault per 4 KB every step; with 64
    experts that is more time than the expert matmuls. This serves blocks up to 1 GB from the
    heap and keeps freed heap memory for reuse, as a caching allocator does: the process's memory
    stays at its high-water mark. Results are unchanged. True when applied (glibc on Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
