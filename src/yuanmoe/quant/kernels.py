"""The CPU int4/int8 kernels (csrc/qkernels.c), chosen once per process by what the CPU has.

Kernels, best first: `avx512-vnni` (vpdpbusd: AVX-512 F/BW/VL/DQ + VNNI: Ice Lake, Sapphire Rapids,
Zen 4 and later), `avx2` (vpmaddubsw: Haswell, Zen 1 and later), `scalar` (portable C, any CPU,
ARM included), and `torch` (no compiled kernels: the pure-PyTorch dequantize + matmul path of
modules.py, used where the extension was not built). The environment variable
YUANMOE_CPU_KERNEL forces one of them (a kernel this CPU cannot run is refused in one sentence).

Each kernel takes activations in one of two modes (the quantized modules' `activations`):
* `int8` (the default): each row is quantized per block of 32 values (scale max|x| / 127) and
  multiplied with integer dot products, as llama.cpp's Q4_0 x Q8_0 and Q8_0 x Q8_0 do;
* `float`: fp32 activations times the codes decoded in registers: the pure-PyTorch result up to
  summation order (the golden tests' mode).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os

import torch

from ..device import cpu_flags

KERNEL_ENV = "YUANMOE_CPU_KERNEL"
ISAS = ("scalar", "avx2", "avx512-vnni")  # the C enum's order
KERNEL_NAMES = ("torch", *ISAS)
ACTIVATIONS = ("int8", "float")
TILE, QBLOCK = 16, 32  # output rows per weight tile; activation values per int8 block


class _Weight(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("sz", ctypes.c_void_p), ("out", ctypes.c_int64), ("in_", ctypes.c_int64),
                ("group", ctypes.c_int64), ("bits", ctypes.c_int32), ("sz_bf16", ctypes.c_int32),
                ("sym", ctypes.c_int32), ("pad", ctypes.c_int32)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where `pip install -e .` could not build them."""
    try:
        lib = ctypes.CDLL(importlib.import_module(f"{__package__}._qkernels").__file__)
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.yk_isa_supported.argtypes, lib.yk_isa_supported.restype = [i32], i32
        lib.yk_linear.argtypes, lib.yk_linear.restype = [i32, i32, p, p, i32, i64, p, i32], None
        lib.yk_experts.argtypes, lib.yk_experts.restype = [i32, i32, p, i64, i64, p, i64, i64, i64, p, i32, p, p,
                                                           i32], None
    except (ImportError, OSError, AttributeError):  # not built, or built from an older source (no such symbol)
        return None
    return lib


def available() -> list[str]:
    """The kernels this machine can run, best last."""
    lib = _library()
    return ["torch"] + ([isa for n, isa in enumerate(ISAS) if lib.yk_isa_supported(n)] if lib else [])


@functools.cache
def selected() -> str:
    """The kernel every quantized CPU matmul of this process uses: YUANMOE_CPU_KERNEL, else the best
    one this CPU runs."""
    have = available()
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if not forced:
        return have[-1]
    if forced not in KERNEL_NAMES:
        raise ValueError(f"{KERNEL_ENV}={forced!r} is not a kernel; use one of {', '.join(KERNEL_NAMES)}")
    if forced not in have:
        why = ("the C extension was not built (reinstall with `pip install -e .` where a C compiler is present)"
               if _library() is None else "this CPU lacks its instructions")
        raise ValueError(f"{KERNEL_ENV}={forced}: {why}; this machine runs {', '.join(have)}")
    return forced


def describe() -> str:
    """One line for the load log: the kernel and what the CPU has."""
    flags = cpu_flags()
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                         "asimd", "asimddp") if f in flags]
    return (f"CPU kernel {selected()} (torch capability {torch.backends.cpu.get_cpu_capability()}"
            f"{'; flags ' + ' '.join(shown) if shown else ''})")


def usable(x: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, in_features: int,
           group_size: int) -> bool:
    """Whether the compiled kernel computes this product (else modules.py's pure-PyTorch path)."""
    return (x.device.type == "cpu" and scales_and_zeros.device.type == "cpu" and selected() != "torch"
            and x.dtype in (torch.float32, torch.bfloat16)
            and scales_and_zeros.dtype in (torch.float32, torch.bfloat16)
            and out_features % TILE == 0 and in_features % QBLOCK == 0 and group_size % QBLOCK == 0)


@functools.lru_cache(maxsize=4096)
def _weight_struct(w: int, sz: int, out: int, inp: int, group: int, bits: int, bf16: int, sym: int) -> _Weight:
    return _Weight(w, sz, out, inp, group, bits, bf16, sym, 0)


def _weight(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int, symmetric: bool) -> _Weight:
    """The kernels' description of one matrix (cached: a decode step asks for the same ones again)."""
    groups, out = scales_and_zeros.shape[-3:-1]
    inp = qweight.shape[-1] * (2 if bits == 4 else 1)
    return _weight_struct(qweight.data_ptr(), scales_and_zeros.data_ptr(), out, inp, inp // groups, bits,
                          int(scales_and_zeros.dtype == torch.bfloat16), int(symmetric))


def _check_mode(mode: str) -> None:
    if mode not in ACTIVATIONS:
        raise ValueError(f"unknown activations {mode!r}; use one of {', '.join(ACTIVATIONS)}")


def linear(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int, symmetric: bool,
           activations: str) -> torch.Tensor:
    """x [rows, in] @ W.T -> fp32 [rows, out] for a tiled weight (packing.py) and its scales."""
    _check_mode(activations)
    x = x.contiguous()
    w = _weight(qweight, scales_and_zeros, bits, symmetric)
    y = torch.empty(x.shape[0], w.out, dtype=torch.float32)
    _library().yk_linear(ISAS.index(selected()), int(activations == "float"), ctypes.byref(w), x.data_ptr(),
                         int(x.dtype == torch.bfloat16), x.shape[0], y.data_ptr(), torch.get_num_threads())
    return y


def experts(x: torch.Tensor, counts: torch.Tensor, w1: tuple[torch.Tensor, torch.Tensor],
            w2: tuple[torch.Tensor, torch.Tensor], bits: int, symmetric: bool, activations: str) -> torch.Tensor:
    """The SwiGLU experts of one layer in one call: x [N, d] rows sorted by expert, counts [E];
    w1 = (qweight [E, 2F, ...], scales_and_zeros [E, groups, 2F, 2]), w2 likewise for [E, d, F].
    Returns fp32 [N, d]. The rows are prepared once, the hidden activations once per expert."""
    _check_mode(activations)
    (q1, s1), (q2, s2) = w1, w2
    a, b = _weight(q1[0], s1[0], bits, symmetric), _weight(q2[0], s2[0], bits, symmetric)
    x = x.contiguous()
    out = torch.empty(x.shape[0], b.out, dtype=torch.float32)
    counts = counts.to(torch.int64).contiguous()
    _library().yk_experts(ISAS.index(selected()), int(activations == "float"),
                          ctypes.byref(a), q1[0].nbytes, s1[0].nbytes, ctypes.byref(b), q2[0].nbytes, s2[0].nbytes,
                          q1.shape[0], x.data_ptr(), int(x.dtype == torch.bfloat16), counts.data_ptr(),
                          out.data_ptr(), torch.get_num_threads())
    return out
