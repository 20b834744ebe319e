from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()
GOLDEN = SHARED / "yuan" / "golden" / "tiny-a"
TOKENIZER_DIR = SHARED / "yuan" / "tokenizer"
DATASETS = SHARED / "yuan" / "datasets"
CORPUS = SHARED / "corpus"

# Tests run tiny models, for which extra threads only add OpenMP overhead; on a shared 2-core
# machine they also oversubscribe the cores, slowing small ops by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    from yuanmoe import preset

    return preset("tiny")
