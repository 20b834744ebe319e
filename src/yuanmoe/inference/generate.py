"""Cached autoregressive decoding: prefill the prompt once, then one token per step."""

from __future__ import annotations

import torch


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns [batch, prompt + max_new_tokens]: the prompts followed by their continuations."""
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_len}) plus {max_new_tokens} new tokens exceeds the model's context "
                         f"({model.config.max_position_embeddings})")
    cache = model.new_cache(batch, total)
    out = torch.empty(batch, total, dtype=torch.long, device=input_ids.device)
    out[:, :prompt_len] = input_ids
    logits = model(input_ids, cache=cache).logits[:, -1]
    for t in range(prompt_len, total):
        if do_sample:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(dim=-1)
        out[:, t] = nxt
        if t + 1 < total:
            logits = model(nxt.unsqueeze(1), cache=cache).logits[:, -1]
    return out
