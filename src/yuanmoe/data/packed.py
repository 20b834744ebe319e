"""Training samples from prepared token shards: fixed-length packed windows, blended by weight.

A sample is a window of seq_len + 1 consecutive tokens of one shard (documents packed back to
back, each ending in <eod>); inputs are its first seq_len tokens, targets its last seq_len.
Position ids restart at 0 after every <eod> (Megatron's --reset-position-ids), which also stops
attention and the LFA filter at the boundary. Sample i is a pure function of (seed, i), so a run
resumed at sample i sees exactly the data an uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .fim import apply_fim
from .prepare import load_meta

IGNORE_INDEX = -100
BLEND_CHUNK = 4096  # samples whose sources are drawn together (one random draw per chunk)


def position_ids(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """0, 1, 2, ... restarting on the token after each <eod>; the window start counts as a start."""
    n = len(tokens)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = tokens[:-1] == eod_id
    last_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - last_start


class PackedWindows:
    """The seq_len + 1 token windows of one split of one source, shuffled anew every epoch."""

    def __init__(self, folder: Path, shards: list[dict], seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed
        self.tokens = [np.memmap(folder / s["file"], dtype=np.uint32, mode="r") for s in shards]
        self.doc_starts = [np.load(folder / s["index"]) for s in shards]
        per_shard = [max(0, (len(t) - 1) // seq_len) for t in self.tokens]
        self.window_offsets = np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)])
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return int(self.window_offsets[-1])

    def window(self, w: int) -> tuple[np.ndarray, int, int]:
        """(tokens, shard, start) of window number w in shard order."""
        shard = int(np.searchsorted(self.window_offsets, w, side="right")) - 1
        start = (w - int(self.window_offsets[shard])) * self.seq_len
        return np.asarray(self.tokens[shard][start: start + self.seq_len + 1], dtype=np.int64), shard, start

    def shuffled(self, j: int) -> tuple[np.ndarray, int, int]:
        """The j-th window of the endless shuffled stream (a fresh permutation every epoch)."""
        epoch, k = divmod(j, len(self))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        return self.window(int(self._order[k]))

    def answer_mask(self, shard: int, start: int, length: int, sep_id: int) -> np.ndarray:
        """True for the tokens of [start, start + length) that follow a <sep> in their document,
        or whose document has no <sep> at all (plain text mixed into fine-tuning data)."""
        tokens, starts = self.tokens[shard], self.doc_starts[shard]
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, start + length, side="left"))
        mask = np.zeros(length, dtype=bool)
        for d in range(first, last):
            doc_start = int(starts[d])
            doc_end = int(starts[d + 1]) if d + 1 < len(starts) else len(tokens)
            seps = np.flatnonzero(np.asarray(tokens[doc_start:doc_end]) == sep_id)
            answer_from = doc_start + int(seps[0]) + 1 if len(seps) else doc_start
            lo, hi = max(answer_from, start), min(doc_end, start + length)
            if lo < hi:
                mask[lo - start: hi - start] = True
        return mask


class TokenDataset:
    """A prepared data folder as training samples (blended over its sources) and held-out samples.

    `fim_rate` > 0 turns that share of documents into fill-in-the-middle form (needs the FIM
    tokens); `answer_only` trains only on tokens after `<sep>` (supervised fine-tuning).
    """

    def __init__(self, folder: str | Path, seq_len: int, seed: int = 0, fim_rate: float = 0.0,
                 fim_spm_rate: float = 0.5, answer_only: bool = False):
        self.folder = Path(folder)
        self.meta = load_meta(self.folder)
        self.seq_len, self.seed = seq_len, seed
        self.fim_rate, self.fim_spm_rate, self.answer_only = fim_rate, fim_spm_rate, answer_only
        self.eod_id, self.sep_id = self.meta["eod_id"], self.meta["sep_id"]
        if fim_rate > 0 and answer_only:
            raise ValueError("fill-in-the-middle rewrites documents, so it cannot be combined with training on "
                             "answers only; choose one")
        if fim_rate > 0 and not self.meta["fim_ids"]:
            raise ValueError(f"the tokenizer of {self.folder} has no <FIM_PREFIX>/<FIM_SUFFIX>/<FIM_MIDDLE> "
                             f"tokens, so fill-in-the-middle is not possible; set the FIM rate to 0")
        sources = self.meta["sources"]
        self.train = [PackedWindows(self.folder, s["train"], seq_len, seed + i) for i, s in enumerate(sources)]
        self.valid = [PackedWindows(self.folder, s["valid"], seq_len, seed) for s in sources]
        for source, windows in zip(sources, self.train):
            if len(windows) == 0:
                raise ValueError(f"input {source['name']} of {self.folder} has fewer than {seq_len + 1} training "
                                 f"tokens; use a shorter sequence length or more data")
        weights = np.asarray([s["weight"] for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        # Cumulative per-source sample counts at the start of each blend chunk, grown on demand.
        self._chunk_counts = [np.zeros(len(sources), dtype=np.int64)]

    @property
    def num_valid_windows(self) -> int:
        return sum(len(v) for v in self.valid)

    def _chunk_sources(self, chunk: int) -> np.ndarray:
        if len(self.weights) == 1:
            return np.zeros(BLEND_CHUNK, dtype=np.int64)
        return np.random.default_rng([self.seed, 1, chunk]).choice(len(self.weights), BLEND_CHUNK, p=self.weights)

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index within that source's stream) of training sample i."""
        chunk, k = divmod(i, BLEND_CHUNK)
        while len(self._chunk_counts) <= chunk:
            done = len(self._chunk_counts) - 1
            counts = np.bincount(self._chunk_sources(done), minlength=len(self.weights))
            self._chunk_counts.append(self._chunk_counts[-1] + counts)
        sources = self._chunk_sources(chunk)
        source = int(sources[k])
        return source, int(self._chunk_counts[chunk][source]) + int(np.count_nonzero(sources[:k] == source))

    def train_sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source, j = self.locate(i)
        windows = self.train[source]
        tokens, shard, start = windows.shuffled(j)
        mask = windows.answer_mask(shard, start, len(tokens), self.sep_id) if self.answer_only else None
        if self.fim_rate > 0:
            rng = np.random.default_rng([self.seed, 2, i])
            tokens = apply_fim(tokens, rng, self.meta["fim_ids"], self.eod_id, self.fim_rate, self.fim_spm_rate)
        return self._sample(tokens, mask)

    def valid_sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Held-out window i of all sources in order (no shuffling, no FIM: a fixed yardstick)."""
        for windows in self.valid:
            if i < len(windows):
                tokens, shard, start = windows.window(i)
                mask = windows.answer_mask(shard, start, len(tokens), self.sep_id) if self.answer_only else None
                return self._sample(tokens, mask)
            i -= len(windows)
        raise IndexError("held-out window index out of range")

    def _sample(self, tokens: np.ndarray, mask: np.ndarray | None):
        inputs, targets = tokens[:-1], tokens[1:].copy()
        if mask is not None:
            targets[~mask[1:]] = IGNORE_INDEX
        return inputs, position_ids(inputs, self.eod_id), targets

    def batch(self, indices, valid: bool = False) -> dict[str, torch.Tensor]:
        """input_ids, position_ids, targets [len(indices), seq_len] (targets already shifted)."""
        get = self.valid_sample if valid else self.train_sample
        inputs, positions, targets = zip(*(get(int(i)) for i in indices))
        return {"input_ids": torch.from_numpy(np.stack(inputs)),
                "position_ids": torch.from_numpy(np.stack(positions)),
                "targets": torch.from_numpy(np.stack(targets))}
