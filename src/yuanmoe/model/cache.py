"""Preallocated decoding state: per layer a K/V cache and the last two LFA filter inputs."""

from __future__ import annotations

import torch

from ..config import YuanConfig


class DecodeCache:
    """Static decoding state for a batch of sequences that advance together.

    k, v:  [layers, batch, heads, max_len, head_dim], written in place, never concatenated.
    lfa:   [layers, batch, 2, hidden], the filter inputs x[t-2], x[t-1] of the next token
           (zeros where they belong to no document of that row).
    valid: [batch, max_len], which cached keys the next tokens may attend to: those of each row's
           current document (so left padding and earlier packed documents are never seen).
    """

    def __init__(self, config: YuanConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model's context "
                             f"({config.max_position_embeddings} positions)")
        shape = (config.num_layers, batch_size, config.num_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lfa = torch.zeros(config.num_layers, batch_size, 2, config.hidden_size, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (in that order), e.g. to drop finished sequences."""
        for name in ("k", "v", "lfa"):
            setattr(self, name, getattr(self, name).index_select(1, index))
        self.valid = self.valid.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
