"""`yuan data prepare`: tokenize inputs into memory-mapped uint32 token shards plus a JSON index.

Layout of a prepared folder:

    meta.json                  what is where: tokenizer ids, sources and their blend weights, shards
    tokenizer/                 the tokenizer the ids belong to (copied or trained here)
    00-NAME-train-00000.bin    raw uint32 tokens, each document followed by one <eod>
    00-NAME-train-00000.idx.npy  int64 offsets where each document starts in that shard
    00-NAME-valid-00000.bin    the held-out documents of the same input
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ..utils import writing_folder
from .sources import Document, Source, document_text, parse_input

FORMAT = "yuanmoe-tokens-v1"
DOCS_PER_TASK = 64
FIM_TOKENS = {"prefix": "<FIM_PREFIX>", "middle": "<FIM_MIDDLE>", "suffix": "<FIM_SUFFIX>"}

_worker_tokenizer = None  # set once per worker process


def prepare_dataset(inputs: Iterable[Source | str], out: str | Path, tokenizer: str | Path | None = None,
                    train_tokenizer_vocab: int | None = None, heldout_fraction: float = 0.01,
                    seed: int = 1234, workers: int | None = None, shard_tokens: int = 1 << 30,
                    progress: bool = True, official_lines: bool = False, overwrite: bool = False) -> dict:
    """Tokenize every input into `out`; returns the written meta.json as a dict.

    Give either `tokenizer` (a tokenizer file or folder, e.g. the official tokenizer.model) or
    `train_tokenizer_vocab` (train a byte-level BPE of that size on the inputs).
    `official_lines` reads text files in the official Yuan layout (a document per line, `<n>` for
    newlines, prompt `<sep>` answer).
    A document goes to the held-out split when a hash of its text falls under `heldout_fraction`,
    so the split does not depend on input order, worker count or other inputs.
    The folder is built under a temporary name and renamed into place when complete, so an error or an
    interrupt leaves `out` as it was; prepared data already in `out` is replaced only with `overwrite`.
    """
    from ..tokenizer import BPETokenizer, load_tokenizer

    sources = [parse_input(s) if isinstance(s, str) else s for s in inputs]
    for source in sources:
        source.official_lines = source.official_lines or official_lines
    if not sources:
        raise ValueError("no inputs given; name at least one text, JSONL or JSON file or folder")
    if (tokenizer is None) == (train_tokenizer_vocab is None):
        raise ValueError("give exactly one of a tokenizer path or a vocabulary size to train a tokenizer")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {heldout_fraction}")
    out = Path(out)
    if (out / "meta.json").is_file() and not overwrite:
        raise ValueError(f"{out} already holds prepared data, and preparing replaces a folder rather than adding "
                         f"to it; prepare all inputs together (INPUT:WEIGHT ...) into a new --out, or pass "
                         f"--overwrite to replace it")
    with writing_folder(out, "meta.json", "prepared data") as folder:
        if train_tokenizer_vocab is not None:
            texts = (document_text(d) for s in sources for d in s.documents())
            # The tokenizers library shows no progress while it reads an iterator of unknown length.
            reading = tqdm(texts, desc=f"training a {train_tokenizer_vocab}-token BPE: reading", unit=" docs",
                           disable=not progress, dynamic_ncols=True)
            tok = BPETokenizer.train(reading, train_tokenizer_vocab, show_progress=progress)
            reading.close()
        else:
            tok = load_tokenizer(tokenizer)
        tokenizer_dir = folder / "tokenizer"
        tok.save(tokenizer_dir)
        meta = {
            "format": FORMAT,
            "dtype": "uint32",
            "tokenizer": "tokenizer",
            "vocab_size": tok.vocab_size,
            "tokenizer_fingerprint": tok.fingerprint(),
            "eod_id": tok.eod_id,
            "sep_id": tok.sep_id,
            "pad_id": tok.pad_id,
            "fim_ids": fim_token_ids(tok),
            "heldout_fraction": heldout_fraction,
            "seed": seed,
            "sources": [],
        }
        workers = workers or min(os.cpu_count() or 1, 8)
        with Tokenizers(tokenizer_dir, workers) as pool:
            for index, source in enumerate(sources):
                meta["sources"].append(write_source(pool, source, folder, f"{index:02d}-{source.name}",
                                                    heldout_fraction, seed, shard_tokens, progress))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def fim_token_ids(tokenizer) -> dict | None:
    """The ids of the fill-in-the-middle sentinels, or None when the tokenizer lacks them."""
    ids = {role: tokenizer.token_to_id(token) for role, token in FIM_TOKENS.items()}
    return None if None in ids.values() else ids


def write_source(pool: "Tokenizers", source: Source, out: Path, prefix: str, heldout_fraction: float, seed: int,
                 shard_tokens: int, progress: bool) -> dict:
    writers = {split: ShardWriter(out, f"{prefix}-{split}", shard_tokens) for split in ("train", "valid")}
    bar = tqdm(desc=f"tokenizing {source.name}", unit=" docs", disable=not progress, dynamic_ncols=True)
    last_train = None  # written one document late, so it can still be held out at the end
    for results in pool.map(source.documents(), heldout_fraction, seed):
        for samples, held_out in results:
            if held_out:
                writers["valid"].write(*samples)
                continue
            if last_train is not None:
                writers["train"].write(*last_train)
            last_train = samples
        bar.update(len(results))
        bar.set_postfix_str(f"{sum(w.total_tokens for w in writers.values()):,} tokens", refresh=False)
    bar.close()
    if last_train is not None:
        # A small input may hash no document into the held-out split; then its last one is held
        # out, so every input of two or more documents can be evaluated.
        no_heldout = heldout_fraction > 0 and writers["valid"].total_tokens == 0 and writers["train"].total_tokens
        writers["valid" if no_heldout else "train"].write(*last_train)
    entry = {"name": source.name, "inputs": [str(p) for p in source.paths], "weight": source.weight,
             "files": len(source.files)}
    for split, writer in writers.items():
        entry[split] = writer.close()
    if not entry["train"]:
        raise ValueError(f"input {source.paths[0]} holds no documents to train on (empty files?)")
    return entry


class Tokenizers:
    """Worker processes that each load the tokenizer once and encode batches of documents
    (in this process when workers <= 1)."""

    def __init__(self, tokenizer_dir: Path, workers: int):
        self.tokenizer_dir, self.workers, self.pool = tokenizer_dir, workers, None

    def __enter__(self) -> "Tokenizers":
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and locks
            # Ctrl-C reaches every process of the terminal's group: the workers, started with SIGINT
            # ignored, leave it to this process, which stops them (no traceback from each worker).
            main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.tokenizer_dir,))
            finally:
                if main:
                    signal.signal(signal.SIGINT, previous)
        else:
            _init_worker(self.tokenizer_dir)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()

    def map(self, docs: Iterator[Document], heldout_fraction: float, seed: int) -> Iterator[list]:
        """Batches of (tokens ending in <eod>, held out?) in input order."""
        tasks = ((batch, heldout_fraction, seed) for batch in batched(docs, DOCS_PER_TASK))
        return self.pool.imap(_tokenize_task, tasks) if self.pool else map(_tokenize_task, tasks)


def batched(items: Iterator, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _init_worker(tokenizer_dir: Path) -> None:
    from ..tokenizer import load_tokenizer

    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _tokenize_task(task) -> list[tuple[list[np.ndarray], bool]]:
    docs, heldout_fraction, seed = task
    return [(encode_samples(_worker_tokenizer, doc), is_held_out(doc, heldout_fraction, seed)) for doc in docs]


def encode_samples(tokenizer, doc: Document) -> list[np.ndarray]:
    """The token documents of an input document: one, or one per assistant turn of a conversation."""
    return [encode_document(tokenizer, d) for d in (doc if isinstance(doc, list) else [doc])]


def encode_document(tokenizer, doc: str | tuple[str, str]) -> np.ndarray:
    if isinstance(doc, str):
        ids = tokenizer.encode(doc)
    else:
        prompt, answer = doc
        ids = tokenizer.encode(prompt) + [tokenizer.sep_id] + tokenizer.encode(answer)
    return np.asarray(ids + [tokenizer.eod_id], dtype=np.uint32)


def is_held_out(doc: Document, fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(document_text(doc).encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < fraction


class ShardWriter:
    """Appends documents to `PREFIX-NNNNN.bin` files of at most `max_tokens` tokens each; a shard
    appears under its final name only once complete (written to a temporary name, then renamed)."""

    def __init__(self, folder: Path, prefix: str, max_tokens: int):
        self.folder, self.prefix, self.max_tokens = folder, prefix, max_tokens
        self.shards: list[dict] = []
        self.total_tokens = 0
        self._file = None

    def write(self, *documents: np.ndarray) -> None:
        for tokens in documents:
            self._write(tokens)

    def _write(self, tokens: np.ndarray) -> None:
        if self._file is not None and self._tokens + len(tokens) > self.max_tokens:
            self._finish_shard()
        if self._file is None:
            self._name = f"{self.prefix}-{len(self.shards):05d}.bin"
            self._file = open(self.folder / f".{self._name}.tmp", "wb")
            self._tokens, self._starts = 0, []
        self._starts.append(self._tokens)
        self._file.write(tokens.tobytes())
        self._tokens += len(tokens)
        self.total_tokens += len(tokens)

    def _finish_shard(self) -> None:
        self._file.close()
        index_name = self._name.removesuffix(".bin") + ".idx.npy"
        np.save(self.folder / f".{index_name}.tmp.npy", np.asarray(self._starts, dtype=np.int64))
        os.replace(self.folder / f".{index_name}.tmp.npy", self.folder / index_name)
        os.replace(self.folder / f".{self._name}.tmp", self.folder / self._name)
        self.shards.append({"file": self._name, "index": index_name, "tokens": self._tokens,
                            "docs": len(self._starts)})
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard()
        return self.shards


def load_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared data folder (no meta.json); "
                                f"run `yuan data prepare` first")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; prepare the data again")
    return meta


def data_tokenizer_fingerprint(folder: str | Path, meta: dict) -> str:
    """The fingerprint of the tokenizer the data was made with: the one meta.json records, or, for data
    prepared before fingerprints, that of its tokenizer folder."""
    from ..tokenizer import load_tokenizer

    stored = meta.get("tokenizer_fingerprint")
    return stored if stored is not None else load_tokenizer(Path(folder) / meta["tokenizer"]).fingerprint()
