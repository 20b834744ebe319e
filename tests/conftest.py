from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from yuanmoe import YuanForCausalLM, preset

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()
GOLDEN = SHARED / "yuan" / "golden" / "tiny-a"
TOKENIZER_DIR = SHARED / "yuan" / "tokenizer"
DATASETS = SHARED / "yuan" / "datasets"
CORPUS = SHARED / "corpus"

# The property tests (tests/test_properties.py) draw the same examples on every run, so that CI
# passes or fails on the code alone; HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

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


@pytest.fixture(scope="module")
def golden_with_tokenizer(tmp_path_factory):
    """The golden checkpoint with a tokenizer: it has none, and its 512-token vocabulary is random,
    so a 512-token BPE takes its place, the special ids moved to the BPE's (0, 1, 2). Only stop and
    pad tokens read those ids; the weights are the golden ones."""
    from yuanmoe.tokenizer import BPETokenizer

    folder = tmp_path_factory.mktemp("golden") / "tiny-a"
    folder.mkdir()
    shutil.copy(GOLDEN / "model.safetensors", folder)
    config = json.loads((GOLDEN / "config.json").read_text())
    tokenizer = BPETokenizer.train((CORPUS / "tinyshakespeare.txt").read_text()[:20000].split("\n\n"),
                                   vocab_size=config["vocab_size"])
    ids = {"eod": tokenizer.eod_id, "sep": tokenizer.sep_id, "pad": tokenizer.pad_id}
    config.update(eod_token=ids["eod"], eod_token_id=ids["eod"], bos_token_id=ids["eod"], eos_token_id=ids["eod"],
                  sep_token=ids["sep"], sep_token_id=ids["sep"], pad_token_id=ids["pad"])
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save(folder)
    return folder


@contextmanager
def running_server(app):
    """`app` served by uvicorn on a free localhost port from a background thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
