"""The prefix cache: a prompt that starts like a sequence served before prefills only the rest, and
decodes exactly what it decodes without the cache (the golden model, fp32, tokens and every step's
logits), alone, in batches that mix hits and misses, joining a running batch, across documents."""

import json

import httpx
import pytest
import torch

from conftest import GOLDEN, running_server
from yuanmoe import from_pretrained
from yuanmoe.inference.engine import Request, RunningBatch
from yuanmoe.inference.generate import BatchDecoder
from yuanmoe.inference.prefix_cache import PrefixCache
from yuanmoe.inference.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def golden():
    return from_pretrained(GOLDEN, dtype=torch.float32)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode(model, prompts, cache=None, late=()):
    """Greedy continuations of `prompts` (and of `late`, added after the first step, as continuous
    batching adds them) and the logits every row chose its tokens from, by sequence."""
    first = cache.lookup(prompts[0]) if cache is not None else None
    d = BatchDecoder(model, prompts[:1], GREEDY, prefix_cache=cache, prefix=first)
    if len(prompts) > 1:
        d.add(prompts[1:], GREEDY)
    logits = {}
    steps = 0
    while not d.done:
        d.step()
        if steps == 0 and late:
            d.add(list(late), GREEDY)
        for seq, row_logits in zip(d.rows, d._logits):  # the rows the step sampled from
            logits.setdefault(seq, []).append(row_logits.clone())
        steps += 1
    return d.generated, logits


def assert_same(a, b):
    (gen_a, logits_a), (gen_b, logits_b) = a, b
    assert gen_a == gen_b
    for seq in logits_a:
        for x, y in zip(logits_a[seq], logits_b[seq]):
            assert (x - y).abs().max() <= 1e-5


def served(model, cache, prompt):
    """Serve one prompt through the cache; returns the sequence that was fed (prompt + answer)."""
    generated, _ = decode(model, [prompt], cache)
    return prompt + generated[0][:-1]


def test_a_next_turn_reuses_the_conversation_and_decodes_exactly(golden):
    cache = PrefixCache(10**9, (golden.config.eod_token_id,))
    turn1 = tokens(0, 20)
    fed = served(golden, cache, turn1)
    assert len(cache) == 1
    turn2 = fed[:25] + tokens(1, 6)  # the conversation so far, then where it goes on differently
    want = decode(golden, [turn2])
    before = cache.stats()["tokens_reused"]
    assert_same(decode(golden, [turn2], cache), want)
    assert cache.stats()["tokens_reused"] - before == 25
    assert cache.stats()["hits"] == 1
    again = fed[:15]  # a prompt the cache holds whole: its last token is still computed, for its logits
    before = cache.stats()["tokens_reused"]
    assert_same(decode(golden, [again], cache), decode(golden, [again]))
    assert cache.stats()["tokens_reused"] - before == 14


@pytest.mark.parametrize("reused", [1, 2, 3])
def test_the_shortest_prefixes_rebuild_the_filter_state(golden, reused):
    """One and two reused tokens: the LFA state holds zeros before the first token."""
    cache = PrefixCache(10**9, (golden.config.eod_token_id,))
    first = tokens(2, 8)
    served(golden, cache, first)
    prompt = first[:reused] + tokens(3, 5)
    assert_same(decode(golden, [prompt], cache), decode(golden, [prompt]))
    assert cache.stats()["tokens_reused"] == reused


def test_a_batch_mixing_hits_and_misses_and_joining_requests(golden):
    eod = golden.config.eod_token_id
    cache = PrefixCache(10**9, (eod,))
    a, b = served(golden, cache, tokens(4, 16)), served(golden, cache, tokens(5, 9))
    prompts = [a[:20] + tokens(6, 3), tokens(7, 12), b[:12] + tokens(8, 4)]
    late = [a[:10] + tokens(9, 7), tokens(10, 5)]
    want = decode(golden, prompts, late=late)
    got = decode(golden, prompts, cache, late=late)
    assert_same(got, want)
    assert cache.stats()["tokens_reused"] >= 20 + 12 + 10


def test_documents_are_reused_up_to_the_first_boundary_only(golden):
    eod = golden.config.eod_token_id
    cache = PrefixCache(10**9, (eod,))
    doc = tokens(11, 10)
    served(golden, cache, doc)
    packed = doc + [eod] + tokens(12, 6)  # a second document after the cached one
    assert cache.usable_length(packed) == len(doc)
    assert_same(decode(golden, [packed], cache), decode(golden, [packed]))
    keeper = PrefixCache(10**9, (eod,))  # a sequence of two documents is not kept: no prompt can reuse it
    served(golden, keeper, packed)
    assert len(keeper) == 0


def test_the_budget_keeps_the_most_recent_and_longer_sequences_replace_their_prefixes(golden):
    eod = golden.config.eod_token_id
    probe = PrefixCache(10**9, (eod,))
    served(golden, probe, tokens(13, 12))
    size = probe.bytes_held
    cache = PrefixCache(int(2.5 * size), (eod,))
    first = served(golden, cache, tokens(13, 12))
    served(golden, cache, tokens(14, 12))
    # a hit makes the first the most recent; storing this third one goes over the budget, so the
    # least recently used one, the second, goes
    served(golden, cache, first[:10] + tokens(15, 2))
    assert cache.bytes_held <= cache.max_bytes and len(cache) == 2
    assert cache.lookup(tokens(14, 12))[1] == 0
    assert cache.lookup(first[:11] + [3])[1] == 11
    longer = PrefixCache(10**9, (eod,))
    turn = served(golden, longer, tokens(17, 8))
    served(golden, longer, turn + tokens(18, 3))  # extends the first: it replaces it
    assert len(longer) == 1


@pytest.mark.parametrize("gb", [-1.0, float("inf"), float("nan")])
def test_refuses_a_budget_that_is_no_size(gb):
    with pytest.raises(ValueError, match="--prefix-cache-gb must be a number of GB, 0 or more"):
        PrefixCache.from_gb(gb)
    assert PrefixCache.from_gb(0) is None


def test_a_bad_prompt_in_a_new_batch_starts_none_of_it(golden):
    """RunningBatch.add with the cache prefills the first prompt alone: a bad one after it must
    still leave nothing running, so that the server can start the good ones one by one."""
    class Ids:
        eod_id = golden.config.eod_token_id

        def decode(self, ids):
            return " ".join(map(str, ids))

    batch = RunningBatch(golden, Ids(), PrefixCache(10**9, (Ids.eod_id,)))
    with pytest.raises(ValueError, match="out of range"):
        batch.add([Request(tokens(22, 5), GREEDY), Request([10**6], GREEDY)])
    good = Request(tokens(22, 5), GREEDY)
    batch.add([good])
    while batch.requests:
        batch.step()
    assert good.finish_reason == "length" and len(good.output_ids) == GREEDY.max_new_tokens


def test_server_reuses_chat_turns_and_reports_it(golden_with_tokenizer):
    from yuanmoe.serving import create_app
    from yuanmoe.tokenizer import load_tokenizer

    model = from_pretrained(golden_with_tokenizer, dtype=torch.float32)
    tokenizer = load_tokenizer(golden_with_tokenizer)
    first = [{"role": "user", "content": "to be or not to be, that is the question"}]
    with running_server(create_app(model, tokenizer, "golden", prefix_cache_gb=0.1)) as url:
        body = {"model": "golden", "messages": first, "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        text = answer["choices"][0]["message"]["content"]
        second = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "whether tis nobler"}]
        reply = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": second}, timeout=60).json()
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("yuan_prefix_cache_")}
    assert values["yuan_prefix_cache_hits"] >= 1 and values["yuan_prefix_cache_tokens_reused"] > 5
    assert values["yuan_prefix_cache_bytes"] > 0
    # the same answer as a server without the cache
    with running_server(create_app(model, tokenizer, "golden")) as url:
        plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": second}, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert json.dumps(reply["usage"]) == json.dumps(plain["usage"])


def test_running_batch_uses_the_cache_for_every_request(golden):
    eod = golden.config.eod_token_id
    cache = PrefixCache(10**9, (eod,))

    class Ids:  # RunningBatch streams text: a tokenizer that writes ids
        eod_id = eod

        def decode(self, ids):
            return " ".join(map(str, ids))

    first = tokens(19, 14)
    batch = RunningBatch(golden, Ids(), cache)
    request = Request(first, GREEDY)
    batch.add([request])
    while batch.requests:
        batch.step()
    again = RunningBatch(golden, Ids(), cache)
    follow = [Request(first + request.output_ids[:-1] + tokens(20, 3), GREEDY), Request(tokens(21, 5), GREEDY)]
    again.add(follow)
    while again.requests:
        again.step()
    assert cache.stats()["tokens_reused"] >= len(first)
    plain = RunningBatch(golden, Ids())
    same = [Request(r.prompt_ids, GREEDY) for r in follow]
    plain.add(same)
    while plain.requests:
        plain.step()
    assert [r.output_ids for r in follow] == [r.output_ids for r in same]
