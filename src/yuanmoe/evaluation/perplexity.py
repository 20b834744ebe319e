"""Perplexity of a checkpoint on text files or on a prepared token dataset (`yuan data prepare`).

Each document is scored on its own from a document start, every token (its closing `<eod>`
included) exactly once, with windows of the model's context (see `EvalModel.rolling_windows`);
windows of many documents share a batch. Perplexity is exp(total negative log-likelihood / tokens).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .lm import EvalModel


def prepared_documents(folder: Path, tokenizer, split: str) -> Iterator[list[int]]:
    """The documents of one split ("valid" or "train") of a prepared data folder, as token ids."""
    from ..data import load_meta
    from ..data.prepare import data_tokenizer_fingerprint
    from ..tokenizer import check_same_tokenizer

    meta = load_meta(folder)
    check_same_tokenizer("the checkpoint", tokenizer.fingerprint(), f"the data in {folder}",
                         data_tokenizer_fingerprint(folder, meta), "score data prepared with the checkpoint's "
                         "tokenizer, or give text files to tokenize here")
    return _prepared_documents(folder, meta, split)


def _prepared_documents(folder: Path, meta: dict, split: str) -> Iterator[list[int]]:
    for source in meta["sources"]:
        for shard in source[split]:
            tokens = np.memmap(folder / shard["file"], dtype=np.uint32, mode="r")
            starts = np.append(np.load(folder / shard["index"]), len(tokens))
            for begin, end in zip(starts[:-1], starts[1:]):
                yield tokens[begin:end].astype(np.int64).tolist()


def text_documents(path: Path, tokenizer) -> Iterator[list[int]]:
    """Text, JSON or JSONL files (or a folder of them), read as `yuan data prepare` reads them."""
    from ..data import Source
    from ..data.prepare import encode_samples

    for doc in Source([path]).documents():
        for tokens in encode_samples(tokenizer, doc):
            yield tokens.tolist()


def perplexity(lm: EvalModel, data: str | Path, limit: int | None = None, split: str = "valid",
               progress: bool = True) -> dict:
    """{"metric": "perplexity", "score", "loss" (nats/token), "tokens", "documents", "settings"}."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"perplexity data {data} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    prepared = data.is_dir() and (data / "meta.json").is_file()
    docs = prepared_documents(data, lm.tokenizer, split) if prepared else text_documents(data, lm.tokenizer)
    total_logprob, tokens, documents, pending = 0.0, 0, 0, []
    bar = tqdm(desc="perplexity", unit=" docs", total=limit, disable=not progress)

    def flush():
        nonlocal total_logprob
        total_logprob += sum(lp for lp, _ in lm.score_windows(pending))
        pending.clear()

    for ids in docs:
        if limit is not None and documents >= limit:
            break
        pending += lm.rolling_windows(ids)
        tokens += len(ids)
        documents += 1
        bar.update(1)
        if len(pending) >= lm.batch_size:
            flush()
    flush()
    bar.close()
    if tokens == 0:
        raise ValueError(f"{data} holds no documents to score" + (f" in its {split!r} split" if prepared else ""))
    loss = -total_logprob / tokens
    return {"metric": "perplexity", "score": math.exp(loss), "loss": loss, "tokens": tokens, "documents": documents,
            "settings": {"data": str(data), "split": split if prepared else None, "limit": limit,
                         "max_length": lm.max_length}}
