"""Localized Filtering-based Attention (LFA), the attention of Yuan 2.0.

Queries and keys see a locally filtered input: two causal convolutions of kernel 2 over time
(hidden -> hidden/2 -> hidden) plus a residual and an RMSNorm, so f[t] mixes x[t-2..t].
Values come from the unfiltered input. RoPE (fp32) covers the first `rotary_dim` dims of a head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import YuanConfig
from .cache import DecodeCache
from .norm import RMSNorm


class LocalizedFilter(nn.Module):
    """f[t] = RMSNorm(c2[t] + x[t]) with c1 = conv1(x), c2 = conv2(c1), causal kernel-2 convolutions.

    A convolution over (earlier, current) is one linear map of their concatenation: conv1.weight
    is [hidden/2, 2*hidden] = [A0 | A1], A0 multiplying the earlier token.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.conv1 = nn.Linear(2 * hidden_size, hidden_size // 2)
        self.conv2 = nn.Linear(hidden_size, hidden_size)
        self.norm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [b, s, h]; keep: [b, s] True where the token has a predecessor in its document;
        state: [b, 2, h] the two inputs before x (None at the start of the sequence).
        Returns the filtered input and the new state (the last two inputs, masked the same way)."""
        keep = keep.unsqueeze(-1).to(x.dtype)
        if state is None:
            prev_x = F.pad(x[:, :-1], (0, 0, 1, 0)) * keep
            c1_before = x.new_zeros(x.shape[0], 1, self.conv1.out_features)
            c1 = self.conv1(torch.cat([prev_x, x], dim=-1))
        else:
            prev_x = torch.cat([state[:, 1:], x[:, :-1]], dim=1) * keep
            # conv1 of the state's last pair and of x's pairs in one product: one read of its weight
            c1 = self.conv1(torch.cat([state.flatten(1).unsqueeze(1), torch.cat([prev_x, x], dim=-1)], dim=1))
            c1_before, c1 = c1[:, :1], c1[:, 1:]
        prev_c1 = torch.cat([c1_before, c1[:, :-1]], dim=1) * keep
        c2 = self.conv2(torch.cat([prev_c1, c1], dim=-1))
        new_state = torch.cat([prev_x[:, -1:], x[:, -1:]], dim=1)
        return self.norm(c2 + x), new_state


def rope_inv_freq(config: YuanConfig) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies [rotary_dim / 2] and the factor q and k are scaled by after rotation.

    Plain RoPE: b^(-2i/D). With YaRN (the official vLLM port's `use_yarn`, spec section 7) the
    low-frequency dims, those that turn less than once (beta_slow = 1) over the original context L,
    are divided by the scale factor s, those that turn more than 32 times (beta_fast) are kept, a
    linear ramp in between; and mscale = (0.1 ln s + 1) * attn_factor."""
    dim, base = config.rope_dim, config.rope_base
    inv_freq = base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    s = config.yarn_scale_factor
    if s is None:
        return inv_freq.float(), 1.0
    original = config.yarn_original_max_position or config.max_position_embeddings

    def corr_dim(rotations: float) -> float:
        return dim * math.log(original / (2 * math.pi * rotations)) / (2 * math.log(base))

    low, high = max(math.floor(corr_dim(32)), 0), min(math.ceil(corr_dim(1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    mask = 1 - ramp
    mscale = (0.1 * math.log(s) + 1 if s > 1 else 1.0) * config.yarn_attn_factor
    return (inv_freq / ((1 - mask) * s + mask)).float(), mscale


def rope_description(config: YuanConfig) -> str:
    """One line saying which RoPE a model uses, for the log of a loaded checkpoint."""
    text = f"base {config.rope_base:g} over the first {config.rope_dim} dims of each head"
    if config.yarn_scale_factor is None:
        return text + ", no scaling"
    original = config.yarn_original_max_position or config.max_position_embeddings
    return (text + f", YaRN scale {config.yarn_scale_factor:g} from {original} to "
            f"{config.max_position_embeddings} positions, mscale {rope_inv_freq(config)[1]:.4f}")


def rope_cos_sin(position_ids: torch.Tensor, config: YuanConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [b, 1, s, rotary_dim] for rotate-half RoPE (times YaRN's mscale, if any)."""
    inv_freq, mscale = rope_inv_freq(config)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    if mscale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * mscale, emb.sin() * mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head of x [b, heads, s, head_dim], in fp32."""
    rot = cos.shape[-1]
    xr, x_pass = x[..., :rot].float(), x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v. One query per row (a decode step) is a plain matmul and an
    fp32 softmax, as in the official code: PyTorch's fused CPU kernel is 5-10x slower for a single
    query (bf16, one thread, 8 rows x 4 heads x 192 keys: 476 vs 91 us; x 1024 keys: 2.9 vs 0.3 ms)."""
    if mask is None or q.shape[2] != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype) @ v


class LocalizedFilteringAttention(nn.Module):
    def __init__(self, config: YuanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        proj = config.attention_projection_size
        self.q_proj = nn.Linear(config.hidden_size, proj, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, proj, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, proj, bias=False)
        self.o_proj = nn.Linear(proj, config.hidden_size, bias=False)
        self.lf_gate = LocalizedFilter(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor,
                mask: torch.Tensor | None, cache: DecodeCache | None = None) -> torch.Tensor:
        """x: [b, s, hidden] normed input. mask: bool [b, 1, s, keys] (True = may attend; with a cache
        the keys are all of its slots), or None for plain causal attention over x alone (with a cache:
        an empty one, which x fills from slot 0)."""
        b, s, _ = x.shape
        heads = (b, s, self.num_heads, self.head_dim)
        # The state of an empty cache is zeros, unused: a first token has position 0 (keep False).
        state = cache.lfa_state(self.layer_idx) if cache is not None else None
        f, new_state = self.lf_gate(x, keep, state)
        q = apply_rope(self.q_proj(f).view(heads).transpose(1, 2), *rope)
        k = apply_rope(self.k_proj(f).view(heads).transpose(1, 2), *rope)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        if cache is not None:
            cache.update_lfa(self.layer_idx, new_state, x)
            k, v = cache.update(self.layer_idx, k, v)
            if mask is None:
                k, v = k[:, :, :s], v[:, :, :s]
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
