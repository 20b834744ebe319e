"""Long prompts: a prompt that is one document prefills through SDPA's causal kernel without an
[s, keys] mask, and gives the logits the masked path gives token by token."""

import torch

from yuanmoe import YuanForCausalLM
from yuanmoe.model import transformer


@torch.inference_mode()
def test_one_document_prefill_builds_no_mask_and_matches_masked_decoding(tiny_config, monkeypatch):
    model = YuanForCausalLM(tiny_config.replace(initializer_range=0.3)).eval()
    calls = []
    real = transformer.attention_mask
    monkeypatch.setattr(transformer, "attention_mask", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24))
    cache = model.new_cache(2, 32)
    prefill = model(ids, cache=cache).logits
    assert calls == []
    step_cache = model.new_cache(2, 32)
    steps = torch.cat([model(ids[:, i:i + 1], cache=step_cache).logits for i in range(ids.shape[1])], dim=1)
    assert len(calls) == ids.shape[1]  # one token at a time goes through the mask
    assert (prefill - steps).abs().max() < 1e-3
    # A second chunk continues the document in a cache that is not empty: that one needs the mask.
    chunked = model.new_cache(2, 32)
    first = model(ids[:, :16], cache=chunked).logits
    assert len(calls) == ids.shape[1]
    second = model(ids[:, 16:], cache=chunked).logits
    assert len(calls) == ids.shape[1] + 1
    assert (torch.cat([first, second], dim=1) - steps).abs().max() < 1e-3
    # A new document (positions from 0 again) into that cache must not see the earlier one.
    again = model(ids[:, :8], position_ids=torch.arange(8).expand(2, 8), cache=chunked).logits
    assert len(calls) == ids.shape[1] + 2
    assert (again - steps[:, :8]).abs().max() < 1e-3
    # Decoding after the maskless prefill sees the whole prompt.
    nxt = torch.randint(0, tiny_config.vocab_size, (2, 1))
    assert (model(nxt, cache=cache).logits - model(nxt, cache=step_cache).logits).abs().max() < 1e-3
