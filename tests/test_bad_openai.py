"""The OpenAI API surface. Every field of OpenAI's completion and chat request schemas, read from
the installed `openai` package (a field a new release adds fails here until it is classified), is
implemented, informational, or refused with a 400 naming it unless sent with a neutral value;
every number is range-checked with the range in the error; fields OpenAI does not have are refused
(but the extensions top_k and repetition_penalty); and no bad request changes a good one beside it."""

from __future__ import annotations

import json
import math
import typing
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from openai.types import completion_create_params
from openai.types.chat import (ChatCompletionMessage, ChatCompletionMessageParam, ChatCompletionStreamOptionsParam,
                               completion_create_params as chat_create_params)

from yuanmoe.serving.app import ChatBody, ChatMessage, CompletionBody

MODEL = "tiny-test"
CAP = 6
COMPLETION, CHAT = "/v1/completions", "/v1/chat/completions"


def openai_fields(*typed_dicts) -> set[str]:
    return set().union(*(td.__annotations__ for td in typed_dicts))


OPENAI = {COMPLETION: openai_fields(completion_create_params.CompletionCreateParamsNonStreaming),
          CHAT: openai_fields(chat_create_params.CompletionCreateParamsNonStreaming)}
# A message may also hold what a reply's message does: clients send replies back as the assistant's turn.
OPENAI_MESSAGE = openai_fields(*typing.get_args(ChatCompletionMessageParam)) | set(ChatCompletionMessage.model_fields)
EXTENSIONS = {"top_k", "repetition_penalty"}
BOTH = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
        "frequency_penalty", "presence_penalty"}
IMPLEMENTED = {COMPLETION: BOTH | {"prompt"}, CHAT: BOTH | {"messages", "max_completion_tokens"}}
# Accepted whatever they hold (of their type): nothing the server does depends on them.
INFORMATIONAL = {COMPLETION: {"user": "u-1"},
                 CHAT: {"user": "u-1", "metadata": {"team": "a"}, "safety_identifier": "h-1",
                        "prompt_cache_key": "k-1", "parallel_tool_calls": True}}
# Refused with a 400 naming them unless null or one of these neutral values, each followed by a
# value a client might really send.
REFUSED = {
    COMPLETION: {"best_of": ([1], 2), "echo": ([False], True), "logit_bias": ([{}], {"50256": -100}),
                 "logprobs": ([], 0), "suffix": ([""], "}")},
    CHAT: {"audio": ([], {"voice": "alloy", "format": "wav"}), "function_call": (["none", "auto"], {"name": "f"}),
           "functions": ([[]], [{"name": "f"}]), "logit_bias": ([{}], {"7": 5}), "logprobs": ([False], True),
           "modalities": ([["text"]], ["text", "audio"]), "moderation": ([], {"model": "omni-moderation-latest"}),
           "prediction": ([], {"type": "content", "content": "x"}),
           "prompt_cache_options": ([{}, {"mode": "implicit"}], {"mode": "explicit"}),
           "prompt_cache_retention": (["in_memory"], "24h"), "reasoning_effort": (["none"], "high"),
           "response_format": ([{"type": "text"}], {"type": "json_object"}),
           "service_tier": (["auto", "default"], "flex"), "store": ([False], True),
           "tool_choice": (["none", "auto"], "required"),
           "tools": ([[]], [{"type": "function", "function": {"name": "f"}}]), "top_logprobs": ([0], 3),
           "verbosity": (["medium"], "low"), "web_search_options": ([], {})},
}
MESSAGE_IMPLEMENTED = {"role", "content"}
MESSAGE_REFUSED = {"name": ([], "alice"), "refusal": ([], "no"), "tool_calls": ([[]], [{"id": "c"}]),
                   "function_call": ([], {"name": "f", "arguments": "{}"}), "audio": ([], {"id": "a"}),
                   "tool_call_id": ([], "c"), "annotations": ([[]], [{"type": "url_citation"}])}
STREAM_OPTIONS_REFUSED = {"include_obfuscation": ([False], True)}
# field: (an integer?, lowest, highest, lowest excluded?, the range as the error states it)
RANGES = {
    "temperature": (False, 0, 2, False, "a number from 0 to 2"),
    "top_p": (False, 0, 1, True, "a number greater than 0 and at most 1"),
    "top_k": (True, 0, 2**31 - 1, False, "an integer from 0 to 2147483647"),
    "repetition_penalty": (False, 0, 100, True, "a number greater than 0 and at most 100"),
    "frequency_penalty": (False, -2, 2, False, "a number from -2 to 2"),
    "presence_penalty": (False, -2, 2, False, "a number from -2 to 2"),
    "seed": (True, -2**63, 2**63 - 1, False, "an integer from -9223372036854775808 to 9223372036854775807"),
    "n": (True, 1, 8, False, "an integer from 1 to 8"),
}
TOKEN_LIMITS = {COMPLETION: ["max_tokens"], CHAT: ["max_tokens", "max_completion_tokens"]}  # from 1 to the cap
BODIES = {COMPLETION: {"model": MODEL, "prompt": "To be", "max_tokens": 2, "temperature": 0},
          CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "To be"}], "max_tokens": 2, "temperature": 0}}


def neutral(value, allowed) -> bool:
    """As the server compares: by value and type, so that 1 is not true."""
    return any(type(value) is type(n) and value == n for n in (None, *allowed))


# Any JSON value, NaN and lone surrogates included (Python's JSON reader accepts both).
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats()
           | st.text(alphabet=st.characters(exclude_categories=()), max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)
endpoints = st.sampled_from([COMPLETION, CHAT])
# Never a number the schema takes: "nan" and "inf" parse as numbers it refuses.
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


def refused_value(field_table, name):
    allowed, real = field_table[name]
    return (st.just(real) | json_values).filter(lambda v: not neutral(v, allowed))


def out_of_range(integer: bool, low, high, above: bool):
    if integer:
        bounds = st.integers(max_value=low - 1) | st.integers(min_value=high + 1)
        wrong = st.floats().filter(lambda x: not x.is_integer()) | words
    else:
        bounds = st.floats(max_value=low, exclude_max=not above) | st.floats(min_value=high, exclude_min=True)
        wrong = st.sampled_from([math.nan, math.inf, -math.inf]) | words
    return bounds | st.sampled_from([-2**70, 2**64, 2**70]).filter(lambda v: not low <= v <= high) | wrong


def in_range(integer: bool, low, high, above: bool):
    if integer:
        return st.integers(low, high)
    return st.floats(low, high, exclude_min=above) | st.integers(math.floor(low) + above, math.floor(high))


@pytest.fixture(scope="module")
def client(model, bpe):
    """The app called in-process (a request over a localhost socket takes ten times as long); requests
    from several threads still run at once, on the one event loop the client's portal runs."""
    from fastapi.testclient import TestClient

    from yuanmoe.serving import create_app

    with TestClient(create_app(model, bpe, MODEL, max_tokens_cap=CAP, max_batch_size=4, max_prompts=4)) as http:
        yield http


def send(client, path: str, body: dict) -> httpx.Response:
    # Not httpx's json=: that refuses NaN, which Python's JSON reader (and so the server) takes.
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def refusal(reply: httpx.Response, param: str) -> str:
    assert reply.status_code == 400, (param, reply.status_code, reply.text)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    return error["message"]


def answered(reply: httpx.Response, body: dict) -> None:
    assert reply.status_code == 200, (body, reply.text)
    if body.get("stream"):
        assert reply.text.rstrip().endswith("data: [DONE]") and '"error"' not in reply.text, reply.text
    else:
        assert reply.json()["choices"]


def test_every_openai_field_is_classified_and_declared_by_the_server():
    for path, schema in ((COMPLETION, CompletionBody), (CHAT, ChatBody)):
        classified = IMPLEMENTED[path] | set(INFORMATIONAL[path]) | set(REFUSED[path])
        assert OPENAI[path] == classified, f"{path}: new {OPENAI[path] - classified}, gone {classified - OPENAI[path]}"
        # Declared, so that the server's own check (and message) applies; nothing else but the extensions.
        assert set(schema.model_fields) == OPENAI[path] | EXTENSIONS
    assert OPENAI_MESSAGE == MESSAGE_IMPLEMENTED | set(MESSAGE_REFUSED) == set(ChatMessage.model_fields)
    stream_options = openai_fields(ChatCompletionStreamOptionsParam)
    assert stream_options == {"include_usage"} | set(STREAM_OPTIONS_REFUSED)


@st.composite
def refused_requests(draw):
    """(endpoint, body, the param named): one refused field with a value that asks for something."""
    path = draw(endpoints)
    body = json.loads(json.dumps(BODIES[path]))
    where = draw(st.sampled_from(["body", "message", "stream_options"] if path == CHAT else ["body", "stream_options"]))
    if where == "body":
        name = draw(st.sampled_from(sorted(REFUSED[path])))
        body[name] = draw(refused_value(REFUSED[path], name))
        return path, body, name
    if where == "message":
        name = draw(st.sampled_from(sorted(MESSAGE_REFUSED)))
        body["messages"][0][name] = draw(refused_value(MESSAGE_REFUSED, name))
        return path, body, f"messages.0.{name}"
    name = draw(st.sampled_from(sorted(STREAM_OPTIONS_REFUSED)))
    body.update(stream=True, stream_options={name: draw(refused_value(STREAM_OPTIONS_REFUSED, name))})
    return path, body, f"stream_options.{name}"


@settings(max_examples=300, deadline=None)
@given(refused_requests())
def test_an_unsupported_field_asking_for_something_gets_a_400_naming_it(client, case):
    path, body, param = case
    message = refusal(send(client, path, body), param)
    assert message.startswith(f"{param} is not supported by this server (") and "leave it out" in message


@st.composite
def out_of_range_requests(draw):
    path = draw(endpoints)
    body = dict(BODIES[path])
    name = draw(st.sampled_from(sorted(RANGES) + TOKEN_LIMITS[path]))
    if name in RANGES:
        integer, low, high, above, sentence = RANGES[name]
        body[name] = draw(out_of_range(integer, low, high, above))
        return path, body, name, f"{name} must be {sentence}, got "
    body.pop("max_tokens")
    body[name] = value = draw(out_of_range(True, 1, CAP, False))
    if isinstance(value, int) and value > CAP:
        return path, body, name, (f"{name} is {value} but this server allows at most {CAP}; "
                                  f"send an integer from 1 to {CAP}")
    return path, body, name, f"{name} must be an integer of at least 1, got "


@settings(max_examples=300, deadline=None)
@given(out_of_range_requests())
def test_a_number_out_of_range_gets_a_400_stating_the_range(client, case):
    path, body, param, expected = case
    assert refusal(send(client, path, body), param).startswith(expected)


@st.composite
def accepted_requests(draw):
    """A request with neutral values of refused fields, informational ones and numbers in range."""
    path = draw(endpoints)
    body = json.loads(json.dumps(BODIES[path]))
    for name in draw(st.sets(st.sampled_from(sorted(REFUSED[path])), max_size=6)):
        body[name] = draw(st.sampled_from([None, *REFUSED[path][name][0]]))
    for name in draw(st.sets(st.sampled_from(sorted(INFORMATIONAL[path])), max_size=3)):
        body[name] = draw(st.sampled_from([None, INFORMATIONAL[path][name]]))
    if path == CHAT:
        for name in draw(st.sets(st.sampled_from(sorted(MESSAGE_REFUSED)), max_size=3)):
            body["messages"][0][name] = draw(st.sampled_from([None, *MESSAGE_REFUSED[name][0]]))
    for name in draw(st.sets(st.sampled_from(sorted(RANGES) + TOKEN_LIMITS[path]), max_size=4)):
        body[name] = draw(st.none() | (in_range(*RANGES[name][:4]) if name in RANGES else st.integers(1, CAP)))
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body["max_completion_tokens"]  # both given must agree
    if draw(st.booleans()):
        body["stream"] = True
        body["stream_options"] = draw(st.none() | st.fixed_dictionaries(
            {}, optional={"include_usage": st.booleans(), "include_obfuscation": st.just(False)}))
    return path, body


@settings(max_examples=150, deadline=None)
@given(accepted_requests())
def test_neutral_values_informational_fields_and_numbers_in_range_are_answered(client, case):
    path, body = case
    answered(send(client, path, body), body)


known = set().union(*OPENAI.values(), OPENAI_MESSAGE, EXTENSIONS)


@settings(max_examples=100, deadline=None)
@given(endpoints, st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12) | st.sampled_from(
    ["min_p", "best_of", "messages", "prompt", "max_completion_tokens", "top_logprobs", "echo", "suffix"]),
       json_values)
def test_a_field_of_neither_openai_schema_nor_this_endpoint_gets_a_400_naming_it(client, path, name, value):
    assume(name not in OPENAI[path] | EXTENSIONS)
    message = refusal(send(client, path, {**BODIES[path], name: value}), name)
    assert message == f"{name} is not a field of a {path} request; leave it out"
    if name not in known:  # also inside a message
        body = json.loads(json.dumps(BODIES[CHAT]))
        body["messages"][0][name] = value
        refusal(send(client, CHAT, body), f"messages.0.{name}")


bad_requests = (refused_requests().map(lambda r: r[:2]) | out_of_range_requests().map(lambda r: r[:2])
                | st.tuples(endpoints, st.just({"model": MODEL, "prompt": "x", "messages": [], "min_p": 0.1})))
# Accepted, and as far from the good request's settings as the ranges go: the sampler must keep them apart.
extreme = st.fixed_dictionaries({
    "temperature": st.sampled_from([1e-300, 2.0]), "top_k": st.just(2**31 - 1), "n": st.integers(1, 3),
    "frequency_penalty": st.sampled_from([-2, 2]), "presence_penalty": st.sampled_from([-2, 2]),
    "repetition_penalty": st.sampled_from([1e-300, 100]), "seed": st.sampled_from([-2**63, 2**63 - 1]),
    "max_tokens": st.integers(1, CAP)})


@pytest.fixture(scope="module")
def expected(model, bpe):
    from yuanmoe.inference import SamplingParams, complete

    return complete(model, bpe, ["To be"], SamplingParams(max_new_tokens=CAP, temperature=0))[0].text


@settings(max_examples=20, deadline=None)
@given(st.lists(bad_requests, min_size=2, max_size=4), st.lists(extreme, min_size=1, max_size=2))
def test_bad_and_extreme_requests_never_change_a_concurrent_good_one(client, expected, bad, extremes):
    good = {**BODIES[COMPLETION], "max_tokens": CAP}
    jobs = [(COMPLETION, good)] * 2 + bad + [(COMPLETION, {**good, **e}) for e in extremes]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: send(client, *job), jobs))
    assert [r.json()["choices"][0]["text"] for r in replies[:2]] == [expected] * 2
    assert all(r.status_code == 400 for r in replies[2:2 + len(bad)]), [r.text for r in replies]
    assert all(r.status_code == 200 for r in replies[2 + len(bad):]), [r.text for r in replies]


def test_frequency_and_presence_penalties_are_openais(client, model, bpe):
    """Greedy with the penalties against the plainest reference: a full forward per token, its logits
    lowered by c * frequency_penalty + (c > 0) * presence_penalty, c the count of the token in the
    output so far (not in the prompt), as OpenAI defines them; plain requests run beside them."""
    prompt = "hi"  # the model repeats a token within CAP tokens of "hi"
    ids = bpe.encode(prompt)

    def reference(frequency, presence):
        out = []
        with torch.inference_mode():
            for _ in range(CAP):
                logits = model(torch.tensor([ids + out])).logits[0, -1].float()
                counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
                out.append(int((logits - counts * frequency - (counts > 0) * presence).argmax()))
                if out[-1] == bpe.eod_id:
                    break
        return bpe.decode([i for i in out if i != bpe.eod_id])

    penalties = [(0, 0), (2, 0), (0, 2), (1.5, 0.5), (0, 0)]
    expected = [reference(*p) for p in penalties]
    assert all(text != expected[0] for text in expected[1:-1])  # each penalty changes this answer
    body = {**BODIES[COMPLETION], "prompt": prompt, "max_tokens": CAP}
    with ThreadPoolExecutor(len(penalties)) as pool:
        replies = list(pool.map(lambda p: send(client, COMPLETION, {**body, "frequency_penalty": p[0],
                                                                    "presence_penalty": p[1]}), penalties))
    assert [r.json()["choices"][0]["text"] for r in replies] == expected


def test_the_implemented_forms_of_prompt_messages_and_streams(client, bpe):
    text = send(client, COMPLETION, BODIES[COMPLETION]).json()["choices"][0]["text"]
    by_ids = send(client, COMPLETION, {**BODIES[COMPLETION], "prompt": bpe.encode("To be")}).json()
    assert by_ids["choices"][0]["text"] == text and by_ids["usage"]["prompt_tokens"] == len(bpe.encode("To be"))
    two = send(client, COMPLETION, {**BODIES[COMPLETION], "prompt": [bpe.encode("To be"), bpe.encode("To be")]}).json()
    assert [c["text"] for c in two["choices"]] == [text] * 2
    message = refusal(send(client, COMPLETION, {**BODIES[COMPLETION], "prompt": [5, 2**40]}), "prompt")
    assert "token id 1099511627776 is out of range for a vocabulary of" in message

    def chat(system_role):
        body = {**BODIES[CHAT], "messages": [{"role": system_role, "content": "Be brief."},
                                             {"role": "user", "content": "To be"}]}
        return send(client, CHAT, body).json()["choices"][0]["message"]["content"]

    assert chat("developer") == chat("system")
    reply = send(client, CHAT, BODIES[CHAT]).json()["choices"][0]["message"]
    turn = ChatCompletionMessage.model_validate(reply).model_dump()  # every field of a reply's message, null
    again = {**BODIES[CHAT], "messages": [BODIES[CHAT]["messages"][0], turn, {"role": "user", "content": "Again"}]}
    assert send(client, CHAT, again).status_code == 200
    for role in ("tool", "function"):
        refusal(send(client, CHAT, {**BODIES[CHAT], "messages": [{"role": role, "content": "x"}]}), "messages.0.role")
    parts = [{"type": "text", "text": "To be", "prompt_cache_breakpoint": {"mode": "explicit"}}]
    assert "only text content" in refusal(send(client, CHAT, {**BODIES[CHAT], "messages": [
        {"role": "user", "content": parts}]}), "messages")
    message = refusal(send(client, CHAT, {**BODIES[CHAT], "max_completion_tokens": 3}), "max_tokens")
    assert message == "max_tokens and max_completion_tokens differ; send max_completion_tokens alone"
    assert send(client, CHAT, {**BODIES[CHAT], "max_tokens": None, "max_completion_tokens": 2}).status_code == 200

    message = refusal(send(client, CHAT, {**BODIES[CHAT], "stream_options": {"include_usage": True}}), "stream_options")
    assert message == "stream_options is only allowed with stream true; leave it out or send stream: true"
    streamed = send(client, COMPLETION, {**BODIES[COMPLETION], "stream": True,
                                         "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert '"usage"' in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
