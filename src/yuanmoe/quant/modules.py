"""Weight-only quantized stand-ins for nn.Linear and GroupedExperts, with the same forward contracts.

Activations stay in the model's dtype (bf16 for speed, fp32 for exactness tests). Each matmul takes
the fastest path measured for its shape (benchmarks/quant_kernels.py):
* a few rows (decoding): PyTorch's CPU weight-only kernels, `_weight_int8pack_mm` for 8 bits (once
  per group: it takes one scale per row), `_weight_int4pack_mm_for_cpu` for 4 bits; they read the
  packed weight directly;
* more rows (a prefill), or another device: the weight is dequantized, one matrix at a time, and
  multiplied by a dense matmul. This path is also the pure-PyTorch
  fallback wherever the kernels are missing (`KERNELS` False).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .packing import BITS, INT4_BLOCK, INT4_GROUP_SIZES, dequantize, pack_int4, quantize_groups, unpack_int4

# Most rows for which each kernel beats dequantize + dense bf16 matmul (benchmarks/quant_kernels.py:
# both kernels cost ~0.1 ms per row per 8M weights, linear in rows; dequantizing costs ~2 ms (int8)
# or ~11 ms (int4) per 8M cache-warm weights, once per call).
INT8_KERNEL_MAX_ROWS = 32
INT4_KERNEL_MAX_ROWS = 128
# The weight-only kernels fault on weights that are not 64-byte aligned (seen with 4-row int8 calls
# on memory-mapped tensors), so the modules copy any weight that is not.
ALIGN = 64
KERNELS = True  # tests switch the kernels off to run the pure-PyTorch path
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _int4_kernel_available() -> bool:
    """The CPU int4 kernel exists and packs weights the way pack_int4 does (checked once)."""
    try:
        probe = torch.arange(INT4_BLOCK * 4, dtype=torch.int32).remainder(16).view(INT4_BLOCK, 4)
        return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1),
                           pack_int4(probe.to(torch.uint8)))
    except (AttributeError, RuntimeError):
        return False


def check_shape(out_features: int, in_features: int, bits: int, group_size: int, name: str = "weight") -> None:
    """Raise ValueError when a [out, in] weight cannot be stored at these bits and group size."""
    if bits not in BITS:
        raise ValueError(f"{bits}-bit weights are not supported; use one of {', '.join(map(str, BITS))}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{name}: group size {group_size} does not divide its {in_features} input columns")
    if bits == 4 and (out_features % INT4_BLOCK or group_size not in INT4_GROUP_SIZES or in_features % 2):
        raise ValueError(f"{name} [{out_features}, {in_features}] cannot be packed at 4 bits with group size "
                         f"{group_size}: 4 bits need a multiple of {INT4_BLOCK} outputs and a group size of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}")


def pack_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """uint8 codes [..., out, in] -> the stored layout: packed int4 [..., out, in/2], or int8
    code - 128 grouped [..., groups, out, group_size] (each group a dense matrix for the int8 kernel)."""
    if bits == 4:
        return pack_int4(codes)
    signed = (codes.to(torch.int16) - 128).to(torch.int8)
    return signed.unflatten(-1, (-1, group_size)).movedim(-2, -3).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: codes [..., out, in] (uint8 at 4 bits, int8 code - 128 at 8 bits)."""
    return unpack_int4(qweight) if bits == 4 else qweight.movedim(-3, -2).flatten(-2)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                    dtype: torch.dtype = torch.bfloat16, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: a float weight [out, in] or stacked [E, out, in] -> (qweight, scales_and_zeros)
    as the modules hold them; group_size 0 means one group per output row. A stack is quantized one
    matrix at a time (one fp32 copy at most)."""
    group_size = group_size or w.shape[-1]
    check_shape(*w.shape[-2:], bits, group_size, name)
    if w.dim() == 3:
        parts = [quantize_weight(m, bits, group_size, symmetric, dtype, name) for m in w]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    codes, sz = quantize_groups(w, bits, group_size, symmetric)
    return pack_codes(codes, bits, group_size), sz.to(dtype)


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int,
                 symmetric: bool) -> torch.Tensor:
    """x [rows, in] @ dequantize(qweight, scales_and_zeros).T -> [rows, out] in x's dtype."""
    rows, groups = x.shape[0], scales_and_zeros.shape[0]
    group_size = x.shape[1] // groups
    on_cpu = KERNELS and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
    if (on_cpu and bits == 8 and rows <= INT8_KERNEL_MAX_ROWS
            and (groups == 1 or qweight[0].nbytes % ALIGN == 0)):  # every group's matrix aligned
        return _int8_groups(x.contiguous(), qweight, scales_and_zeros, symmetric)
    if on_cpu and bits == 4 and rows <= INT4_KERNEL_MAX_ROWS and _int4_kernel_available():
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), qweight, group_size, scales_and_zeros)
    return F.linear(x, dequantize(unpack_codes(qweight, bits), scales_and_zeros, bits, x.dtype, symmetric))


def _int8_groups(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
                 symmetric: bool) -> torch.Tensor:
    """The int8 kernel once per group (one, for one scale per row), partial sums in fp32."""
    groups, _, group_size = qweight.shape
    scale, zero = scales_and_zeros.unbind(-1)  # [groups, out]
    if groups == 1:
        y = torch._weight_int8pack_mm(x, qweight[0], scale[0].contiguous())  # the kernel reads scales densely
    else:
        y = sum(torch._weight_int8pack_mm(x[:, g * group_size:(g + 1) * group_size].contiguous(), qweight[g],
                                          scale[g].contiguous()).float() for g in range(groups)).to(x.dtype)
    if symmetric:
        return y
    return y + x.unflatten(-1, (groups, group_size)).sum(-1) @ zero


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % ALIGN == 0 or t.device.type != "cpu" else t.clone()


def _is_symmetric(scales_and_zeros: torch.Tensor) -> bool:
    return bool((scales_and_zeros[..., 1] == 0).all())


class QuantLinear(nn.Module):
    """A bias-free linear layer with group-quantized weights.

    qweight: int8 [groups, out, group_size] (8 bits) or packed uint8 [out, in/2] (4 bits);
    scales_and_zeros: [in / group_size, out, 2] in the activation dtype."""

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int,
                 bias: torch.Tensor | None = None, symmetric: bool | None = None):
        super().__init__()
        self.bits = bits
        groups, self.out_features = scales_and_zeros.shape[:2]
        self.in_features = qweight.shape[1] * 2 if bits == 4 else groups * qweight.shape[2]
        self.group_size = self.in_features // groups
        self.register_buffer("qweight", _aligned(qweight))
        self.register_buffer("scales_and_zeros", _aligned(scales_and_zeros))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # None: read the zeros (a folder that says it is symmetric spares that pass over its pages)
        self.symmetric = _is_symmetric(scales_and_zeros) if symmetric is None else symmetric

    @classmethod
    def quantize(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = True,
                 dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        """Round-to-nearest quantization of a float linear layer (its bias kept in `dtype`)."""
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(*quantize_weight(linear.weight, bits, group_size, symmetric, dtype), bits, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype), self.qweight,
                         self.scales_and_zeros, self.bits, self.symmetric)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantExperts(nn.Module):
    """GroupedExperts with group-quantized weights (same forward: rows sorted by expert, counts [E]).

    w1_qweight / w2_qweight: [E, ...] stacked as QuantLinear's qweight, w1/w2_scales_and_zeros
    [E, groups, out, 2]. One matmul per expert that has rows."""

    def __init__(self, tensors: dict[str, torch.Tensor], bits: int, symmetric: bool | None = None):
        super().__init__()
        self.bits = bits
        self.num_experts = tensors["w1_qweight"].shape[0]
        for name in ("w1_qweight", "w1_scales_and_zeros", "w2_qweight", "w2_scales_and_zeros"):
            t = tensors[name]
            # Each expert's matrix must be aligned, not only the first.
            self.register_buffer(name, _aligned(t) if t[0].nbytes % ALIGN == 0 else t.clone())
        self.symmetric = (_is_symmetric(self.w1_scales_and_zeros) and _is_symmetric(self.w2_scales_and_zeros)
                          if symmetric is None else symmetric)

    @classmethod
    def quantize(cls, w1: torch.Tensor, w2: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                 dtype: torch.dtype = torch.bfloat16) -> "QuantExperts":
        """Quantize GroupedExperts weights w1 [E, 2F, d], w2 [E, d, F]."""
        tensors = {}
        for name, w in (("w1", w1), ("w2", w2)):
            tensors[f"{name}_qweight"], tensors[f"{name}_scales_and_zeros"] = quantize_weight(
                w.detach(), bits, group_size, symmetric, dtype, name=f"experts.{name}")
        return cls(tensors, bits)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = self.w1_scales_and_zeros.dtype
        h = x.to(dtype)
        out = h.new_empty(h.shape[0], self.w2_scales_and_zeros.shape[2])
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = slice(start, start + n)
                a, b = quant_matmul(h[rows], self.w1_qweight[e], self.w1_scales_and_zeros[e], self.bits,
                                    self.symmetric).chunk(2, dim=-1)
                out[rows] = quant_matmul(F.silu(a) * b, self.w2_qweight[e], self.w2_scales_and_zeros[e],
                                         self.bits, self.symmetric)
                start += n
        return out.to(x.dtype)
