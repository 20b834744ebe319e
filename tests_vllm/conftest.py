"""Tests of the vLLM plugin (yuanmoe.vllm); they run in the vLLM environment (`make test-vllm`).

The model is ../shared/yuan/golden/tiny-a (official format, head_dim 32 = attention_projection_size
128 / 4 heads, which vLLM's CPU attention accepts); its golden.safetensors holds the official
modeling code's outputs. vLLM loads every *.safetensors file of a folder, so the tests serve a
folder holding only config.json and model.safetensors (links to the shared files).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# vLLM's CPU backend reserves this many GiB for its KV cache and state cache (the default takes a
# large share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()
GOLDEN = SHARED / "yuan" / "golden" / "tiny-a"
TOKENIZER_DIR = SHARED / "yuan" / "tokenizer"
VOCAB = 512
# Small token budget per engine step: prompts longer than this are prefilled in chunks, and
# batches mix decode rows with prefill chunks, so the LFA state is carried across both.
STEP_TOKENS = 16
# A small cache, so that blocks freed by finished requests are soon reused by new ones: a
# request must not read what an earlier request left in its slot.
NUM_BLOCKS = 16
ENGINE_ARGS = dict(dtype="float32", max_model_len=64, max_num_batched_tokens=STEP_TOKENS, max_num_seqs=8,
                   gpu_memory_utilization=0.05, num_gpu_blocks_override=NUM_BLOCKS)


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "golden.safetensors")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-a")
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(GOLDEN / name)
    return folder


def logprob_rows(steps) -> torch.Tensor:
    """vLLM's per-position {token: Logprob} dicts (every vocabulary entry) as a [positions, vocab] tensor."""
    rows = torch.full((len(steps), VOCAB), float("nan"))
    for i, step in enumerate(steps):
        for token, lp in step.items():
            rows[i, token] = lp.logprob
    assert not rows.isnan().any(), "vLLM returned fewer logprobs than the vocabulary"
    return rows
