"""Sampling against numbers computed by hand: temperature, top-k, top-p and the repetition penalty
give exactly the distribution they should, and seeded draws follow softmax(logits / T)."""

from __future__ import annotations

import math

import pytest
import torch

from yuanmoe.inference.sampling import BatchSampler, SamplingParams

LOGITS = [2.0, 1.0, 0.5, -1.0]


def softmax(values: list[float]) -> list[float]:
    """By hand, with math.exp: the expectation must not come from the code under test."""
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def spy_on_multinomial(monkeypatch) -> list[torch.Tensor]:
    """Record every probability table torch.multinomial is handed (and still draw from it)."""
    seen = []
    multinomial = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.detach().clone())
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    return seen


def sampled_distribution(monkeypatch, params: SamplingParams, logits: list[float],
                         prompt: tuple[int, ...] = ()) -> tuple[list[float], int]:
    """The probabilities the sampler draws its token from (what it hands torch.multinomial), and the token."""
    seen = spy_on_multinomial(monkeypatch)
    sampler = BatchSampler([params], [list(prompt)], len(logits), torch.device("cpu"))
    token = sampler(torch.tensor([logits]))
    assert len(seen) == 1
    return seen[0].tolist(), int(token[0])


def assert_probs(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, abs=1e-6), f"token {i}: {got} != {want}"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(monkeypatch, temperature):
    got, _ = sampled_distribution(monkeypatch, SamplingParams(temperature=temperature, seed=0), LOGITS)
    assert_probs(got, softmax([v / temperature for v in LOGITS]))


def test_temperature_values_by_hand(monkeypatch):
    # T = 0.5: logits / T = [4, 2, 1, -2].
    got, _ = sampled_distribution(monkeypatch, SamplingParams(temperature=0.5, seed=0), LOGITS)
    z = math.exp(4) + math.exp(2) + math.exp(1) + math.exp(-2)
    assert_probs(got, [math.exp(4) / z, math.exp(2) / z, math.exp(1) / z, math.exp(-2) / z])
    assert got[0] == pytest.approx(0.8421, abs=1e-4)


def test_top_k_keeps_the_k_largest_and_renormalizes(monkeypatch):
    got, token = sampled_distribution(monkeypatch, SamplingParams(temperature=1.0, top_k=2, seed=0), LOGITS)
    z = math.exp(2.0) + math.exp(1.0)
    assert_probs(got, [math.exp(2.0) / z, math.exp(1.0) / z, 0.0, 0.0])
    assert token in (0, 1)


def test_top_k_applies_after_temperature(monkeypatch):
    got, _ = sampled_distribution(monkeypatch, SamplingParams(temperature=0.5, top_k=3, seed=0), LOGITS)
    z = math.exp(4.0) + math.exp(2.0) + math.exp(1.0)
    assert_probs(got, [math.exp(4.0) / z, math.exp(2.0) / z, math.exp(1.0) / z, 0.0])


@pytest.mark.parametrize("top_p, kept", [
    # softmax(LOGITS) = [0.6095, 0.2242, 0.1360, 0.0303]; mass before each token: 0, 0.6095, 0.8337, 0.9697.
    (0.5, 1),   # the first token alone reaches 0.5
    (1e-50, 1),  # rounds to 0 in float32: the most likely token still stays
    (0.8, 2),   # 0.6095 < 0.8, 0.8337 >= 0.8
    (0.9, 3),   # 0.8337 < 0.9, 0.9697 >= 0.9
    (1.0, 4),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(monkeypatch, top_p, kept):
    got, _ = sampled_distribution(monkeypatch, SamplingParams(temperature=1.0, top_p=top_p, seed=0), LOGITS)
    exps = [math.exp(v) for v in LOGITS[:kept]]
    assert_probs(got, [e / sum(exps) for e in exps] + [0.0] * (len(LOGITS) - kept))


def test_top_p_mass_is_measured_after_temperature(monkeypatch):
    # T = 2: softmax([1, 0.5, 0.25, -0.5]) = [0.4344, 0.2635, 0.2052, 0.0969]; before: 0, 0.434, 0.698, 0.903.
    # With p = 0.72 three tokens stay; without the temperature (T=1: before 0, 0.61, 0.83) only two would.
    got, _ = sampled_distribution(monkeypatch, SamplingParams(temperature=2.0, top_p=0.72, seed=0), LOGITS)
    exps = [math.exp(v / 2.0) for v in LOGITS[:3]]
    assert_probs(got, [e / sum(exps) for e in exps] + [0.0])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits(monkeypatch):
    # Tokens 0 (logit 2.0) and 3 (logit -1.0) are in the prompt; penalty 2: 2.0 -> 1.0, -1.0 -> -2.0.
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, seed=0)
    got, _ = sampled_distribution(monkeypatch, params, LOGITS, prompt=[0, 3])
    assert_probs(got, softmax([1.0, 1.0, 0.5, -2.0]))


def test_repetition_penalty_then_temperature_then_top_k(monkeypatch):
    params = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=4.0, seed=0)
    got, _ = sampled_distribution(monkeypatch, params, LOGITS, prompt=[0])
    # Penalized: [0.5, 1.0, 0.5, -1.0]; / T: [1, 2, 1, -2]; top-2 keeps token 1 and the first-sorted tie.
    assert got[1] == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(1)), abs=1e-6)
    assert got[3] == 0.0
    assert got[0] + got[2] == pytest.approx(math.exp(1) / (math.exp(2) + math.exp(1)), abs=1e-6)
    assert min(got[0], got[2]) == 0.0


def test_greedy_repetition_penalty_changes_the_choice_and_counts_generated_tokens():
    # Greedy with penalty 1.5: token 0 is seen (2.0 -> 1.333 < 1.9), so token 1 wins; then token 1
    # is seen too (1.9 -> 1.267), so token 0 (1.333) wins the next step.
    logits = torch.tensor([[2.0, 1.9, 1.0, -3.0]])
    sampler = BatchSampler([SamplingParams(temperature=0, repetition_penalty=1.5)], [[0]], 4, torch.device("cpu"))
    assert sampler(logits).tolist() == [1]
    assert sampler(logits).tolist() == [0]
    # A negative seen logit moves away from zero: -1.0 * 1.5 = -1.5 < -1.2.
    negative = torch.tensor([[-1.0, -1.2, -5.0, -5.0]])
    sampler = BatchSampler([SamplingParams(temperature=0, repetition_penalty=1.5)], [[0]], 4, torch.device("cpu"))
    assert sampler(negative).tolist() == [1]
    # Without a penalty the largest logit wins.
    plain = BatchSampler([SamplingParams(temperature=0)], [[0]], 4, torch.device("cpu"))
    assert plain(logits).tolist() == [0] and plain(negative).tolist() == [0]


def test_rows_of_a_batch_use_their_own_settings(monkeypatch):
    seen = spy_on_multinomial(monkeypatch)
    params = [SamplingParams(temperature=0.5, seed=0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, top_k=1, seed=1)]
    sampler = BatchSampler(params, [[], [], []], 4, torch.device("cpu"))
    tokens = sampler(torch.tensor([LOGITS, [0.0, 3.0, 1.0, 2.0], LOGITS]))
    assert tokens[1] == 1 and tokens[2] == 0
    assert len(seen) == 2  # the greedy row draws nothing
    assert_probs(seen[0].tolist(), softmax([v / 0.5 for v in LOGITS]))
    assert_probs(seen[1].tolist(), [1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_seeded_draws_follow_softmax_of_logits_over_temperature(temperature):
    """4000 draws: each frequency is within 0.03 (> 4 standard errors) of softmax(logits / T) by hand.
    Ignoring T (T = 1) moves the first token's probability by more than 0.15 either way."""
    logits = [1.0, 0.0, -1.0, 0.5]
    want = softmax([v / temperature for v in logits])
    ignored = softmax(logits)
    assert max(abs(a - b) for a, b in zip(want, ignored)) > 0.1  # the bound below tells them apart
    draws = 4000
    sampler = BatchSampler([SamplingParams(temperature=temperature, seed=1234)], [[]], 4, torch.device("cpu"))
    row = torch.tensor([logits])
    counts = [0] * 4
    for _ in range(draws):
        counts[int(sampler(row)[0])] += 1
    freq = [c / draws for c in counts]
    for i, (f, w) in enumerate(zip(freq, want)):
        assert abs(f - w) < 0.03, f"token {i}: frequency {f:.4f}, softmax(logits / {temperature}) {w:.4f}"


def test_same_seed_same_draws_other_seed_other_draws():
    row = torch.tensor([[0.0] * 16])

    def draws(seed):
        sampler = BatchSampler([SamplingParams(temperature=1.0, seed=seed)], [[]], 16, torch.device("cpu"))
        return [int(sampler(row)[0]) for _ in range(20)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
