"""Quantized weights: the official AutoGPTQ folders reproduce their golden outputs, kept packed;
`yuan quantize` folders load in every command; the kernels agree with the pure-PyTorch path."""

import json
import math
import shutil

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


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def gptq(request):
    folder = GPTQ[request.param]
    return folder, load_file(folder / "golden.safetensors"), from_pretrained(folder, dtype=torch.float32)


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
