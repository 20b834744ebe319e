"""The LFA filter as a vLLM state layer.

f[t] = RMSNorm(conv2(conv1(x)) [t] + x[t]), two causal kernel-2 convolutions, so f[t] needs the
inputs x[t-2], x[t-1]. Across the steps of one request those two rows are its state, kept in vLLM's
per-request state cache the way vLLM keeps the convolution state of short-convolution models
(`MambaBase` with the SHORT_CONV backend: one cache slot per request, its index in the batch
metadata, decode rows first, then prefill chunks). Zero padding at the start of a sequence follows
from the token positions: x[t-1] counts only where t >= 1, x[t-2] and the first convolution's output
at t-1 only where t >= 2 and t >= 1, so a slot's stale content is never read. The arithmetic is
that of the spec's section 2, in plain torch on every platform.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum


def lfa_state_shape(hidden_size: int) -> tuple[tuple[int, int]]:
    """The state of one request in one layer: its last two filter inputs, [2, hidden]."""
    return ((2, hidden_size),)


class LocalizedFilter(MambaBase, nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, prefix: str):
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.prefix = prefix
        # Replicated on every tensor-parallel rank: the filter reads the whole hidden vector.
        self.conv1 = ReplicatedLinear(2 * hidden_size, hidden_size // 2, bias=True, return_bias=False,
                                      prefix=f"{prefix}.conv1")
        self.conv2 = ReplicatedLinear(hidden_size, hidden_size, bias=True, return_bias=False,
                                      prefix=f"{prefix}.conv2")
        self.output_layernorm = RMSNorm(hidden_size, eps=eps)
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # a profiling or warm-up run: one sequence, no state
            zero = x.new_zeros(2, self.hidden_size)
            return self._filter(x, positions, _shifted(x, 1, zero[1:]), _shifted(x, 2, zero))
        n = metadata.num_decode_tokens + metadata.num_prefill_tokens
        x_used, positions = x[:n], positions[:n]
        slots, lengths = _requests(metadata)
        starts = torch.cumsum(lengths, 0) - lengths
        token_slot = torch.repeat_interleave(slots, lengths, output_size=n)
        offset = torch.arange(n, device=x.device) - torch.repeat_interleave(starts, lengths, output_size=n)
        state = self.kv_cache[0]
        saved = state[token_slot].to(x.dtype)  # [n, 2, hidden]: the two inputs before each request's chunk
        index = torch.arange(n, device=x.device)
        in_chunk1 = (offset >= 1).unsqueeze(-1)
        prev1 = torch.where(in_chunk1, x_used[(index - 1).clamp(min=0)], saved[:, 1])
        before2 = torch.where(in_chunk1, saved[:, 1], saved[:, 0])
        prev2 = torch.where((offset >= 2).unsqueeze(-1), x_used[(index - 2).clamp(min=0)], before2)
        out = self._filter(x_used, positions, prev1, prev2)
        last = starts + lengths - 1
        kept_prev1 = prev1[last] * (positions[last] >= 1).unsqueeze(-1).to(x.dtype)
        state[slots] = torch.stack([kept_prev1, x_used[last]], dim=1).to(state.dtype)
        return torch.cat([out, x[n:]]) if n < x.shape[0] else out

    def _filter(self, x: torch.Tensor, positions: torch.Tensor, prev1: torch.Tensor,
                prev2: torch.Tensor) -> torch.Tensor:
        """f for each row of x given the two inputs before it (masked here by position)."""
        has1 = (positions >= 1).unsqueeze(-1).to(x.dtype)
        has2 = (positions >= 2).unsqueeze(-1).to(x.dtype)
        prev1, prev2 = prev1 * has1, prev2 * has2
        c1 = self.conv1(torch.cat([prev1, x], dim=-1))
        c1_before = self.conv1(torch.cat([prev2, prev1], dim=-1)) * has1
        c2 = self.conv2(torch.cat([c1_before, c1], dim=-1))
        return self.output_layernorm(c2 + x)

    def get_state_shape(self) -> tuple[tuple[int, int]]:
        return lfa_state_shape(self.hidden_size)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (self.dtype,)

    @property
    def is_kv_cache_tp_replicated(self) -> bool:
        return True

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV


def _shifted(x: torch.Tensor, k: int, before: torch.Tensor) -> torch.Tensor:
    """Rows x[t-k] of one sequence, the k rows of `before` standing in for t < k."""
    return torch.cat([before, x[:-k]])[: x.shape[0]]


def _requests(metadata) -> tuple[torch.Tensor, torch.Tensor]:
    """State slot and token count of each request in the batch, decodes first (one token each)."""
    slots, lengths = [], []
    if metadata.num_decodes:
        decode_slots = metadata.state_indices_tensor_d[: metadata.num_decodes]
        slots.append(decode_slots[:, 0] if decode_slots.dim() > 1 else decode_slots)
        lengths.append(torch.ones_like(slots[-1]))
    if metadata.num_prefills:
        slots.append(metadata.state_indices_tensor_p[: metadata.num_prefills])
        lengths.append(torch.diff(metadata.query_start_loc_p[: metadata.num_prefills + 1]))
    return torch.cat(slots).long(), torch.cat(lengths).long()
