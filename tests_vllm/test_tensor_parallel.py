"""Tensor parallel over two CPU worker processes: q/k/v/o heads, the experts' FFN widths and the
vocabulary split in two, the LFA filter and its state replicated."""

from __future__ import annotations

import os

import torch
from conftest import ENGINE_ARGS, VOCAB, logprob_rows
from vllm import LLM, SamplingParams


def test_two_way_tensor_parallel_gives_the_golden_tokens(model_dir, golden, monkeypatch):
    # Two workers on a small machine: let the OS place their threads.
    monkeypatch.setitem(os.environ, "VLLM_CPU_OMP_THREADS_BIND", "nobind")
    llm = LLM(str(model_dir), skip_tokenizer_init=True, max_logprobs=VOCAB, tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in golden["gen_prompt"]],
                            SamplingParams(max_tokens=20, temperature=0, logprobs=VOCAB))
    finally:
        llm.llm_engine.engine_core.shutdown()
    for out, tokens, step_logits in zip(outs, golden["gen_tokens"], golden["gen_step_logits"]):
        assert list(out.outputs[0].token_ids) == tokens.tolist()
        assert (logprob_rows(out.outputs[0].logprobs) - torch.log_softmax(step_logits, -1)).abs().max() < 1e-3
