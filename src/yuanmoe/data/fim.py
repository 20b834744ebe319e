"""Fill-in-the-middle (Bavarian et al. 2022) at the token level, as in code LLM pre-training.

A document d = prefix + middle + suffix (two random cut points) is rewritten as

    PSM: <FIM_PREFIX> prefix <FIM_SUFFIX> suffix <FIM_MIDDLE> middle
    SPM: <FIM_PREFIX> <FIM_SUFFIX> suffix <FIM_MIDDLE> prefix middle

so the model learns to write a middle given what surrounds it. SPM puts the prefix right before
the middle, which suits left-to-right caching at inference time.
"""

from __future__ import annotations

import numpy as np


def fim_permute(doc: np.ndarray, rng: np.random.Generator, ids: dict, spm_rate: float = 0.5) -> np.ndarray:
    """One document (without its <eod>) in FIM form, 3 tokens longer."""
    lo, hi = sorted(rng.integers(0, len(doc) + 1, size=2))
    prefix, middle, suffix = doc[:lo], doc[lo:hi], doc[hi:]
    p, s, m = (np.asarray([ids[k]], dtype=doc.dtype) for k in ("prefix", "suffix", "middle"))
    if rng.random() < spm_rate:
        return np.concatenate([p, s, suffix, m, prefix, middle])
    return np.concatenate([p, prefix, s, suffix, m, middle])


def fim_restore(tokens: np.ndarray, ids: dict) -> np.ndarray:
    """The original document from its PSM or SPM form (the inverse of fim_permute)."""
    if len(tokens) < 3 or tokens[0] != ids["prefix"]:
        raise ValueError("tokens do not start with <FIM_PREFIX>")
    where = {k: int(np.flatnonzero(tokens == ids[k])[0]) for k in ("suffix", "middle")}
    if where["suffix"] == 1:  # SPM: the prefix travels with the middle
        suffix = tokens[2: where["middle"]]
        return np.concatenate([tokens[where["middle"] + 1:], suffix])
    prefix = tokens[1: where["suffix"]]
    suffix = tokens[where["suffix"] + 1: where["middle"]]
    return np.concatenate([prefix, tokens[where["middle"] + 1:], suffix])


def apply_fim(window: np.ndarray, rng: np.random.Generator, ids: dict, eod_id: int, rate: float,
              spm_rate: float = 0.5) -> np.ndarray:
    """Each document piece of a packed window becomes FIM with probability `rate`; the result is
    cut back to the window's length (the sentinels push the last tokens out)."""
    pieces = np.split(window, np.flatnonzero(window == eod_id) + 1)  # each piece ends with its <eod>, if any
    out = []
    for piece in pieces:
        body, end = (piece[:-1], piece[-1:]) if len(piece) and piece[-1] == eod_id else (piece, piece[:0])
        if len(body) and rng.random() < rate:
            body = fim_permute(body, rng, ids, spm_rate)
        out.extend([body, end])
    return np.concatenate(out)[: len(window)]
