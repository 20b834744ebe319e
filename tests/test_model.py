"""The core model: causality, cached decoding, packed documents, the grouped MoE and the routers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from yuanmoe import ConfigError, YuanConfig, YuanForCausalLM, preset
from yuanmoe.model.moe import GroupedExperts, _padded_bmm, grouped_matmul
from yuanmoe.routers import AttentionRouter


def tiny_model(**overrides) -> YuanForCausalLM:
    torch.manual_seed(0)
    return YuanForCausalLM(preset("tiny", **overrides)).eval()


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 24))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("prompt_len", [1, 2, 7])
def test_cached_decode_matches_full_forward(prompt_len):
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :prompt_len], cache=cache).logits]
        for t in range(prompt_len, 20):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5


def test_cached_chunks_of_several_tokens_match_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 15))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(1, 15)
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 4), (4, 5), (5, 11), (11, 15))]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def _packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def test_packed_document_logits_equal_the_document_alone():
    model = tiny_model()
    docs = [torch.randint(0, 511, (n,)) for n in (7, 1, 12)]
    packed = torch.cat(docs).unsqueeze(0)
    with torch.no_grad():
        out = model(packed, position_ids=_packed_positions([7, 1, 12])).logits[0]
        start = 0
        for doc in docs:
            alone = model(doc.unsqueeze(0)).logits[0]
            assert (out[start:start + len(doc)] - alone).abs().max().item() <= 1e-5
            start += len(doc)


def test_packed_prefill_then_decode_continues_only_the_last_document():
    model = tiny_model()
    first, second = torch.randint(0, 511, (1, 6)), torch.randint(0, 511, (1, 9))
    packed = torch.cat([first, second[:, :5]], dim=1)
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(packed, position_ids=_packed_positions([6, 5]), cache=cache)
        steps = [model(second[:, t:t + 1], cache=cache).logits for t in range(5, 9)]
        alone = model(second).logits[:, 5:]
    assert (torch.cat(steps, dim=1) - alone).abs().max().item() <= 1e-5


def test_left_padded_row_decodes_as_if_alone():
    model = tiny_model()
    short, long = torch.randint(0, 511, (4,)), torch.randint(0, 511, (9,))
    pad = 5
    ids = torch.stack([torch.cat([torch.full((pad,), 509), short]), long])
    positions = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(4)]), torch.arange(9)])
    with torch.no_grad():
        cache = model.new_cache(2, 12)
        batched = [model(ids, position_ids=positions, cache=cache).logits[0, -1]]
        nxt = torch.randint(0, 511, (2, 3))
        for t in range(3):
            batched.append(model(nxt[:, t:t + 1], cache=cache).logits[0, -1])
        alone_ids = torch.cat([short, nxt[0]]).unsqueeze(0)
        alone = model(alone_ids).logits[0, 3:]
    assert (torch.stack(batched) - alone).abs().max().item() <= 1e-5


def _loop_moe_reference(x, w1, w2, experts, weights):
    """The official computation: one expert at a time over the tokens routed to it."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(experts == e)
        if tok.numel() == 0:
            continue
        a, b = (x[tok] @ w1[e].T).chunk(2, dim=-1)
        out = out.index_add(0, tok, (F.silu(a) * b) @ w2[e].T * weights[tok, slot, None])
    return out


def test_grouped_moe_matches_per_expert_loop_outputs_and_gradients():
    model = tiny_model()
    moe = model.layers[0].mlp.train()
    x = torch.randn(50, 64, requires_grad=True)
    out, routing = moe(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = (out.detach(), x.grad.clone(), moe.experts.w1.grad.clone(), moe.experts.w2.grad.clone(),
           moe.router.query.weight.grad.clone())

    x_ref = x.detach().clone().requires_grad_()
    w1 = moe.experts.w1.detach().clone().requires_grad_()
    w2 = moe.experts.w2.detach().clone().requires_grad_()
    moe.zero_grad()
    routing = moe.router(x_ref)
    ref = _loop_moe_reference(x_ref, w1, w2, routing.experts, routing.weights)
    ref.backward(grad)
    want = (ref.detach(), x_ref.grad, w1.grad, w2.grad, moe.router.query.weight.grad)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


def test_grouped_matmul_fallback_matches_kernel_including_empty_experts():
    x = torch.randn(30, 16)
    w = torch.randn(5, 24, 16)
    counts = torch.tensor([7, 0, 13, 10, 0])
    expected = torch.cat([x[s:s + n] @ w[e].T for e, (s, n) in
                          enumerate(zip((counts.cumsum(0) - counts).tolist(), counts.tolist()))])
    assert torch.allclose(grouped_matmul(x, w, counts), expected, atol=1e-5)
    assert torch.allclose(_padded_bmm(x, w, counts), expected, atol=1e-5)


def test_attention_router_on_a_hand_computed_three_expert_example():
    router = AttentionRouter(hidden_size=2, num_experts=3, top_k=2)
    with torch.no_grad():
        router.query.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        router.key.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, -1.0], [1.0, 0.0]]))
        router.value.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0]])
    q, k, v = [1.0, 2.0, 3.0], [0.5, -2.0, 1.0], [5.0, 2.0, -1.0]
    p = []
    for i in range(3):
        row = [math.exp(q[i] * k[j]) for j in range(3)]
        p.append(sum(r * v[j] for j, r in enumerate(row)) / sum(row))
    probs = [math.exp(s) for s in p]
    probs = [s / sum(probs) for s in probs]
    order = sorted(range(3), key=lambda i: -probs[i])[:2]
    out = router(x)
    assert torch.allclose(out.logits[0], torch.tensor(p), atol=1e-6)
    assert out.experts[0].tolist() == order
    top = torch.tensor([probs[i] for i in order])
    assert torch.allclose(out.weights[0], top / top.sum(), atol=1e-6)


def test_dense_model_without_experts_trains():
    model = tiny_model(num_experts=0).train()
    ids = torch.randint(0, 512, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.layers[0].mlp.w1.weight.grad.abs().sum() > 0


def test_bf16_forward_runs_and_is_close_to_fp32():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        out = model.to(torch.bfloat16)(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_labels_give_the_shifted_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 10))
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_out_of_range_token_id_is_a_clear_error():
    with pytest.raises(ValueError, match="token id 600 is out of range"):
        tiny_model()(torch.tensor([[1, 600]]))


def test_build_on_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = YuanForCausalLM(preset("yuan2-m32"))
    assert all(p.is_meta for p in model.parameters())


def test_config_json_round_trip(tmp_path):
    cfg = preset("small", router="linear", num_shared_experts=1, rope_base=40890.0)
    cfg.to_json(tmp_path / "config.json")
    assert YuanConfig.from_json(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=3), "num_heads \\(3\\) must divide attention_projection_size"),
    (dict(top_k=9), "top_k \\(9\\) must be between 1 and num_experts \\(8\\)"),
    (dict(router="magic"), "unknown router 'magic'"),
    (dict(eod_token_id=512), "eod_token_id \\(512\\) is outside the vocabulary"),
    (dict(rotary_dim=48), "rotary_dim \\(48\\) must be even and at most head_dim \\(32\\)"),
])
def test_invalid_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny", **overrides)


def test_unknown_config_field_is_rejected():
    with pytest.raises(ConfigError, match="unknown field\\(s\\) hiden_size"):
        YuanConfig.from_dict({"hiden_size": 10})


def test_yuan_info_reports_the_paper_sizes():
    result = subprocess.run([sys.executable, "-m", "yuanmoe.cli", "info", "--preset", "yuan2-m32", "--json"],
                            capture_output=True, text=True, check=True)
    stats = json.loads(result.stdout)
    assert abs(stats["total_params"] / 40e9 - 1) < 0.03
    assert abs(stats["active_params"] / 3.7e9 - 1) < 0.03
    assert abs(stats["forward_gflops_per_token"] / 7.4 - 1) < 0.03


def test_grouped_experts_hold_stacked_weights():
    experts = GroupedExperts(4, 8, 6)
    assert experts.w1.shape == (4, 12, 8) and experts.w2.shape == (4, 8, 6)


def test_experts_run_in_the_autocast_dtype():
    moe = tiny_model().layers[0].mlp
    x = torch.randn(20, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe.experts(x, torch.tensor([5, 0, 5, 0, 5, 0, 5, 0]))
    assert out.dtype == torch.bfloat16


def test_logits_to_keep_returns_the_last_positions_only():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        full, last = model(ids).logits, model(ids, logits_to_keep=2).logits
    assert last.shape == (2, 2, 512) and torch.allclose(last, full[:, -2:], atol=1e-6)


def test_localized_filter_on_a_hand_looped_example():
    """f[t] = RMSNorm(c2[t] + x[t]) with c1[t] = A0 x[t-1] + A1 x[t] + b1 and c2[t] = B0 c1[t-1] + B1 c1[t] + b2,
    computed token by token here (nothing before the first token): both convolutions must be there."""
    from yuanmoe.model.attention import LocalizedFilter

    torch.manual_seed(0)
    h = 6
    lf = LocalizedFilter(h, eps=1e-6)
    x = torch.randn(1, 5, h)
    with torch.no_grad():
        got, state = lf(x, torch.tensor([[False, True, True, True, True]]))
    a0, a1 = lf.conv1.weight[:, :h], lf.conv1.weight[:, h:]
    b0, b1 = lf.conv2.weight[:, : h // 2], lf.conv2.weight[:, h // 2:]
    want, c1_prev = [], torch.zeros(h // 2)
    with torch.no_grad():
        for t in range(5):
            x_prev = x[0, t - 1] if t > 0 else torch.zeros(h)
            c1 = a0 @ x_prev + a1 @ x[0, t] + lf.conv1.bias
            c2 = b0 @ c1_prev + b1 @ c1 + lf.conv2.bias
            y = c2 + x[0, t]
            want.append(lf.norm.weight * y / torch.sqrt(y.pow(2).mean() + 1e-6))
            c1_prev = c1
    torch.testing.assert_close(got[0], torch.stack(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[0], x[0, -2:])  # the next token's filter inputs
    assert (got[0] - lf.norm(x)[0]).abs().max() > 1e-2  # the filter is not the identity here


def test_positions_matter_only_relative_to_each_other():
    """RoPE: shifting every position by the same amount keeps the logits; moving one token away
    from the others changes them (without RoPE, positions past the first would not matter)."""
    model = tiny_model(initializer_range=0.2)
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    base = torch.arange(1, 7)[None]
    with torch.no_grad():
        logits = model(ids, position_ids=base).logits
        shifted = model(ids, position_ids=base + 11).logits
        gap = model(ids, position_ids=torch.tensor([[1, 2, 3, 4, 5, 16]])).logits
    torch.testing.assert_close(shifted, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gap[:, :5], logits[:, :5], atol=1e-5, rtol=1e-5)
    assert (gap[:, 5] - logits[:, 5]).abs().max() > 1e-2
