"""Weight-only quantized stand-ins for nn.Linear and GroupedExperts, with the same forward contracts.

On the CPU every product runs in the compiled kernel that kernels.py picked for this CPU (AVX-512
VNNI, AVX2 or portable C), at any number of rows, reading the stored tiles directly: decoding and
prefill alike, no weight is ever dequantized. `activations` says how the kernel takes its input:
"int8" (quantized per block of 32 values, the default) or "float" (exact fp32). Elsewhere (a GPU,
fp16 scales, no compiled extension, or `KERNELS` False in tests) the weight is dequantized one
matrix at a time and multiplied by a dense matmul: the pure-PyTorch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import ACTIVATIONS, experts, linear, usable
from .packing import BITS, COLUMNS, TILE, dequantize, pack_tiles, quantize_groups, unpack_tiles

KERNELS = True  # tests switch the kernels off to run the pure-PyTorch path
DEFAULT_ACTIVATIONS = "int8"


def check_shape(out_features: int, in_features: int, bits: int, group_size: int, name: str = "weight") -> None:
    """Raise ValueError when a [out, in] weight cannot be stored at these bits and group size."""
    if bits not in BITS:
        raise ValueError(f"{bits}-bit weights are not supported; use one of {', '.join(map(str, BITS))}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{name}: group size {group_size} does not divide its {in_features} input columns")
    if out_features % TILE or group_size % COLUMNS:
        raise ValueError(f"{name} [{out_features}, {in_features}] cannot be packed with group size {group_size}: "
                         f"the tiled layout needs a multiple of {TILE} outputs and a group size that is a "
                         f"multiple of {COLUMNS}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., out, in] -> the stored tiles (packing.pack_tiles)."""
    return pack_tiles(codes, bits)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: codes [..., out, in] (uint8 at 4 bits, int8 code - 128 at 8 bits)."""
    return unpack_tiles(qweight, bits)


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
    return pack_codes(codes, bits), sz.to(dtype)


def _kernel_ok(x: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, in_features: int) -> bool:
    return KERNELS and usable(x, scales_and_zeros, out_features, in_features,
                                      in_features // scales_and_zeros.shape[-3])


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int,
                 symmetric: bool, activations: str = DEFAULT_ACTIVATIONS) -> torch.Tensor:
    """x [rows, in] @ dequantize(qweight, scales_and_zeros).T -> [rows, out] in x's dtype."""
    out_features = scales_and_zeros.shape[-2]
    if _kernel_ok(x, scales_and_zeros, out_features, x.shape[1]):
        return linear(x, qweight, scales_and_zeros, bits, symmetric, activations).to(x.dtype)
    return F.linear(x, dequantize(unpack_codes(qweight, bits), scales_and_zeros, bits, x.dtype, symmetric))


def _is_symmetric(scales_and_zeros: torch.Tensor) -> bool:
    return bool((scales_and_zeros[..., 1] == 0).all())


def set_activations(model: nn.Module, activations: str) -> None:
    """How every quantized module of `model` feeds the CPU kernels: "int8" or "float" (exact)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; use one of {', '.join(ACTIVATIONS)}")
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            module.activations = activations


class QuantLinear(nn.Module):
    """A bias-free linear layer with group-quantized weights.

    qweight: the tiles of packing.pack_tiles, int8 [out, in] (8 bits) or packed uint8 [out, in/2]
    (4 bits); scales_and_zeros: [in / group_size, out, 2] in the activation dtype."""

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int,
                 bias: torch.Tensor | None = None, symmetric: bool | None = None):
        super().__init__()
        self.bits = bits
        groups, self.out_features = scales_and_zeros.shape[:2]
        self.in_features = qweight.shape[1] * (2 if bits == 4 else 1)
        self.group_size = self.in_features // groups
        self.activations = DEFAULT_ACTIVATIONS
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
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
                         self.scales_and_zeros, self.bits, self.symmetric, self.activations)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantExperts(nn.Module):
    """GroupedExperts with group-quantized weights (same forward: rows sorted by expert, counts [E]).

    w1_qweight / w2_qweight: [E, ...] stacked as QuantLinear's qweight, w1/w2_scales_and_zeros
    [E, groups, out, 2]. On the CPU kernels all experts run in one call; on the pure-PyTorch path,
    one matmul per expert that has rows."""

    def __init__(self, tensors: dict[str, torch.Tensor], bits: int, symmetric: bool | None = None):
        super().__init__()
        self.bits = bits
        self.num_experts = tensors["w1_qweight"].shape[0]
        self.activations = DEFAULT_ACTIVATIONS
        for name in ("w1_qweight", "w1_scales_and_zeros", "w2_qweight", "w2_scales_and_zeros"):
            self.register_buffer(name, tensors[name].contiguous())
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
        hidden, ffn = self.w2_scales_and_zeros.shape[-2], self.w1_scales_and_zeros.shape[-2] // 2
        if _kernel_ok(h, self.w1_scales_and_zeros, 2 * ffn, h.shape[1]) and \
                _kernel_ok(h, self.w2_scales_and_zeros, hidden, ffn):
            return experts(h, counts, (self.w1_qweight, self.w1_scales_and_zeros),
                           (self.w2_qweight, self.w2_scales_and_zeros), self.bits, self.symmetric,
                           self.activations).to(x.dtype)
        out = h.new_empty(h.shape[0], hidden)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = slice(start, start + n)
                a, b = quant_matmul(h[rows], self.w1_qweight[e], self.w1_scales_and_zeros[e], self.bits,
                                    self.symmetric, self.activations).chunk(2, dim=-1)
                out[rows] = quant_matmul(F.silu(a) * b, self.w2_qweight[e], self.w2_scales_and_zeros[e],
                                         self.bits, self.symmetric, self.activations)
                start += n
        return out.to(x.dtype)
