"""The generation engine: cached batched decoding, sampling, stop conditions, streaming text, chat."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN, TOKENIZER_DIR
from yuanmoe import YuanForCausalLM, preset
from yuanmoe.inference import (
    BatchDecoder, Request, SamplingParams, TextStream, complete, decode_tokens, format_chat, generate,
    run_requests, stream,
)
from yuanmoe.inference.generate import decode_step

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def test_engine_reproduces_golden_greedy_continuation(monkeypatch):
    """The engine's own cached path (prefill, then one token a step through BatchDecoder) gives the
    official tokens, and every step's logits are within 1e-4 of the official ones: a cache that
    loses state between steps may still pick the same tokens on this model, but not these logits."""
    from yuanmoe.convert.official import config_from_official, official_to_native
    from yuanmoe.inference.sampling import BatchSampler

    config = config_from_official(json.loads((GOLDEN / "config.json").read_text()))
    model = YuanForCausalLM(config).eval()
    state = official_to_native(load_file(GOLDEN / "model.safetensors"), config)
    assert config.tie_word_embeddings and "lm_head.weight" not in state  # the official file stores it once
    model.load_state_dict({**state, "lm_head.weight": state["embed_tokens.weight"]})  # strict: every tensor set
    assert model.lm_head.weight is model.embed_tokens.weight
    golden = load_file(GOLDEN / "golden.safetensors")
    prompt, expected = golden["gen_prompt"], golden["gen_tokens"]

    step_logits = []
    choose = BatchSampler.__call__

    def recording(self, logits):
        step_logits.append(logits.detach().clone())
        return choose(self, logits)

    monkeypatch.setattr(BatchSampler, "__call__", recording)
    out = generate(model, prompt, max_new_tokens=expected.shape[1], stop_token_ids=())
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert torch.equal(out[:, prompt.shape[1]:], expected)
    assert len(step_logits) == expected.shape[1]
    got = torch.stack(step_logits, dim=1)
    assert got.shape == golden["gen_step_logits"].shape
    assert (got - golden["gen_step_logits"]).abs().max() < 1e-4


def test_batched_prompts_of_different_lengths_match_each_prompt_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [100, 200], [300, 301, 302, 303, 304], [42]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched, reasons = decode_tokens(model, prompts, params, stop_token_ids=())
    alone = [decode_tokens(model, [p], params, stop_token_ids=())[0][0] for p in prompts]
    assert batched == alone
    assert reasons == ["length"] * len(prompts)
    assert all(len(set(ids)) > 6 for ids in batched)


def test_cache_that_grows_while_decoding_gives_the_same_tokens(model, monkeypatch):
    prompts = [[5, 6, 7, 8, 9], [100, 200]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    roomy = decode_tokens(model, prompts, params, stop_token_ids=())
    # The module, not the function of the same name that yuanmoe.inference exports.
    monkeypatch.setattr(importlib.import_module("yuanmoe.inference.generate"), "FIRST_DECODE_SLOTS", 2)
    decoder = BatchDecoder(model, prompts, params, stop_token_ids=())
    while not decoder.done:
        decoder.step()
    assert decoder.cache.max_len == 5 + 12  # 7 slots, doubled to 14, then as many as the budgets need
    assert (decoder.generated, decoder.finish_reasons) == roomy


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500]]
    params = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=s) for s in (1, 2)]
    batched, _ = decode_tokens(model, prompts, params, stop_token_ids=())
    assert batched[1] == decode_tokens(model, [prompts[1]], params[1], stop_token_ids=())[0][0]
    other_seed = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=3)
    assert decode_tokens(model, [prompts[1]], other_seed, stop_token_ids=())[0][0] != batched[1]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompt = [[7, 8, 9, 10]]
    greedy = decode_tokens(model, prompt, GREEDY, stop_token_ids=())[0]
    for params in (SamplingParams(max_new_tokens=12, top_k=1, seed=0),
                   SamplingParams(max_new_tokens=12, top_p=1e-6, seed=0)):
        assert decode_tokens(model, prompt, params, stop_token_ids=())[0] == greedy


def test_generation_stops_at_the_stop_token_and_pads_the_rest(model):
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = generate(model, prompts, max_new_tokens=8, stop_token_ids=())
    stop_token = int(free[0, 6])
    first = (free[0, 4:] == stop_token).nonzero()[0].item()
    out = generate(model, prompts, max_new_tokens=8, stop_token_ids=(stop_token,))
    assert torch.equal(out[0, : 4 + first + 1], free[0, : 4 + first + 1])
    if stop_token not in free[1, 4:].tolist():
        assert torch.equal(out[1], free[1])
    assert (out[0, 4 + first + 1:] == model.config.pad_token_id).all()


def test_prompt_longer_than_the_context_is_a_clear_error(model):
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"the prompt has {context} tokens but the model's context is {context}"):
        BatchDecoder(model, [[5] * context], GREEDY)
    # A prompt that fits leaves room for the answer up to the end of the context.
    decoder = BatchDecoder(model, [[5] * (context - 3)], SamplingParams(max_new_tokens=50, temperature=0))
    while not decoder.done:
        decoder.step()
    assert len(decoder.generated[0]) <= 3


def test_prompt_with_an_id_outside_the_vocabulary_is_a_clear_error(model):
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is out of range for a vocabulary of {vocab}"):
        generate(model, [[5, 6], [7, vocab]], max_new_tokens=4)


def test_decode_step_is_one_graph_that_no_token_recompiles():
    """fullgraph=True fails on a graph break (a host synchronisation such as `int(ids.max())` is
    one), and error_on_recompile fails when a step differs from the step before (a Python number
    that changes per token). The eager backend traces without compiling, so this stays fast."""
    torch.manual_seed(0)
    model = YuanForCausalLM(preset("tiny")).eval().to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")

    def greedy(step):
        cache = model.new_cache(2, 12)
        prompt = torch.tensor([[509, 509, 5, 6], [7, 8, 9, 10]])
        positions = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]])
        logits = model(prompt, position_ids=positions, cache=cache).logits[:, -1]
        tokens = []
        for i in range(8):
            tokens.append(logits.argmax(-1, keepdim=True))
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                logits = step(model, tokens[-1], cache)
        return torch.cat(tokens, dim=1)

    with torch.inference_mode():
        assert torch.equal(greedy(compiled), greedy(decode_step))


def test_stop_string_ends_the_text_before_it(model, bpe):
    prompt = "ROMEO:\nWhat say you"
    params = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.3)
    full = complete(model, bpe, [prompt], params)[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    cut = complete(model, bpe, [prompt], SamplingParams(max_new_tokens=24, temperature=0,
                                                       repetition_penalty=1.3, stop=(stop, "NEVER")))[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_streamed_text_equals_the_decoded_completion(model, bpe):
    prompt = "First Citizen:\nBefore we proceed"
    params = SamplingParams(max_new_tokens=30, temperature=0.8, seed=7)
    pieces = list(stream(model, bpe, prompt, params))
    request = complete(model, bpe, [prompt], params)[0]
    ids = [i for i in request.output_ids if i != bpe.eod_id]
    assert "".join(pieces) == request.text == bpe.decode(ids)
    assert len(pieces) > 1


@pytest.mark.parametrize("which", ["bpe", "official"])
def test_chinese_round_trips_through_streaming(which, bpe):
    from yuanmoe.tokenizer import load_tokenizer

    tokenizer = bpe if which == "bpe" else load_tokenizer(TOKENIZER_DIR)
    text = "北京是中国的首都。你好，世界！Yuan 2.0 会说中文吗？"
    ids = tokenizer.encode(text)
    text_stream = TextStream(tokenizer)
    pieces = [text_stream.push(i) for i in ids] + [text_stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    if which == "bpe":  # the test is only meaningful if some characters span several tokens
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_stop_string_split_across_tokens_is_held_back(bpe):
    text = "hello world, and goodbye"
    ids = bpe.encode(text)
    text_stream = TextStream(bpe, stop=("goodbye",))
    pieces = [text_stream.push(i) for i in ids] + [text_stream.flush()]
    assert "".join(pieces) == "hello world, and "
    assert text_stream.stopped


def test_chat_format_follows_the_official_convention():
    messages = [{"role": "user", "content": "line one\nline two"},
                {"role": "assistant", "content": "answer"},
                {"role": "user", "content": "next"}]
    assert format_chat(messages) == "line one<n>line two<n>answer<n>next<sep>"
    with pytest.raises(ValueError, match="last chat message must come from the user"):
        format_chat(messages[:2])


def test_chat_answer_turns_official_newlines_back_into_newlines(bpe):
    ids = bpe.encode("one<n>two<n")  # `<n>` is several tokens: the stream must not cut it open
    text_stream = TextStream(bpe, chat=True)
    pieces = [text_stream.push(i) for i in ids]
    assert "".join(pieces) == "one\ntwo"
    assert text_stream.flush() == "<n"


def test_cancelled_request_leaves_the_batch(model, bpe):
    requests = [Request(bpe.encode("To be"), SamplingParams(max_new_tokens=40, temperature=0)) for _ in range(2)]
    cancelled_at = None
    for event in run_requests(model, bpe, requests):
        if cancelled_at is None and len(requests[0].output_ids) >= 3:
            requests[0].cancelled = True
            cancelled_at = len(requests[0].output_ids)
    assert requests[0].finish_reason == "cancelled" and len(requests[0].output_ids) == cancelled_at
    assert requests[1].finish_reason == "length" and len(requests[1].output_ids) == 40


def test_int8_weight_only_model_tracks_the_float_model():
    import copy

    from yuanmoe.inference.quantize import quantize_int8

    torch.manual_seed(0)
    model = YuanForCausalLM(preset("tiny")).eval()
    quantized = quantize_int8(copy.deepcopy(model))
    assert all(".router." in name for name, m in quantized.named_modules() if isinstance(m, torch.nn.Linear))
    prompts = torch.randint(3, 500, (2, 20))
    with torch.inference_mode():
        want, got = model(prompts).logits, quantized(prompts).logits.float()
    assert (want - got).pow(2).mean().sqrt() < 0.05 * want.pow(2).mean().sqrt()
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    # Decoding one row at a time goes through the int8 kernel, the prefill through dequantized weights.
    assert decode_tokens(quantized, prompts[:1].tolist(), GREEDY, stop_token_ids=())[0][0] == \
        decode_tokens(model, prompts[:1].tolist(), GREEDY, stop_token_ids=())[0][0]


@pytest.mark.parametrize("joins", [{2: 1, 3: 2, 9: 1}, {1: 1, 12: 1, 25: 1, 40: 1}])
def test_sequences_joining_a_running_batch_decode_exactly_as_alone(model, joins):
    """Continuous batching: sequences added mid-way (shorter and longer prompts, sampled ones with
    seeds and a repetition penalty, some after the batch ran empty) give the tokens they give alone."""
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    sampled = SamplingParams(max_new_tokens=15, temperature=0.8, seed=7, repetition_penalty=1.3)
    prompts = [[5, 6, 7], list(range(10, 40)), [100, 101], list(range(50, 58)), [9] * 12]
    params = [greedy, sampled, greedy, sampled, greedy]
    alone = [decode_tokens(model, [p], [q], stop_token_ids=())[0][0] for p, q in zip(prompts, params)]
    decoder = BatchDecoder(model, prompts[:1], params[:1], stop_token_ids=())
    started, step, widths = 1, 0, set()
    while not decoder.done or started < len(prompts):
        if step in joins:
            assert decoder.add(prompts[started:started + joins[step]], params[started:started + joins[step]]) == \
                list(range(started, started + joins[step]))
            started += joins[step]
        decoder.step()
        widths.add(decoder.cache.max_len)
        step += 1
    assert decoder.generated == alone
    assert min(widths) < max(widths) - 16  # slots of sequences that left were dropped (trim)
