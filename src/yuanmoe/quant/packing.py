"""Group-wise weight quantization: codes, scales and zeros, and the bit layouts they are stored in.

A weight w [out, in] is cut along `in` into groups of `group_size` columns; group g of output row
o decodes as

    w[o, i] = (code[o, i] - mid) * scale[g, o] + zero[g, o]          mid = 2^(bits-1)

the form the PyTorch CPU int4 kernel takes (`scales_and_zeros` [groups, out, 2]). Symmetric
weights have zero = 0. The AutoGPTQ form `scale * (code - z)` maps to it with
zero = scale * (mid - z).

Stored layouts (modules.pack_codes): 8-bit codes as int8 `code - mid`, group-major [groups, out,
group_size]; 4-bit codes as the CPU int4 kernel's packed uint8 [out, in/2] (`pack_int4`): blocks of
64 output rows, where byte [k, j] of a block holds row j (low nibble) and row j + 32 (high nibble)
at column k.
"""

from __future__ import annotations

import torch

BITS = (4, 8)
INT4_BLOCK = 64  # output rows per block of the packed int4 layout
INT4_GROUP_SIZES = (32, 64, 128, 256)  # group sizes the CPU int4 kernel takes


def quantize_groups(w: torch.Tensor, bits: int, group_size: int,
                    symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization of w [..., out, in]: codes uint8 [..., out, in] in
    [0, 2^bits) and scales_and_zeros fp32 [..., groups, out, 2]."""
    *lead, out, inp = w.shape
    mid, top = 2 ** (bits - 1), 2 ** bits - 1
    g = w.detach().float().reshape(*lead, out, inp // group_size, group_size)
    if symmetric:  # codes 1..2^bits-1 around mid, so that +-max are both representable
        scale = (g.abs().amax(-1) / (mid - 1)).clamp(min=1e-12)
        zero = torch.zeros_like(scale)
    else:
        low, high = g.amin(-1), g.amax(-1)
        scale = ((high - low) / top).clamp(min=1e-12)
        zero = low + mid * scale  # the value code `mid` decodes to
    codes = torch.round((g - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + mid).clamp(0, top)
    sz = torch.stack([scale, zero], dim=-1).transpose(-3, -2)  # [..., groups, out, 2]
    return codes.reshape(*lead, out, inp).to(torch.uint8), sz.contiguous()


def dequantize(codes: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int,
               dtype: torch.dtype = torch.float32, symmetric: bool = False) -> torch.Tensor:
    """The weight [..., out, in] that codes (uint8 [0, 2^bits) or int8 code - mid) decode to,
    computed in `dtype` (codes and code - mid are exact in bf16); symmetric skips the zeros.
    In-place arithmetic: out-of-place broadcasting bf16 ops are ~10x slower on CPU."""
    *lead, out, inp = codes.shape
    groups = scales_and_zeros.shape[-3]
    w = codes.to(dtype)
    if codes.dtype == torch.uint8:
        w.sub_(2 ** (bits - 1))
    sz = scales_and_zeros.to(dtype).transpose(-3, -2)  # [..., out, groups, 2]
    grouped = w.view(*lead, out, groups, inp // groups)
    grouped.mul_(sz[..., 0].unsqueeze(-1).contiguous())
    if not symmetric:
        grouped.add_(sz[..., 1].unsqueeze(-1).contiguous())
    return w


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., out, in] (values < 16; out a multiple of 64) -> the packed layout [..., out, in/2]."""
    *lead, out, inp = codes.shape
    blocks = codes.reshape(*lead, out // INT4_BLOCK, 2, INT4_BLOCK // 2, inp).transpose(-2, -1)
    packed = blocks[..., 0, :, :] | (blocks[..., 1, :, :] << 4)  # [..., blocks, in, 32]
    return packed.reshape(*lead, out, inp // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 codes [..., out, in]."""
    *lead, out, half = packed.shape
    blocks = packed.reshape(*lead, out // INT4_BLOCK, 2 * half, INT4_BLOCK // 2)
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-3).transpose(-2, -1)  # [..., blocks, 2, 32, in]
    return codes.reshape(*lead, out, 2 * half)


def unpack_gptq_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ qweight int32 [in*bits/32, out] (consecutive rows packed low bits first) -> codes
    uint8 [out, in]."""
    return _unpack_int32(qweight, bits, dim=0).t().contiguous()


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ qzeros int32 [groups, out*bits/32] -> zero points [groups, out] (stored minus one)."""
    return _unpack_int32(qzeros, bits, dim=1).to(torch.int32) + 1


def _unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if dim == 0:  # [n, m] -> [n * per, m]
        values = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & (2 ** bits - 1)
        return values.reshape(-1, packed.shape[1]).to(torch.uint8)
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, per)) & (2 ** bits - 1)
    return values.reshape(packed.shape[0], -1).to(torch.uint8)
