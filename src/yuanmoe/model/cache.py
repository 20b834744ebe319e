"""Preallocated decoding state: per layer a K/V cache and the last two LFA filter inputs.

Static in the gpt-fast sense: every tensor keeps its shape while decoding, the write position is a
tensor, and the cache updates itself in place (`update`, `update_lfa`, `advance`), so a decode step
reads no Python number that changes from step to step and compiles to one graph.
"""

from __future__ import annotations

import torch

from ..config import YuanConfig


SLOTTED = ("k", "v", "inputs")  # the per-layer tensors indexed by cache slot (dim 2)


class DecodeCache:
    """Static decoding state for a batch of sequences that advance together.

    k, v:   per layer [batch, heads, max_len, head_dim], written in place, never concatenated.
    lfa:    per layer [batch, 2, hidden], the filter inputs x[t-2], x[t-1] of the next token
            (zeros where they belong to no document of that row).
    inputs: per layer [batch, 1, max_len, hidden] every token's LFA input, only with
            `keep_inputs` (a prefix cache's source: from them the filter state at any position can
            be rebuilt), written at the same slots as k and v; else an empty list.
    valid:  [batch, max_len], which cached keys the next tokens may attend to: those of each row's
            current document (so left padding and earlier packed documents are never seen).
    next_position: [batch] the position id of each row's next token.
    length: [] int64, the slots written so far, which is where the next tokens go (every row
            advances together). A tensor, not a Python int, so that the decode step does not
            change from one token to the next.
    """

    def __init__(self, config: YuanConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", keep_inputs: bool = False):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model's context "
                             f"({config.max_position_embeddings} positions)")
        # One tensor per layer, not one stacked tensor: a compiled step updates each in place, while
        # writes into views of a stacked tensor made it copy the whole cache every step (measured:
        # 14.5 instead of 17.7 ms a step, small preset, batch 8).
        shape = (batch_size, config.num_heads, max_len, config.head_dim)
        layers = range(config.num_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.lfa = [torch.zeros(batch_size, 2, config.hidden_size, dtype=dtype, device=device) for _ in layers]
        self.inputs = [torch.zeros(batch_size, 1, max_len, config.hidden_size, dtype=dtype, device=device)
                       for _ in layers] if keep_inputs else []
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def slots(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] the cache slots the next `num_tokens` tokens are written to."""
        return self.length + torch.arange(num_tokens, device=self.length.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys and values [b, heads, s, head_dim] of `layer` at the next
        slots; returns the layer's whole K and V [b, heads, max_len, head_dim] (unwritten slots
        are zeros, for the attention mask to exclude)."""
        slots = self.slots(k.shape[2])
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def lfa_state(self, layer: int) -> torch.Tensor:
        """[b, 2, hidden] the two filter inputs before the next token of `layer`."""
        return self.lfa[layer]

    def update_lfa(self, layer: int, state: torch.Tensor, x: torch.Tensor) -> None:
        """The filter state after the new tokens x [b, s, hidden] (whose inputs are kept, if asked)."""
        self.lfa[layer].copy_(state)
        if self.inputs:
            self.inputs[layer].index_copy_(2, self.slots(x.shape[1]), x.unsqueeze(1))

    def advance(self, position_ids: torch.Tensor) -> None:
        """Account for the tokens just written ([b, s] positions; 0 starts a document): a row
        whose new tokens open a document no longer sees its earlier keys."""
        s = position_ids.shape[1]
        doc = torch.cumsum(position_ids == 0, dim=1)  # [b, s]; 0 = the document the cache ended in
        opened = doc[:, -1:] > 0
        self.valid.logical_and_(~opened)
        self.valid.index_copy_(1, self.slots(s), doc == doc[:, -1:])
        self.next_position.copy_(position_ids[:, -1] + 1)
        self.length.add_(s)

    def grow(self, max_len: int) -> None:
        """Make room for `max_len` slots in all, keeping what is written. A copy of the cache: for
        a caller that starts small and doubles, so attention never runs over many unused slots."""
        extra = max_len - self.max_len
        if extra <= 0:
            return
        for name in SLOTTED:
            setattr(self, name, [torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)
                                 for t in getattr(self, name)])
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch_size, extra)], dim=1)

    def append_rows(self, other: "DecodeCache") -> None:
        """Add the rows of `other` (sequences prefilled on their own) to this batch, right-aligned: the
        written slots of both end at one slot, the shorter side gaining invalid slots on its left, so
        every row writes its next token to the same slot. Positions, the LFA state and `valid` are per
        row, so no row sees the others' keys or changes its own computation."""
        mine, theirs = int(self.length), int(other.length)
        length = max(mine, theirs)
        capacity = length + max(self.max_len - mine, other.max_len - theirs)

        def aligned(t: torch.Tensor, written: int, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity
            out = t.new_zeros(shape)
            out.narrow(dim, length - written, written).copy_(t.narrow(dim, 0, written))
            return out

        for name in SLOTTED:
            setattr(self, name, [torch.cat([aligned(a, mine, 2), aligned(b, theirs, 2)])
                                 for a, b in zip(getattr(self, name), getattr(other, name))])
        self.lfa = [torch.cat([a, b]) for a, b in zip(self.lfa, other.lfa)]
        self.valid = torch.cat([aligned(self.valid, mine, 1), aligned(other.valid, theirs, 1)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.length.fill_(length)

    def trim(self, min_slots: int = 1) -> int:
        """Drop the leading slots that no row attends to any more (their rows have left), if there are
        at least `min_slots`, so a batch that new sequences keep joining does not grow without end;
        returns how many were dropped."""
        used = self.valid.any(dim=0)
        first = int(used.int().argmax()) if bool(used.any()) else int(self.length)
        if first >= max(min_slots, 1):
            for name in SLOTTED:
                setattr(self, name, [t[:, :, first:].clone() for t in getattr(self, name)])
            self.valid = self.valid[:, first:].clone()
            self.length.sub_(first)
            return first
        return 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (in that order), e.g. to drop finished sequences."""
        for name in (*SLOTTED, "lfa"):
            setattr(self, name, [t.index_select(0, index) for t in getattr(self, name)])
        self.valid = self.valid.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)

    def row_state(self, row: int, num_tokens: int) -> dict[str, list[torch.Tensor]]:
        """Copies of what row `row` holds for its last `num_tokens` written slots (its sequence, when
        that is one document): per layer k, v [heads, n, head_dim] and inputs [n, hidden]."""
        end = int(self.length)
        start = end - num_tokens
        return {"k": [t[row, :, start:end].clone() for t in self.k], "v": [t[row, :, start:end].clone() for t in self.v],
                "inputs": [t[row, 0, start:end].clone() for t in self.inputs]}

    def row_bytes(self, num_tokens: int) -> int:
        """What row_state copies for `num_tokens` slots."""
        return num_tokens * sum(t[0, :, 0].nbytes for name in SLOTTED for t in getattr(self, name))

    def load_prefix(self, state: dict[str, list[torch.Tensor]], num_tokens: int) -> None:
        """Start every row (an empty cache) from the first `num_tokens` tokens of one document whose
        state row_state gave: their keys and values, their inputs if kept, and the filter state at
        their end (the inputs of the last two tokens; zeros before the first)."""
        n = num_tokens
        for layer in range(len(self.k)):
            self.k[layer][:, :, :n] = state["k"][layer][:, :n]
            self.v[layer][:, :, :n] = state["v"][layer][:, :n]
            x = state["inputs"][layer]
            if self.inputs:
                self.inputs[layer][:, 0, :n] = x[:n]
            self.lfa[layer].zero_()
            self.lfa[layer][:, 1] = x[n - 1]
            if n >= 2:
                self.lfa[layer][:, 0] = x[n - 2]
        self.valid[:, :n] = True
        self.next_position.fill_(n)
        self.length.fill_(n)
