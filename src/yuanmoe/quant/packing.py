"""Group-wise weight quantization: codes, scales and zeros, and the bit layouts they are stored in.

A weight w [out, in] is cut along `in` into groups of `group_size` columns; group g of output row
o decodes as

    w[o, i] = (code[o, i] - mid) * scale[g, o] + zero[g, o]          mid = 2^(bits-1)

held as `scales_and_zeros` [groups, out, 2], the form the CPU kernels read. Symmetric
weights have zero = 0. The AutoGPTQ form `scale * (code - z)` maps to it with
zero = scale * (mid - z).

Stored layout (`pack_tiles`): tiles of 16 output rows in which each 64-byte chunk holds 4 (8 bits)
or 8 (4 bits) consecutive input columns of every row of the tile, the operand shape of the CPU
kernels' integer dot products; 8-bit codes as int8 `code - mid`, 4-bit codes two to a byte.
"""

from __future__ import annotations

import math

import torch

BITS = (4, 8)
TILE = 16  # output rows per tile of the stored layouts
COLUMNS = 32  # input columns and group sizes must be multiples of this (the kernels' activation block)


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


def regular_group(cols: int, group_size: int) -> int:
    """The group size of the stored scales for an AutoGPTQ weight of `cols` input columns: its own, or,
    when it does not divide `cols` (AutoGPTQ's last group is then shorter), gcd(group_size, cols):
    each such group lies inside one of AutoGPTQ's, so repeating its scale and zero is exact."""
    return group_size if cols % group_size == 0 else math.gcd(group_size, cols)


def pack_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., out, in] (< 2^bits; out a multiple of 16, in of 8) -> the tiled layout the
    CPU kernels read (csrc/qkernels.c): 4 bits packed uint8 [..., out, in/2], 8 bits int8 code - 128
    [..., out, in]. Per tile of 16 rows and chunk of 8 (4 bits) or 4 (8 bits) columns, 64 bytes:
    each row's 4 bytes in turn; at 4 bits byte i holds columns i (low nibble) and 4 + i (high)."""
    *lead, out, inp = codes.shape
    tiles = out // TILE
    if bits == 4:
        c = codes.reshape(*lead, tiles, TILE, inp // 8, 2, 4)
        packed = c[..., 0, :] | (c[..., 1, :] << 4)  # [..., tiles, 16, chunks, 4]
        return packed.transpose(-3, -2).reshape(*lead, out, inp // 2).contiguous()
    signed = (codes.to(torch.int16) - 128).to(torch.int8).reshape(*lead, tiles, TILE, inp // 4, 4)
    return signed.transpose(-3, -2).reshape(*lead, out, inp).contiguous()


def unpack_tiles(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_tiles: codes [..., out, in], uint8 in [0, 16) at 4 bits, int8 code - 128 at 8."""
    *lead, out, width = packed.shape
    tiles = out // TILE
    if bits == 4:
        c = packed.reshape(*lead, tiles, width // 4, TILE, 4).transpose(-3, -2)  # [..., tiles, 16, chunks, 4]
        return torch.stack([c & 15, c >> 4], dim=-2).reshape(*lead, out, 2 * width)
    return packed.reshape(*lead, tiles, width // 4, TILE, 4).transpose(-3, -2).reshape(*lead, out, width)


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
