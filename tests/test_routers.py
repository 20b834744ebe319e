import math

import pytest
import torch

from yuanmoe import ConfigError, YuanForCausalLM, preset
from yuanmoe.model.moe import MoE
from yuanmoe.routers import (RouterOutput, build_router, coselection_kl, coselection_matrix, load_balancing_loss,
                             router_z_loss, routing_stats, shared_expert_config, update_expert_bias)

TOKEN_CHOICE = ("attention", "linear", "noisy_topk")


def initialized(moe: MoE) -> MoE:
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)  # MoE leaves its expert weights to the model's initializer
    return moe


def moe_for(router: str, **overrides) -> MoE:
    return initialized(MoE(preset("tiny", router=router, **overrides)))


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@pytest.mark.parametrize("training", [True, False])
def test_token_choice_router_contract(router, training):
    moe = moe_for(router).train(training)
    x = torch.randn(3, 10, 64, requires_grad=True)
    out, routing = moe(x)
    assert out.shape == x.shape
    assert routing.experts.shape == routing.weights.shape == (30, 2)
    assert routing.probs.shape == routing.logits.shape == (30, 8)
    assert (routing.experts[:, 0] != routing.experts[:, 1]).all()
    assert (routing.weights >= 0).all()
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(30))
    assert int(routing.tokens_per_expert.sum()) == 60
    out.backward(torch.randn_like(out))
    for name, p in moe.router.named_parameters():
        if name == "noise.weight" and not training:
            continue  # the noise is off in eval, so it gets no gradient there
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_top2_routing_mixes_two_experts_by_their_renormalized_probabilities(router):
    """Top-2, not top-1: every token gets its two most probable experts, both weights > 0 and equal
    to those probabilities renormalized, and the layer's output is the weighted sum of the two
    experts' SwiGLU outputs, computed here expert by expert."""
    moe = moe_for(router, top_k=2, norm_topk_prob=True).eval()
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        out, routing = moe(x)
    tokens = x.reshape(-1, 64)
    assert routing.experts.shape == routing.weights.shape == (12, 2)
    assert (routing.experts[:, 0] != routing.experts[:, 1]).all()
    top2 = routing.probs.topk(2, dim=-1)
    assert torch.equal(routing.experts.sort(-1).values, top2.indices.sort(-1).values)
    assert (routing.weights > 1e-3).all(), "a second expert with weight 0 is top-1 routing"
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(12))
    chosen = routing.probs.gather(-1, routing.experts)
    torch.testing.assert_close(routing.weights, chosen / chosen.sum(-1, keepdim=True))

    w1, w2 = moe.experts.w1.detach(), moe.experts.w2.detach()
    expected = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for slot in range(2):
            e = int(routing.experts[t, slot])
            a, b = (w1[e] @ tokens[t]).chunk(2)
            expected[t] += float(routing.weights[t, slot]) * (w2[e] @ (torch.nn.functional.silu(a) * b))
    torch.testing.assert_close(out.reshape(-1, 64), expected, atol=1e-5, rtol=1e-4)
    # Each expert's share matters: the output is not the first expert's alone.
    first_only = torch.stack([
        w2[int(e)] @ (torch.nn.functional.silu((w1[int(e)] @ tok).chunk(2)[0]) * (w1[int(e)] @ tok).chunk(2)[1])
        for e, tok in zip(routing.experts[:, 0], tokens)])
    assert (out.reshape(-1, 64) - first_only).abs().max() > 1e-3


def test_routers_decide_in_fp32_under_bf16_autocast():
    moe = moe_for("attention")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, routing = moe(torch.randn(8, 64))
    assert routing.logits.dtype == routing.weights.dtype == torch.float32


def test_noisy_topk_is_deterministic_in_eval_and_explores_in_training():
    router = build_router(preset("tiny", router="noisy_topk"))
    x = torch.randn(64, 64)
    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first.experts, second.experts) and torch.equal(first.logits, second.logits)
    torch.testing.assert_close(first.logits, x @ router.gate.weight.t())
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_expert_choice_respects_capacity_and_counts_dropped_tokens():
    moe = moe_for("expert_choice", capacity_factor=1.0).train()
    x = torch.randn(40, 64, requires_grad=True)
    out, routing = moe(x)
    capacity = math.ceil(40 * 2 * 1.0 / 8)
    assert routing.tokens_per_expert.tolist() == [capacity] * 8
    token_index, expert_index, weight = routing.assignments()
    pairs = set(zip(token_index.tolist(), expert_index.tolist()))
    assert len(pairs) == token_index.numel()  # an expert takes a token at most once
    torch.testing.assert_close(weight, routing.probs[token_index, expert_index])
    served = set(token_index.tolist())
    assert routing_stats([routing])["layer0/dropped_fraction"] == pytest.approx(1 - len(served) / 40)
    # Dropped tokens get nothing from the experts.
    dropped = sorted(set(range(40)) - served)
    if dropped:
        assert out[dropped].abs().max() == 0
    out.backward(torch.randn_like(out))
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_expert_choice_falls_back_to_causal_token_choice_in_eval():
    model = YuanForCausalLM(preset("tiny", router="expert_choice")).eval()
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :6]).logits
        routing = model(ids, output_router=True).router_outputs[0]
    torch.testing.assert_close(prefix, full[:, :6], atol=1e-5, rtol=1e-4)
    assert routing.experts.shape == (12, 2)


def test_shared_variant_is_the_papers_two_shared_plus_top2_of_14_with_matched_parameters():
    base = preset("tiny", router="linear")
    shared = shared_expert_config(base)
    assert (shared.num_shared_experts, shared.num_experts, shared.top_k) == (2, 14, 2)
    assert shared.ffn_hidden_size == base.ffn_hidden_size // 2
    count = lambda cfg: sum(p.numel() for p in YuanForCausalLM(cfg).parameters())
    assert abs(count(shared) - count(base)) / count(base) < 0.01


def test_shared_experts_serve_every_token():
    moe = initialized(MoE(shared_expert_config(preset("tiny"))))
    with torch.no_grad():
        moe.experts.w2.zero_()  # silence the routed experts: what remains is the shared part
    x = torch.randn(16, 64)
    out, _ = moe(x)
    torch.testing.assert_close(out, moe.shared_experts(x))
    assert (out.abs().sum(-1) > 0).all()


def test_load_balancing_loss_on_known_inputs():
    uniform = torch.full((8, 4), 0.25)
    spread = torch.arange(4).repeat(2)  # every expert gets 2 of the 8 copies
    assert load_balancing_loss(uniform, spread).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1.0
    assert load_balancing_loss(collapsed, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(4.0)


def test_z_loss_on_known_inputs():
    assert router_z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert router_z_loss(logits).item() == pytest.approx(math.log(4.0) ** 2)


def test_balancing_coefficients_reach_the_training_loss():
    ids = torch.randint(0, 500, (2, 16))
    torch.manual_seed(0)
    plain = YuanForCausalLM(preset("tiny"))(ids, labels=ids, output_router=True)
    torch.manual_seed(0)
    balanced = YuanForCausalLM(preset("tiny", aux_loss_coef=0.1, z_loss_coef=0.01))(ids, labels=ids,
                                                                                   output_router=True)
    assert plain.aux_loss.item() == 0
    expected = sum(0.1 * load_balancing_loss(r.probs, r.experts.flatten()) + 0.01 * router_z_loss(r.logits)
                   for r in balanced.router_outputs)
    torch.testing.assert_close(balanced.aux_loss, expected)
    torch.testing.assert_close(balanced.loss - balanced.aux_loss, plain.loss)


def test_expert_bias_steers_selection_but_not_weights_and_updates_from_load():
    router = build_router(preset("tiny", router="linear", bias_update_rate=0.01)).train()
    x = torch.randn(32, 64)
    with torch.no_grad():
        router.expert_bias[3] = 10.0
    routing = router(x)
    assert (routing.experts == 3).any(dim=-1).all()
    chosen = routing.probs.gather(-1, routing.experts)
    torch.testing.assert_close(routing.weights, chosen / chosen.sum(-1, keepdim=True))
    load = routing.tokens_per_expert.float()
    before = router.expert_bias.clone()
    update_expert_bias(router)
    step = router.expert_bias - before
    assert step[3].item() == pytest.approx(-0.01, rel=1e-4)  # overloaded expert goes down
    torch.testing.assert_close(step[load < load.mean()], torch.full_like(step[load < load.mean()], 0.01))
    assert not router.expert_bias.requires_grad
    assert "expert_bias" in router.state_dict() and "observed_load" not in router.state_dict()
    assert torch.equal(router.observed_load, torch.zeros(8))


def hand_built_routing() -> RouterOutput:
    # 4 tokens, 3 experts, top-2: {0,1}, {0,1}, {1,2}, {0,2}
    experts = torch.tensor([[0, 1], [1, 0], [1, 2], [0, 2]])
    probs = torch.full((4, 3), 1 / 3)
    return RouterOutput(torch.full((4, 2), 0.5), experts, probs, probs.log(), torch.zeros(()))


def test_coselection_matrix_on_hand_built_routing():
    expected = torch.tensor([[3, 2, 1],
                             [2, 3, 1],
                             [1, 1, 2]])
    assert torch.equal(coselection_matrix(hand_built_routing()), expected)


def test_routing_stats_on_hand_built_routing():
    stats = routing_stats([hand_built_routing(), hand_built_routing()])
    assert stats["layer0/tokens_per_expert"] == [3, 3, 2]
    mean = 8 / 3
    assert stats["layer1/max_over_mean"] == pytest.approx(3 / mean)
    std = math.sqrt(((3 - mean) ** 2 * 2 + (2 - mean) ** 2) / 3)
    assert stats["mean/load_cv"] == pytest.approx(std / mean)
    assert stats["mean/entropy"] == pytest.approx(math.log(3))
    assert stats["mean/dropped_fraction"] == 0.0


def test_config_names_every_router_and_rejects_a_bias_for_expert_choice():
    for router in ("attention", "linear", "noisy_topk", "expert_choice"):
        assert type(build_router(preset("tiny", router=router))).__name__.lower().startswith(router.replace("_", ""))
    with pytest.raises(ConfigError, match="bias_update_rate"):
        preset("tiny", router="expert_choice", bias_update_rate=0.01)


def test_router_init_scale_scales_only_the_router_weights():
    torch.manual_seed(3)
    base = YuanForCausalLM(preset("tiny"))
    torch.manual_seed(3)
    scaled = YuanForCausalLM(preset("tiny", router_init_scale=10.0))
    for (name, p), q in zip(base.named_parameters(), scaled.parameters()):
        factor = 10.0 if ".router." in name else 1.0
        torch.testing.assert_close(q, p * factor, msg=name)
    assert any(".router." in name for name, _ in base.named_parameters())


def test_attention_router_temperature_divides_q_k():
    router = build_router(preset("tiny", router="attention", router_temperature=4.0))
    x = torch.randn(5, 64)
    q, k, v = x @ router.query.weight.T, x @ router.key.weight.T, x @ router.value.weight.T
    for temperature in (4.0, 1.0):
        router.temperature = temperature
        attn = torch.softmax(q[:, :, None] * k[:, None, :] / temperature, dim=-1)
        torch.testing.assert_close(router.scores(x), (attn * v[:, None, :]).sum(-1))
    router.temperature = 4.0
    assert not torch.allclose(router.scores(x), (torch.softmax(q[:, :, None] * k[:, None, :], -1) * v[:, None]).sum(-1))


@pytest.mark.parametrize("fp32", [True, False])
def test_router_scores_in_fp32_or_in_the_autocast_dtype(fp32):
    router = build_router(preset("tiny", router="linear", router_fp32=fp32))
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.3)
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x).logits
    full = x @ router.gate.weight.T
    low = (x.bfloat16() @ router.gate.weight.bfloat16().T).float()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, full if fp32 else low, rtol=0, atol=0 if not fp32 else 1e-6)
    assert not torch.equal(full, low)


def test_coselection_kl_is_zero_for_random_pairs_and_log3_for_fixed_pairs():
    def counts(pairs):  # pairs of experts, one per token
        mask = torch.zeros(len(pairs), 4)
        for t, (i, j) in enumerate(pairs):
            mask[t, i] = mask[t, j] = 1
        return (mask.T @ mask).long()

    every_pair = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert coselection_kl(counts(every_pair)) == pytest.approx(0.0, abs=1e-12)
    # Equal loads, but only the pairs (0, 1) and (2, 3): half of each of 2 of the 6 equally likely pairs.
    assert coselection_kl(counts([(0, 1), (2, 3)] * 5)) == pytest.approx(math.log(3))
    assert coselection_kl(torch.zeros(4, 4, dtype=torch.long)) == 0.0
