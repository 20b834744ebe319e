from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from yuanmoe import YuanForCausalLM, preset

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
    return preset("tiny")


@pytest.fixture(scope="session")
def bpe():
    """A small byte-level BPE trained on English and Chinese text."""
    from yuanmoe.tokenizer import BPETokenizer

    english = (CORPUS / "tinyshakespeare.txt").read_text()[:20000].split("\n\n")
    chinese = [r["instruction"] + r["output"]
               for r in json.loads((CORPUS / "zh-alpaca-part-00.json").read_text(encoding="utf-8"))[:200]]
    return BPETokenizer.train(english + chinese, vocab_size=600)


@pytest.fixture(scope="module")
def model(bpe):
    """A random tiny model whose vocabulary and special ids match the BPE tokenizer."""
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=bpe.vocab_size, eod_token_id=bpe.eod_id, sep_token_id=bpe.sep_id,
                    pad_token_id=bpe.pad_id, initializer_range=0.3)
    return YuanForCausalLM(config).eval()
