"""The experiments' training corpus: Python standard-library source (the code part, always there)
plus whatever inputs the user adds (`--data`), tokenized once into OUT/data and reused."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from ..data import Source, TokenDataset, load_meta, parse_input, prepare_dataset
from ..utils import atomic_write_text

HELDOUT_FRACTION = 0.05  # enough held-out documents from each input for a steady yardstick


def stdlib_source() -> Source:
    """The top-level modules of the running Python's standard library (about 5 MB of code)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python standard-library source under {stdlib}; pass --no-code-corpus "
                                f"and give inputs with --data")
    return Source(files, name="python-stdlib")


def prepare_corpus(out: Path, data_specs: list[str], include_code: bool, vocab_size: int,
                   prepared: Path | None = None) -> Path:
    """The prepared data folder to train on: `prepared` as given, or OUT/data built from the inputs
    (kept when the inputs and vocabulary match the last preparation there)."""
    if prepared is not None:
        load_meta(prepared)  # fails with a clear sentence when it is not a prepared folder
        return prepared
    sources = ([stdlib_source()] if include_code else []) + [parse_input(spec) for spec in data_specs]
    if not sources:
        raise ValueError("no training data: give inputs with --data or keep the default code corpus")
    folder = out / "data"
    recipe = {"inputs": [[str(p) for p in s.files] for s in sources], "weights": [s.weight for s in sources],
              "vocab_size": vocab_size, "heldout_fraction": HELDOUT_FRACTION}
    recipe_file = folder / "recipe.json"
    if (folder / "meta.json").is_file() and recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        return folder
    prepare_dataset(sources, folder, train_tokenizer_vocab=vocab_size, heldout_fraction=HELDOUT_FRACTION,
                    overwrite=True)
    atomic_write_text(recipe_file, json.dumps(recipe) + "\n")
    return folder


def open_dataset(folder: Path, seq_len: int, seed: int) -> TokenDataset:
    dataset = TokenDataset(folder, seq_len, seed=seed)
    if dataset.num_valid_windows == 0:
        raise ValueError(f"the held-out part of {folder} is shorter than one window of {seq_len + 1} tokens; "
                         f"use more data or a shorter --seq-len")
    return dataset
