"""The official tiny-a checkpoint, loaded through this project's converter, reproduces what the
official modeling code computed from it (../shared/yuan/golden, fp32)."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN
from yuanmoe import from_pretrained, generate


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN / "golden.safetensors")


@pytest.fixture(scope="module")
def model():
    return from_pretrained(GOLDEN, dtype=torch.float32)


@torch.inference_mode()
def test_full_forward_matches_official_logits(model, golden):
    logits = model(golden["input_ids"]).logits
    assert logits.shape == golden["logits"].shape
    assert (logits - golden["logits"]).abs().max() < 1e-4


@torch.inference_mode()
def test_cached_greedy_decode_matches_official_tokens_and_step_logits(model, golden):
    prompt, want = golden["gen_prompt"], golden["gen_tokens"]
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + want.shape[1])
    logits = model(prompt, cache=cache).logits[:, -1]
    tokens, step_logits = [], []
    for _ in range(want.shape[1]):
        step_logits.append(logits)
        tokens.append(logits.argmax(-1))
        logits = model(tokens[-1][:, None], cache=cache).logits[:, -1]
    assert torch.equal(torch.stack(tokens, 1), want)
    assert (torch.stack(step_logits, 1) - golden["gen_step_logits"]).abs().max() < 1e-4


def test_generate_entry_point_returns_prompt_and_official_tokens(model, golden):
    prompt, want = golden["gen_prompt"], golden["gen_tokens"]
    out = generate(model, prompt, max_new_tokens=want.shape[1], do_sample=False)
    assert torch.equal(out, torch.cat([prompt, want], dim=1))
