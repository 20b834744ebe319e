"""Property tests (hypothesis): whatever JSON arrives, the request schema and the config loaders
answer with a result or their one typed error, never anything else."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from yuanmoe.config import ConfigError, YuanConfig, preset

# Any JSON value, NaN, Infinity and lone surrogates included (Python's JSON reader accepts all three).
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
scalars = st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80) | st.floats() | any_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
FIELDS = [f.name for f in dataclasses.fields(YuanConfig)]


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["unknown"]), json_values, max_size=5))
def test_config_from_any_json_object_is_a_config_or_a_config_error(changes):
    data = {**preset("tiny").to_dict(), **changes}
    try:
        config = YuanConfig.from_json(json.dumps(data))
    except ConfigError:
        return
    assert config.to_dict() == data


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_any_json_text_is_a_config_or_a_config_error(value):
    from yuanmoe.convert import config_from_official

    try:
        YuanConfig.from_json(json.dumps(value))
    except ConfigError:
        pass
    try:
        config_from_official({"model_type": "yuan", **value} if isinstance(value, dict) else value)
    except ConfigError:
        pass


SAMPLING = ["max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "n", "stream"]
# Small numbers in range, the extremes that once broke the sampler, and anything else.
sampling_values = (st.integers(min_value=-3, max_value=12) | st.floats(min_value=-1, max_value=3)
                   | st.sampled_from([1e-300, 5e-324, 2**63, 2**64, 2**70]) | st.integers() | st.floats() | st.none()
                   | st.booleans() | any_text)
prompts = any_text | st.lists(any_text, max_size=5) | json_values


@pytest.fixture(scope="module")
def server(model, bpe):
    from conftest import running_server
    from yuanmoe.serving import create_app

    with running_server(create_app(model, bpe, "tiny-test", max_tokens_cap=12, max_batch_size=4, max_prompts=4)) as url:
        yield url


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(chat=False, prompt="a\ud800", fields={})
@example(chat=True, prompt="hi", fields={"temperature": 1e-300, "n": 2})
@example(chat=False, prompt=["hi", "ho"], fields={"seed": 2**70, "temperature": 1})
@example(chat=False, prompt="0", fields={"top_p": 1.8e-50})
@given(chat=st.booleans(), prompt=prompts, fields=st.dictionaries(st.sampled_from(SAMPLING), sampling_values,
                                                                    max_size=4))
def test_any_request_body_gets_an_answer_or_a_4xx_in_the_openai_shape(server, chat, prompt, fields):
    import httpx

    body = {"model": "tiny-test", **fields}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reply = httpx.post(server + path, content=json.dumps(body), headers={"content-type": "application/json"},
                       timeout=60)
    if reply.status_code == 200:
        if body.get("stream") is True:
            assert reply.text.rstrip().endswith("data: [DONE]") and '"error"' not in reply.text, reply.text
        else:
            assert reply.json()["choices"]
        return
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    assert reply.json()["error"]["message"]
