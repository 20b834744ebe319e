"""The OpenAI-compatible server, driven by the official `openai` client over a real localhost socket."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import running_server

MODEL_NAME = "tiny-test"
CAP = 400


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, model, bpe):  # noqa: F811
    """A checkpoint folder with its tokenizer."""
    from yuanmoe import save_pretrained

    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=bpe)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir):
    """The model and tokenizer loaded back the way the commands load them."""
    from argparse import Namespace

    from yuanmoe.inference.commands import load

    return load(Namespace(checkpoint=str(checkpoint_dir), device="cpu", dtype=None, quantize=None, activations="int8"))


@pytest.fixture(scope="module")
def server(checkpoint):
    from yuanmoe.serving import create_app

    model, tokenizer = checkpoint
    with running_server(create_app(model, tokenizer, MODEL_NAME, max_tokens_cap=CAP, max_batch_size=4)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_chat_plain_and_streamed_give_the_same_answer(client, bpe):  # noqa: F811
    messages = [{"role": "user", "content": "Who goes there?\nSpeak."}]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0)
    answer = plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length") and answer
    assert plain.usage.prompt_tokens == len(bpe.encode("Who goes there?<n>Speak.<sep>"))
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_returns_text_and_usage(client, checkpoint):
    from yuanmoe.inference import SamplingParams, complete

    prompt = "KING RICHARD:\nNow is the winter"
    reply = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    expected = complete(*checkpoint, [prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert reply.usage.completion_tokens == len(expected.output_ids)


def test_greedy_completion_equals_step_by_step_full_forward_without_cache(client, checkpoint):
    """The server's cached decoding against the plainest reference: each next token is the argmax
    of a full forward over the whole sequence so far, no cache (a cache that loses state fails this)."""
    import torch

    model, tokenizer = checkpoint
    prompt, max_tokens = "KING RICHARD:\nNow is the winter", 16
    ids = tokenizer.encode(prompt)
    generated = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            generated.append(int(logits.argmax()))
            if generated[-1] == model.config.eod_token_id:
                break
    assert len(set(generated)) > 4  # a continuation that depends on its context
    reply = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(generated)
    text = tokenizer.decode([i for i in generated if i != model.config.eod_token_id])
    assert reply.choices[0].text == text


def test_invalid_requests_get_clear_4xx_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=f"max_tokens is {CAP + 1} but this server allows at most {CAP}"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=CAP + 1)
    with pytest.raises(openai.BadRequestError, match="the model's context is 512"):
        client.completions.create(model=MODEL_NAME, prompt="to be or not " * 400, max_tokens=4)
    bad_json = httpx.post(server + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    missing = httpx.post(server + "/v1/completions", json={"model": MODEL_NAME})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


def test_concurrent_requests_are_batched_and_match_the_same_requests_one_at_a_time(client, server):
    prompts = ["To be", "First Citizen:", "O Romeo, Romeo", "Now is the", "A horse!", "Friends, Romans"]

    def ask(prompt):
        reply = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0)
        return reply.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == [ask(p) for p in prompts]
    batch_sizes = httpx.get(server + "/health").json()["batch_sizes"]
    assert max(int(size) for size in batch_sizes) > 1


def test_client_disconnect_stops_its_generation(server):
    before = httpx.get(server + "/health").json()["finished_requests"].get("cancelled", 0)
    body = {"model": MODEL_NAME, "prompt": "To be", "max_tokens": CAP, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["finished_requests"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the disconnected request kept running"
        time.sleep(0.05)


def test_generate_command_prints_the_completion_or_a_clear_error(checkpoint_dir, checkpoint, capsys):
    from yuanmoe.cli import main
    from yuanmoe.inference import SamplingParams, complete

    assert main(["generate", str(checkpoint_dir), "To be", "--max-new-tokens", "8"]) == 0
    expected = complete(*checkpoint, ["To be"], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", str(checkpoint_dir), "to be or not " * 400]) == 2
    assert "error: the prompt has" in capsys.readouterr().err


def run_scheduler(scheduler, body):
    """Run `body(scheduler)` (a coroutine function) with the scheduler's worker started."""
    import asyncio

    scheduler.start()
    try:
        return asyncio.run(body(scheduler))
    finally:
        scheduler.stop()


async def answer(scheduler, request, finished_order=None):
    async for _ in scheduler.submit([request]):
        pass
    if finished_order is not None:
        finished_order.append(request)
    return request


def test_a_request_that_fails_to_start_fails_alone(checkpoint):
    import asyncio

    from yuanmoe.inference import Request, SamplingParams, complete
    from yuanmoe.serving.scheduler import GenerationError, Scheduler

    model, tokenizer = checkpoint
    params = SamplingParams(max_new_tokens=6, temperature=0)
    prompts = [tokenizer.encode(p) for p in ("To be", "A horse!")]
    # An id outside the vocabulary gets past no HTTP check; here it stands for any request that
    # cannot start. It arrives with the others and is prefilled with them.
    bad = Request([5, model.config.vocab_size + 3], params)

    async def body(scheduler):
        return await asyncio.gather(answer(scheduler, Request(prompts[0], params)), answer(scheduler, bad),
                                    answer(scheduler, Request(prompts[1], params)), return_exceptions=True)

    first, failed, second = run_scheduler(Scheduler(model, tokenizer, max_batch_size=4, batch_wait_s=0.2), body)
    assert isinstance(failed, GenerationError) and "out of range for a vocabulary" in str(failed)
    expected = complete(model, tokenizer, ["To be", "A horse!"], params)
    assert [first.text, second.text] == [r.text for r in expected]


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_arriving_mid_batch_joins_at_the_next_step_only_with_continuous_batching(checkpoint, continuous):
    import asyncio

    from yuanmoe.inference import Request, SamplingParams, complete
    from yuanmoe.serving.scheduler import Scheduler

    model, tokenizer = checkpoint
    long_params, short_params = SamplingParams(max_new_tokens=120, temperature=0), SamplingParams(max_new_tokens=3,
                                                                                                  temperature=0)
    prompts = ["KING RICHARD:\nNow is the winter", "To be"]
    long, short = (Request(tokenizer.encode(p), params) for p, params in zip(prompts, (long_params, short_params)))
    finished = []

    async def body(scheduler):
        events = scheduler.submit([long])
        first = await events.__anext__()  # the long request is decoding
        assert not first[1].finished
        later = asyncio.ensure_future(answer(scheduler, short, finished))
        async for _ in events:
            pass
        finished.append(long)
        await later

    scheduler = Scheduler(model, tokenizer, max_batch_size=4, continuous=continuous)
    run_scheduler(scheduler, body)
    assert finished == ([short, long] if continuous else [long, short])
    assert (long.text, short.text) == tuple(r.text for r in (complete(model, tokenizer, [prompts[0]], long_params)[0],
                                                             complete(model, tokenizer, [prompts[1]], short_params)[0]))
    assert (max(scheduler.batch_sizes) == 2) == continuous


def test_waiting_requests_start_round_robin_over_callers(checkpoint):
    """One caller's many prompts do not hold back another caller's single one until they all ran."""
    import asyncio

    from yuanmoe.inference import Request, SamplingParams
    from yuanmoe.serving.scheduler import Scheduler

    model, tokenizer = checkpoint
    params = SamplingParams(max_new_tokens=20, temperature=0)
    many = [Request(tokenizer.encode(p), params) for p in ("To be", "A horse!", "Now is the", "First Citizen:") * 2]
    single = Request(tokenizer.encode("O Romeo, Romeo"), params)
    finished = []

    async def body(scheduler):
        async def consume(requests):
            async for index, event in scheduler.submit(requests):
                if event.finished:
                    finished.append(requests[index])

        first = asyncio.ensure_future(consume(many))
        await asyncio.sleep(0.05)  # the many are queued (two running) before the single one arrives
        await asyncio.gather(first, consume([single]))

    run_scheduler(Scheduler(model, tokenizer, max_batch_size=2), body)
    assert len(finished) == 9 and finished.index(single) < 6
