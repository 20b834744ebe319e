"""vllm.LLM on the official tiny-a folder against the official modeling code's outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINE_ARGS, STEP_TOKENS, VOCAB, logprob_rows
from vllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = LLM(str(model_dir), skip_tokenizer_init=True, max_logprobs=VOCAB, **ENGINE_ARGS)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _ids(tokens: torch.Tensor) -> dict:
    return {"prompt_token_ids": tokens.tolist()}


def test_greedy_decoding_gives_the_golden_tokens_and_step_logits(llm, golden):
    outs = llm.generate([_ids(p) for p in golden["gen_prompt"]],
                        SamplingParams(max_tokens=20, temperature=0, logprobs=VOCAB))
    for out, tokens, step_logits in zip(outs, golden["gen_tokens"], golden["gen_step_logits"]):
        assert list(out.outputs[0].token_ids) == tokens.tolist()
        got = logprob_rows(out.outputs[0].logprobs)
        assert (got - torch.log_softmax(step_logits, -1)).abs().max() < 1e-3


def test_prompt_logprobs_match_the_golden_logits(llm, golden):
    ids, logits = golden["input_ids"], golden["logits"]
    assert ids.shape[1] > 2 * STEP_TOKENS  # the prompts are prefilled in three chunks
    outs = llm.generate([_ids(p) for p in ids], SamplingParams(max_tokens=1, temperature=0, logprobs=VOCAB,
                                                               prompt_logprobs=VOCAB))
    for out, want in zip(outs, torch.log_softmax(logits, -1)):
        assert out.prompt_logprobs[0] is None  # nothing predicts the first token
        # prompt_logprobs[t] is the distribution that predicted token t, from the logits at t - 1;
        # the sampled token's logprobs come from the logits at the last position.
        got = torch.cat([logprob_rows(out.prompt_logprobs[1:]), logprob_rows(out.outputs[0].logprobs)])
        assert (got - want).abs().max() < 1e-3


def test_a_batch_of_different_lengths_equals_each_prompt_alone(llm, golden):
    ids = golden["input_ids"]
    prompts = [_ids(ids[0, :3]), _ids(ids[1, :40]), _ids(ids[0, :17]), _ids(ids[1, :1]), _ids(ids[0, 5:30])]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=VOCAB)
    together = llm.generate(prompts, params)
    for prompt, batched in zip(prompts, together):
        alone = llm.generate([prompt], params)[0]
        assert batched.outputs[0].token_ids == alone.outputs[0].token_ids
        got, want = logprob_rows(batched.outputs[0].logprobs), logprob_rows(alone.outputs[0].logprobs)
        assert (got - want).abs().max() < 1e-4
