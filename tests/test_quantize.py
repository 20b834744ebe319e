"""Quantized weights: the official AutoGPTQ folders reproduce their golden outputs, kept packed;
`yuan quantize` folders load in every command; the kernels agree with the pure-PyTorch path."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SHARED
from yuanmoe import from_pretrained, generate
from yuanmoe.config import ConfigError
from yuanmoe.convert import CheckpointError
from yuanmoe.quant import modules as quant_modules
from yuanmoe.quant.modules import QuantExperts, QuantLinear

GPTQ = {bits: SHARED / "yuan" / "golden" / f"tiny-c-gptq-int{bits}" for bits in (4, 8)}


@pytest.fixture(scope="module", params=[(4, False), (8, False), (4, True), (8, True)],
                ids=["int4", "int8", "int4-relaid", "int8-relaid"])
def gptq(request, tmp_path_factory):
    """An official AutoGPTQ folder loaded directly, or after `yuan quantize` re-laid it out for
    memory-mapped loading (values kept)."""
    from yuanmoe.cli import main

    bits, relaid = request.param
    folder = loaded = GPTQ[bits]
    if relaid:
        loaded = tmp_path_factory.mktemp("relaid") / folder.name
        assert main(["quantize", str(folder), str(loaded)]) == 0
    # float activations: the kernels' exact mode (the default int8 mode is checked against it below)
    return folder, load_file(folder / "golden.safetensors"), from_pretrained(loaded, dtype=torch.float32,
                                                                             activations="float")


@pytest.fixture(params=[True, False], ids=["kernels", "pure-pytorch"])
def kernels(request, monkeypatch):
    monkeypatch.setattr(quant_modules, "KERNELS", request.param)


@torch.inference_mode()
def test_gptq_folder_reproduces_official_logits_and_greedy_tokens(gptq, kernels):
    _, golden, model = gptq
    assert (model(golden["input_ids"]).logits - golden["logits"]).abs().max() < 1e-3
    prompt, want = golden["gen_prompt"], golden["gen_tokens"]
    out = generate(model, prompt, max_new_tokens=want.shape[1], do_sample=False)
    assert torch.equal(out[:, prompt.shape[1]:], want)


def test_gptq_weights_stay_packed(gptq):
    folder, _, model = gptq
    layer = model.layers[0]
    assert all(isinstance(getattr(layer.self_attn, p), QuantLinear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(layer.mlp.experts, QuantExperts)
    # The integer buffers hold exactly the bytes of the file's qweights: repacked, not dequantized
    # (but for the routers' small matrices, which the routers read in fp32).
    file = load_file(next(folder.glob("gptq_model-*.safetensors")))
    packed = sum(t.nbytes for k, t in file.items() if k.endswith(".qweight") and ".mlp.gate." not in k)
    held = sum(t.nbytes for t in model.buffers() if not t.is_floating_point())
    assert held == packed
    floats = sum(t.numel() for n, t in model.state_dict().items()
                 if t.is_floating_point() and not n.endswith("scales_and_zeros"))
    bits = int(folder.name[-1])
    # The few unquantized tensors (embedding, norms, LFA, routers): not a float copy of the weights.
    assert floats < 0.15 * packed * 8 / bits


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_decoding_of_asymmetric_zero_points(bits):
    """AutoGPTQ's layout written by hand: codes packed along the input rows, zero points (stored
    minus one) packed along the outputs; decoding gives scales * (code - zero)."""
    from yuanmoe.quant.formats import QuantConfig, decode_gptq
    from yuanmoe.quant.packing import dequantize

    out, inp, group, per = 64, 64, 32, 32 // bits
    codes = torch.randint(0, 2**bits, (out, inp))
    zeros = torch.randint(1, 2**bits, (inp // group, out))
    scales = torch.rand(inp // group, out).half()
    qweight = torch.zeros(inp // per, out, dtype=torch.int64)
    for i in range(inp):
        qweight[i // per] |= codes[:, i] << (bits * (i % per))
    qzeros = torch.zeros(inp // group, out // per, dtype=torch.int64)
    for o in range(out):
        qzeros[:, o // per] |= (zeros[:, o] - 1) << (bits * (o % per))
    as_int32 = lambda t: (t - (t >= 2**31).long() * 2**32).to(torch.int32)  # noqa: E731
    tensors = {"x.qweight": as_int32(qweight), "x.qzeros": as_int32(qzeros), "x.scales": scales,
               "x.g_idx": torch.arange(inp, dtype=torch.int32) // group}
    got_codes, sz = decode_gptq(tensors, "x.", QuantConfig("gptq", bits, group, symmetric=False))
    assert torch.equal(got_codes.long(), codes)
    want = scales.float().t().repeat_interleave(group, 1) * (codes - zeros.t().repeat_interleave(group, 1))
    assert torch.allclose(dequantize(got_codes, sz, bits), want, atol=1e-6)


def test_gptq_folder_keeps_its_bits_through_yuan_quantize(tmp_path, capsys):
    from yuanmoe.cli import main

    assert main(["quantize", str(GPTQ[4]), str(tmp_path / "out"), "--bits", "8"]) == 2
    assert "an AutoGPTQ checkpoint of 4 bits in groups of 32; it keeps them" in capsys.readouterr().err


def _gptq_copy(tmp_path, source_bits, **changes):
    folder = tmp_path / "gptq"
    shutil.copytree(GPTQ[source_bits], folder)
    config = json.loads((folder / "quantize_config.json").read_text())
    config.update(changes)
    (folder / "quantize_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_other_bit_widths_are_refused_in_one_sentence(tmp_path, bits):
    with pytest.raises(ConfigError, match=f"holds {bits}-bit weights; only 4- and 8-bit"):
        from_pretrained(_gptq_copy(tmp_path, 4, bits=bits))


def test_gptq_act_order_with_a_permuted_g_idx_is_refused(tmp_path):
    folder = _gptq_copy(tmp_path, 4, desc_act=True)
    from_pretrained(folder)  # desc_act with the trivial g_idx is plain group order: loads
    file = next(folder.glob("gptq_model-*.safetensors"))
    tensors = load_file(file)
    name = "model.layers.1.self_attn.o_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    file.unlink()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_proj.g_idx: this GPTQ checkpoint uses desc_act"):
        from_pretrained(folder)


# ------------------------------------------------------------------------------ kernels
KERNEL_NAMES = ("scalar", "avx2", "avx512-vnni")


@pytest.fixture(params=KERNEL_NAMES)
def cpu_kernel(request, monkeypatch):
    """Each compiled kernel in turn (skipped where this CPU or build cannot run it)."""
    from yuanmoe.quant import kernels

    if request.param not in kernels.available():
        pytest.skip(f"this machine cannot run the {request.param} kernel ({', '.join(kernels.available())})")
    monkeypatch.setenv(kernels.KERNEL_ENV, request.param)
    kernels.selected.cache_clear()
    yield request.param
    kernels.selected.cache_clear()


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 mode sees it: each block of 32 values rounded to max|x| / 127 steps."""
    blocks = x.float().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).flatten(-2)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 0), (8, 32)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_computes_the_dequantized_weight(bits, group_size, symmetric, dtype, cpu_kernel):
    """Each instruction set's kernel, both activation modes, 1 to 9 rows (decode and the 4-row
    blocks of prefill), against the dequantized weight: float mode to fp32 rounding, int8 mode to
    fp32 rounding of the same product with the activations rounded as it rounds them."""
    from yuanmoe.quant.modules import unpack_codes
    from yuanmoe.quant.packing import dequantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192, bias=True)
    layer = QuantLinear.quantize(linear, bits, group_size, symmetric, dtype)
    weight = dequantize(unpack_codes(layer.qweight, bits), layer.scales_and_zeros, bits)
    if dtype == torch.float32:  # the error is half a step of each group (bf16 scales round further)
        assert (weight - linear.weight).abs().max() <= layer.scales_and_zeros[..., 0].max() * 0.51
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 128).to(dtype)
        for mode, seen in (("float", x.float()), ("int8", int8_rows(x))):
            layer.activations = mode
            want = seen @ weight.t() + layer.bias.float()
            got = layer(x).float()
            tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
            assert (got - want).abs().max() <= tol * want.abs().max(), (rows, mode)


@pytest.mark.parametrize("bits", [4, 8])
def test_experts_kernel_matches_the_pure_pytorch_experts(bits, cpu_kernel, monkeypatch):
    """All experts of a layer in one kernel call = one dequantized matmul per expert, with experts
    that get no row, one row and several."""
    torch.manual_seed(1)
    w1, w2 = torch.randn(4, 2 * 64, 96) * 0.1, torch.randn(4, 96, 64) * 0.1
    experts = QuantExperts.quantize(w1, w2, bits, 32, symmetric=False, dtype=torch.float32)
    experts.activations = "float"
    counts = torch.tensor([3, 0, 1, 5])
    x = torch.randn(int(counts.sum()), 96)
    got = experts(x, counts)
    monkeypatch.setattr(quant_modules, "KERNELS", False)
    want = experts(x, counts)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    monkeypatch.setattr(quant_modules, "KERNELS", True)
    experts.activations = "int8"  # within the activations' rounding (half a step of 1/127 per block)
    assert (experts(x, counts) - want).abs().max() <= 0.03 * want.abs().max()


def test_int8_activations_track_the_exact_model(quantized):
    """The default int8 mode on a whole quantized model: logits close to the exact float mode."""
    _, folder = quantized
    exact = from_pretrained(folder, dtype=torch.float32, activations="float")
    fast = from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, exact.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = exact(ids).logits, fast(ids).logits
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_kernel_choice_follows_the_cpu_and_refuses_what_it_cannot_run(monkeypatch):
    from yuanmoe.quant import kernels

    have = kernels.available()
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    kernels.selected.cache_clear()
    assert kernels.selected() == have[-1]  # the best this CPU runs
    assert kernels.selected() in kernels.describe()
    for name in have:
        monkeypatch.setenv(kernels.KERNEL_ENV, name)
        kernels.selected.cache_clear()
        assert kernels.selected() == name
    monkeypatch.setenv(kernels.KERNEL_ENV, "sse9")
    kernels.selected.cache_clear()
    with pytest.raises(ValueError, match="is not a kernel; use one of torch, scalar, avx2, avx512-vnni"):
        kernels.selected()
    kernels.selected.cache_clear()


def test_auto_dtype_is_bf16_only_on_native_bf16_hardware(monkeypatch):
    from yuanmoe import device

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert device.resolve_dtype("auto") == torch.float32
    assert device.resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert device.resolve_dtype("auto") == torch.bfloat16


def test_shapes_the_tiled_layout_cannot_hold_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"cannot be packed with group size 32: the tiled layout needs a multiple "
                                         r"of 16 outputs"):
        QuantLinear.quantize(torch.nn.Linear(64, 72), 4, 32)
    with pytest.raises(ValueError, match="group size 48 does not divide its 64 input columns"):
        QuantLinear.quantize(torch.nn.Linear(64, 128), 8, 48)


def test_a_folder_in_the_old_layout_names_the_fix(quantized, tmp_path):
    _, folder = quantized
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "quantize_config.json").read_text())
    del config["layout"]
    (old / "quantize_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="older yuanmoe, in a weight layout this version no longer reads; run "
                                          "`yuan quantize` again"):
        from_pretrained(old)


# ------------------------------------------------------------------------------ yuan quantize
@pytest.fixture(scope="module")
def float_checkpoint(bpe, tmp_path_factory):
    from yuanmoe import YuanForCausalLM, preset, save_pretrained

    torch.manual_seed(0)
    # the vocabulary padded to the tiled layout's 16 rows, as the released model's 135040 is
    config = preset("tiny", vocab_size=-(-bpe.vocab_size // 16) * 16, hidden_size=128, attention_projection_size=128,
                    ffn_hidden_size=128, eod_token_id=bpe.eod_id, sep_token_id=bpe.sep_id, pad_token_id=bpe.pad_id)
    return save_pretrained(YuanForCausalLM(config).eval(), tmp_path_factory.mktemp("float") / "tiny", tokenizer=bpe)


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def quantized(request, float_checkpoint):
    from yuanmoe.cli import main

    out = float_checkpoint.parent / f"q{request.param}"
    assert main(["quantize", str(float_checkpoint), str(out), "--bits", str(request.param),
                 "--group-size", "32" if request.param == 4 else "0"]) == 0
    return request.param, out


def test_quantized_folder_loads_packed_and_tracks_the_float_model(quantized, float_checkpoint):
    bits, folder = quantized
    model, reference = from_pretrained(folder), from_pretrained(float_checkpoint, dtype=torch.float32)
    attn = model.layers[0].self_attn
    assert model.dtype == torch.bfloat16
    assert (attn.q_proj.bits, attn.q_proj.group_size) == (bits, 32 if bits == 4 else 128)
    assert isinstance(attn.lf_gate.conv1, QuantLinear) and attn.lf_gate.conv1.bias is not None
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    assert isinstance(model.layers[1].mlp.experts, QuantExperts)
    assert type(model.layers[0].mlp.router.query) is torch.nn.Linear  # routers kept
    ids = torch.randint(3, 500, (2, 24))
    with torch.inference_mode():
        want, got = reference(ids).logits.float(), model(ids).logits.float()
    error = (got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()
    assert error < (0.15 if bits == 4 else 0.03)
    with pytest.raises(CheckpointError, match="already quantized; start from the unquantized checkpoint"):
        from yuanmoe.quant.convert import quantize_checkpoint
        quantize_checkpoint(folder, folder.parent / "again")


def test_head_kept_stays_tied_to_the_embedding(float_checkpoint, tmp_path):
    from yuanmoe.quant.convert import quantize_checkpoint

    model = from_pretrained(quantize_checkpoint(float_checkpoint, tmp_path / "q", 4, 32, head_bits=0))
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.layers[0].self_attn.q_proj, QuantLinear)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_quantized_folder_is_computed_from_the_mapped_files(quantized):
    _, folder = quantized
    model = from_pretrained(folder)
    shards = {str(f.resolve()) for f in folder.glob("*.safetensors")}
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in shards:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            regions.append((start, end))
    weights = [t for name, t in model.named_buffers() if name.endswith("qweight")]
    assert weights and all(any(a <= t.data_ptr() < b for a, b in regions) for t in weights)


def test_generate_and_chat_run_the_quantized_folder(quantized, capsys, monkeypatch):
    from yuanmoe.cli import main
    from yuanmoe.inference import SamplingParams, complete
    from yuanmoe.tokenizer import load_tokenizer

    bits, folder = quantized
    assert main(["generate", str(folder), "To be, or not", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    want = complete(from_pretrained(folder), load_tokenizer(folder), ["To be, or not"],
                    SamplingParams(max_new_tokens=6, temperature=0))[0]
    assert captured.out == want.text + "\n" and len(want.output_ids) > 0
    assert f"weights yuanmoe {bits}-bit" in captured.err
    answers = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(folder), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("yuan> ")
    assert main(["generate", str(folder), "To be", "--quantize", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_serve_and_eval_run_the_quantized_folder(quantized, float_checkpoint, tmp_path):
    from argparse import Namespace

    import httpx

    from conftest import running_server
    from yuanmoe.cli import main
    from yuanmoe.inference.commands import load
    from yuanmoe.serving import create_app

    _, folder = quantized
    model, tokenizer = load(Namespace(checkpoint=str(folder), device="cpu", dtype=None, quantize=None, activations="int8"))
    with running_server(create_app(model, tokenizer, "q")) as url:
        reply = httpx.post(url + "/v1/completions", json={"model": "q", "prompt": "To be", "max_tokens": 4}, timeout=30)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("length", "stop")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n")
    scores = []
    for ckpt in (float_checkpoint, folder):
        out = tmp_path / "ppl.json"
        assert main(["eval", "perplexity", str(ckpt), str(text), "--out", str(out), "--dtype", "bfloat16"]) == 0
        scores.append(json.loads(out.read_text())["results"]["perplexity"]["score"])
    assert scores[1] == pytest.approx(scores[0], rel=0.1)
