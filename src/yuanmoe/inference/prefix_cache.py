"""Reuse the decoding state of token prefixes served before (multi-turn chat, shared system prompts).

Each entry is one served sequence (a prompt and the answer tokens fed back): per layer its keys and
values and every token's LFA input. Keys and values are causal, so the first n of them are those
of the first n tokens; the LFA state after n tokens is the inputs of tokens n-2 and n-1. So any
common prefix with an entry can be reused, not only the whole entry: a chat's next turn shares
the conversation with the last turn's sequence up to that turn's `<sep>`, after which it continues
with `<n>`, the answer, `<n>` and the new question.

A request whose prompt shares n >= 1 leading tokens with an entry (n at most its length minus
one: the last token is always computed, for its logits; no `<eod>` inside: one document) starts
from them and prefills the rest. Entries are kept within a byte budget, least recently used out
first; an entry whose tokens start another's is dropped for the longer one. Exact: the reused
state is the one the model computed for those tokens.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    tokens: torch.Tensor  # [n] int64
    state: dict[str, list[torch.Tensor]]  # DecodeCache.row_state
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int, stop_token_ids: tuple[int, ...] = ()):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache budget must not be negative, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.stop_token_ids = tuple(stop_token_ids)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()  # the server's worker writes while /metrics reads
        self.bytes_held = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_reused = 0

    @classmethod
    def from_gb(cls, gb: float, stop_token_ids: tuple[int, ...] = ()) -> "PrefixCache | None":
        """A cache of `gb` GB, or None for 0 (off)."""
        if not math.isfinite(gb) or gb < 0:
            raise ValueError(f"--prefix-cache-gb must be a number of GB, 0 or more, got {gb}")
        return cls(int(gb * 1e9), stop_token_ids) if gb > 0 else None

    def __len__(self) -> int:
        return len(self._entries)

    def usable_length(self, ids: list[int]) -> int:
        """How many leading tokens of a prompt may come from the cache: not its last token, nor
        anything from the first stop token (<eod>) on."""
        n = len(ids) - 1
        for stop in self.stop_token_ids:
            if stop in ids[:n]:
                n = ids.index(stop)
        return max(n, 0)

    def lookup(self, ids: list[int]) -> tuple[dict[str, list[torch.Tensor]] | None, int]:
        """The state of the longest cached prefix of `ids` and its length (None, 0 on a miss)."""
        limit = self.usable_length(ids)
        with self._lock:
            self.lookups += 1
            best, best_n = None, 0
            if limit:
                query = torch.tensor(ids[:limit], dtype=torch.long)
                for key, entry in self._entries.items():
                    m = min(limit, len(entry.tokens))
                    differ = (entry.tokens[:m] != query[:m]).nonzero()
                    n = int(differ[0]) if len(differ) else m
                    if n > best_n:
                        best, best_n = key, n
            if best is None:
                return None, 0
            self._entries.move_to_end(best)
            self.hits += 1
            self.tokens_reused += best_n
            return self._entries[best].state, best_n

    def store(self, ids: list[int], state: dict[str, list[torch.Tensor]]) -> None:
        """Keep the state of the sequence `ids` (one document: cut at a stop token by the caller)."""
        if not ids:
            return
        nbytes = sum(t.nbytes for ts in state.values() for t in ts)
        if nbytes > self.max_bytes:
            return
        tokens = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            for key, entry in list(self._entries.items()):
                shorter, longer = sorted((entry.tokens, tokens), key=len)
                if torch.equal(longer[:len(shorter)], shorter):
                    if len(entry.tokens) >= len(tokens):  # already held
                        self._entries.move_to_end(key)
                        return
                    self._drop(key)  # the new one extends it
            self._entries[self._next_key] = _Entry(tokens, state, nbytes)
            self._next_key += 1
            self.bytes_held += nbytes
            while self.bytes_held > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.bytes_held -= self._entries.pop(key).nbytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes_held, "lookups": self.lookups,
                    "hits": self.hits, "tokens_reused": self.tokens_reused}
