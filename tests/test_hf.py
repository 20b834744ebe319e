import pytest
import torch
from safetensors.torch import load_file

import yuanmoe
from conftest import GOLDEN

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from yuanmoe.hf import YuanHFConfig, YuanHFForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN / "golden.safetensors")


@pytest.fixture(scope="module")
def hf_model():
    return AutoModelForCausalLM.from_pretrained(GOLDEN)


def test_auto_classes_load_official_folder(hf_model, golden):
    assert isinstance(AutoConfig.from_pretrained(GOLDEN), YuanHFConfig)
    assert isinstance(hf_model, YuanHFForCausalLM) and not hf_model.training
    with torch.inference_mode():
        logits = hf_model(golden["input_ids"]).logits
    assert (logits - golden["logits"]).abs().max() < 1e-4


def test_generate_gives_the_official_greedy_tokens_and_step_logits(hf_model, golden):
    """transformers' generate over this model's cache gives the official continuation, each step's
    logits within 1e-4 of the official ones (a cache that loses state may keep the tokens, not these)."""
    prompt = golden["gen_prompt"]
    out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, : prompt.shape[1]], prompt)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], golden["gen_tokens"])
    step_logits = torch.stack(out.logits, dim=1)
    assert step_logits.shape == golden["gen_step_logits"].shape
    assert (step_logits - golden["gen_step_logits"]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def random_hf_model(tmp_path_factory):
    """A tiny random model with large enough weights that its outputs depend on every input
    token (the golden model's greedy output repeats the last token whatever the context)."""
    from yuanmoe import YuanForCausalLM, preset, save_pretrained

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("random-official")
    save_pretrained(YuanForCausalLM(preset("tiny", initializer_range=0.2)), folder, fmt="official")
    return AutoModelForCausalLM.from_pretrained(folder)


def test_generate_with_left_padding_matches_unpadded_rows(random_hf_model):
    model = random_hf_model
    long, short = torch.randint(0, 500, (12,)), torch.randint(0, 500, (7,))
    pad = model.config.pad_token_id
    batch = torch.stack([long, torch.cat([torch.full((5,), pad), short])])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    for row, prompt in zip(out, (long, short)):
        assert torch.equal(row[-6:], yuanmoe.generate(model.model, prompt[None], max_new_tokens=6)[0, -6:])


def test_save_pretrained_writes_an_official_folder_auto_classes_reload(random_hf_model, tmp_path):
    random_hf_model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert '"model_type": "yuan"' in (tmp_path / "saved" / "config.json").read_text()
    for a, b in zip(random_hf_model.model.state_dict().values(), reloaded.model.state_dict().values()):
        assert torch.equal(a, b)


def test_dtype_and_device_map_follow_the_device_policy():
    model = AutoModelForCausalLM.from_pretrained(GOLDEN, dtype="bfloat16", device_map="auto")
    assert model.model.dtype == torch.bfloat16
    assert model.model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert YuanHFForCausalLM.from_pretrained(GOLDEN, device_map={"": "cpu"}).model.device.type == "cpu"
    with pytest.raises(ValueError, match="this model runs on one device"):
        YuanHFForCausalLM.from_pretrained(GOLDEN, device_map={"model.layers.0": "cpu", "model.layers.1": "cuda:0"})
