"""RoPE as the official configs give it (spec section 7): the base from `rotary_base` or
`rope_theta`, and the YaRN fields of the official vLLM port, checked against the formulas."""

import json
import logging
import math

import pytest
import torch

from yuanmoe import from_pretrained, preset
from yuanmoe.convert.official import config_from_official, config_to_official
from yuanmoe.model.attention import rope_cos_sin, rope_inv_freq

OFFICIAL = {"model_type": "yuan", "hidden_size": 2048, "num_attention_heads": 16, "num_hidden_layers": 24,
            "attention_projection_size": 4096, "vocab_size": 135040, "max_position_embeddings": 4096,
            "moe_config": {"moe_num_experts": 32, "moe_top_k": 2, "ffn_hidden_size": 8192}}


def test_ntk_base_of_the_16k_model_is_what_the_spec_computes():
    # b' = b * s^(D/(D-2)), D = 128, s = 4: the --rotary-base of the official 16K evaluation scripts.
    assert round(10000 * 4 ** (128 / 126)) == 40890
    config = config_from_official({**OFFICIAL, "rotary_base": 40890})
    inv_freq, mscale = rope_inv_freq(config)
    assert config.rope_base == 40890 and mscale == 1.0
    assert torch.allclose(inv_freq, 40890.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128).float())


@pytest.mark.parametrize("fields, base", [({}, 10000.0), ({"rope_theta": 5e5}, 5e5),
                                          ({"rope_theta": 5e5, "rotary_base": 40890}, 40890.0)])
def test_official_base_comes_from_rotary_base_then_rope_theta(fields, base):
    assert config_from_official({**OFFICIAL, **fields}).rope_base == base


def test_yarn_fields_default_as_in_the_vllm_port_and_round_trip():
    config = config_from_official({**OFFICIAL, "use_yarn": True})
    assert (config.yarn_scale_factor, config.yarn_original_max_position, config.max_position_embeddings,
            config.yarn_attn_factor) == (128.0, 4096, 4096, 1.0)
    config = config_from_official({**OFFICIAL, "use_yarn": True, "yarn_scale_factor": 4,
                                   "scaled_max_position_embeddings": 16384, "attn_factor": 0.9})
    assert (config.yarn_scale_factor, config.yarn_original_max_position, config.max_position_embeddings,
            config.yarn_attn_factor) == (4.0, 4096, 16384, 0.9)
    assert config_from_official(config_to_official(config)) == config
    assert config_from_official(config_to_official(preset("tiny"))).yarn_scale_factor is None


def test_yarn_inverse_frequencies_and_mscale_follow_the_formulas():
    # D = 128, b = 10000, L = 4096, s = 4. corr_dim(r) = D ln(L / (2 pi r)) / (2 ln b):
    # corr_dim(32) = 20.9 -> low 20, corr_dim(1) = 45.03 -> high 46 (worked by hand).
    config = config_from_official({**OFFICIAL, "use_yarn": True, "yarn_scale_factor": 4,
                                   "scaled_max_position_embeddings": 16384})
    inv_freq, mscale = rope_inv_freq(config)
    plain = 10000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ratio = (plain / inv_freq.double()).float()
    assert torch.allclose(ratio[:21], torch.ones(21))  # high-frequency dims kept
    assert torch.allclose(ratio[46:], torch.full((18,), 4.0))  # low-frequency dims / s
    assert ratio[33].item() == pytest.approx(0.5 * 4 + 0.5, rel=1e-6)  # halfway up the ramp (33 - 20) / 26
    assert mscale == pytest.approx(0.1 * math.log(4) + 1)
    positions = torch.tensor([[0, 1, 9000]])
    cos, sin = rope_cos_sin(positions, config)
    angle = 9000 * inv_freq[40].double()
    assert cos[0, 0, 2, 40].item() == pytest.approx(mscale * math.cos(angle), abs=1e-5)
    assert sin[0, 0, 2, 40 + 64].item() == pytest.approx(mscale * math.sin(angle), abs=1e-5)


def test_loading_says_which_rope_the_checkpoint_uses(tmp_path, tiny_config):
    from yuanmoe import YuanForCausalLM, save_pretrained

    save_pretrained(YuanForCausalLM(tiny_config), tmp_path / "m", fmt="official")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(rotary_base=40890, use_yarn=True, yarn_scale_factor=4, scaled_max_position_embeddings=2048)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("yuanmoe")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        from_pretrained(tmp_path / "m")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(lines) == 1
    assert "RoPE base 40890 over the first 16 dims of each head, YaRN scale 4 from 512 to 2048 positions, " \
           "mscale 1.1386" in lines[0]
