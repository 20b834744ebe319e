from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()
GOLDEN = SHARED / "yuan" / "golden" / "tiny-a"
TOKENIZER_DIR = SHARED / "yuan" / "tokenizer"
DATASETS = SHARED / "yuan" / "datasets"
CORPUS = SHARED / "corpus"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    from yuanmoe import preset

    return preset("tiny")
