"""Class 6 of the bad-input classes: any AutoGPTQ folder that can be decoded loads, whatever its widths.

Folders are written here in the official AutoGPTQ layout (as README of ../shared describes it, with
AutoGPTQ's habit of packing columns and zero points in whole blocks of 32) from random tiny models of
drawn widths, groups and bits. Each must load and compute exactly what its dequantized weights
compute, in the fast kernels where the tiles can hold a layer and in the pure-PyTorch path elsewhere;
only a layer AutoGPTQ itself cut short is refused, in one sentence that names it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from yuanmoe import YuanForCausalLM, from_pretrained, preset
from yuanmoe.convert import CheckpointError
from yuanmoe.convert.official import config_to_official, native_to_official
from yuanmoe.quant import modules as quant_modules
from yuanmoe.quant.formats import _GPTQ_LINEAR
from yuanmoe.quant.modules import QuantExperts, QuantLinear

def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """AutoGPTQ's packing: whole blocks of 32/bits values along `dim`, low bits first; a partial
    last block is dropped, as AutoGPTQ's pack() does (its loops stop at `size // 32 * bits`)."""
    per = 32 // bits
    values = values.movedim(dim, 0).to(torch.int64)
    blocks = values.shape[0] // 32 * bits
    packed = torch.zeros(blocks, *values.shape[1:], dtype=torch.int64)
    for j in range(per):
        packed |= values[j: blocks * per: per] << (bits * j)
    return (packed - (packed >= 2**31) * 2**32).to(torch.int32).movedim(0, dim).contiguous()


def gptq_linear(w: torch.Tensor, bits: int, group: int, sym: bool, generator: torch.Generator):
    """One official [out, in] weight -> (AutoGPTQ tensors, the weight they decode to)."""
    out, inp = w.shape
    group = group or inp
    groups = math.ceil(inp / group)
    top, mid = 2**bits - 1, 2 ** (bits - 1)
    g_idx = torch.arange(inp) // group
    scale = torch.stack([w[:, g * group:(g + 1) * group].abs().amax(1) for g in range(groups)]) / (mid - 1)
    scale = scale.clamp(min=1e-4)
    zero = (torch.full((groups, out), mid) if sym else torch.randint(1, top, (groups, out), generator=generator))
    codes = (w.t() / scale[g_idx] + zero[g_idx]).round().clamp(0, top).to(torch.int64)  # [in, out]
    decoded = ((codes - zero[g_idx]) * scale.half().float()[g_idx]).t()
    tensors = {"qweight": pack_int32(codes, bits, 0), "qzeros": pack_int32(zero - 1, bits, 1),
               "scales": scale.half(), "g_idx": g_idx.to(torch.int32)}
    return tensors, decoded


def write_gptq(folder, model: YuanForCausalLM, bits: int, group: int, sym: bool, seed: int = 0) -> YuanForCausalLM:
    """Write `model` as an AutoGPTQ folder; returns the float model of the weights the folder decodes to."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    official = native_to_official({k: v.float() for k, v in model.state_dict().items()}, config)
    stored, decoded_state = {}, {}
    for name, t in official.items():
        if _GPTQ_LINEAR.fullmatch(name):
            parts, decoded = gptq_linear(t, bits, group, sym, generator)
            stem = name[: -len("weight")]
            stored.update({stem + k: v for k, v in parts.items()})
            decoded_state[name] = decoded
        else:
            stored[name] = t.half()
            decoded_state[name] = t.half().float()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_to_official(config)))
    (folder / "quantize_config.json").write_text(json.dumps({
        "bits": bits, "group_size": group or -1, "desc_act": False, "sym": sym, "quant_method": "gptq",
        "model_file_base_name": "gptq_model"}))
    save_file(stored, folder / "gptq_model.safetensors", metadata={"format": "pt"})
    float_folder = folder.parent / (folder.name + "-float")
    float_folder.mkdir()
    (float_folder / "config.json").write_text(json.dumps(config_to_official(config)))
    save_file({k: v.contiguous() for k, v in decoded_state.items()}, float_folder / "model.safetensors",
              metadata={"format": "pt"})
    return from_pretrained(float_folder, dtype=torch.float32)


def tiny(hidden: int, ffn: int, experts: int, projection: int) -> YuanForCausalLM:
    torch.manual_seed(0)
    config = preset("tiny", hidden_size=hidden, ffn_hidden_size=ffn, num_experts=experts, num_heads=4,
                    attention_projection_size=projection, initializer_range=0.2)
    return YuanForCausalLM(config).eval()


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hidden=st.sampled_from([32, 64, 96, 160]), ffn=st.sampled_from([32, 64, 96]),
       experts=st.sampled_from([4, 8, 32, 40]), group=st.sampled_from([0, 32, 48, 64, 128]),
       bits=st.sampled_from([4, 8]),
       sym=st.booleans(), wide=st.booleans())
def test_any_decodable_gptq_folder_loads_and_computes_its_weights(tmp_path_factory, hidden, ffn, experts, group, bits,
                                                                  sym, wide):
    model = tiny(hidden, ffn, experts, hidden * (2 if wide else 1))  # the official code needs projection >= hidden
    folder = tmp_path_factory.mktemp("gptq") / "m"
    reference = write_gptq(folder, model, bits, group, sym)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(ids).logits
        if not sym and experts % 32:  # the router's zero points past the first 32 are not in the file
            with pytest.raises(CheckpointError, match=r"qzeros holds the zero points of \d+ of the layer's"):
                from_pretrained(folder, dtype=torch.float32)
            return
        loaded = from_pretrained(folder, dtype=torch.float32, activations="float")
        # A shorter last group is stored as even groups of gcd(group, width) columns; groups the kernels
        # cannot take (48) run in the pure-PyTorch path, the others in the kernels.
        for m in loaded.modules():
            if isinstance(m, QuantLinear):
                width = m.in_features
                assert m.group_size == (math.gcd(group, width) if group and width % group else group or width)
        for use_kernels in (True, False):
            quant_modules.KERNELS = use_kernels
            try:
                got = loaded(ids).logits
            finally:
                quant_modules.KERNELS = True
            torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("ffn, part", [(40, "w2"), (48, "w2")])
def test_a_layer_autogptq_cut_short_is_refused_naming_it(tmp_path, ffn, part):
    """Input widths that are not multiples of 32 lose their last columns in AutoGPTQ's packing."""
    model = tiny(64, ffn, 32, 64)
    write_gptq(tmp_path / "m", model, 4, 32, True)
    with pytest.raises(CheckpointError, match=rf"experts\.\d+\.{part}\.qweight holds \d+ of the layer's {ffn} input"):
        from_pretrained(tmp_path / "m")


def test_relaid_narrow_folder_loads_the_same(tmp_path):
    """`yuan quantize` of such a folder keeps its values in the memory-mapped native layout."""
    from yuanmoe.cli import main

    model = tiny(96, 64, 8, 96)
    reference = write_gptq(tmp_path / "m", model, 4, 64, True)
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "native")]) == 0
    ids = torch.arange(12).view(2, 6)
    with torch.inference_mode():
        got = from_pretrained(tmp_path / "native", dtype=torch.float32, activations="float")(ids).logits
        torch.testing.assert_close(got, reference(ids).logits, rtol=2e-4, atol=2e-4)
