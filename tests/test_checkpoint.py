import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN, TOKENIZER_DIR
from yuanmoe import ConfigError, YuanForCausalLM, from_pretrained, load_tokenizer, preset, save_pretrained
from yuanmoe.cli import main as cli_main
from yuanmoe.convert import CheckpointError

GOLDEN_TENSORS = load_file(GOLDEN / "model.safetensors")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def official_copy(tmp_path, tensors=None, config_changes=None):
    """A copy of the golden official checkpoint, optionally with other tensors or config keys."""
    folder = tmp_path / "official"
    folder.mkdir()
    config = json.loads((GOLDEN / "config.json").read_text())
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    save_file(GOLDEN_TENSORS if tensors is None else tensors, folder / "model.safetensors")
    return folder


def test_native_round_trip_keeps_weights_config_and_tokenizer(tiny_config, tmp_path):
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    tiny_config = tiny_config.replace(vocab_size=tokenizer.vocab_size, eod_token_id=tokenizer.eod_id,
                                      sep_token_id=tokenizer.sep_id, pad_token_id=tokenizer.pad_id)
    model = YuanForCausalLM(tiny_config)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.model"]
    loaded = from_pretrained(tmp_path / "ckpt")
    assert not loaded.training and loaded.config == tiny_config
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_weights(model, loaded)
    assert load_tokenizer(tmp_path / "ckpt").encode("你好<sep>") == tokenizer.encode("你好<sep>")
    ids = torch.randint(0, tiny_config.vocab_size, (1, 7))
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_saved_buffers_are_restored_and_unsaved_ones_rebuilt(tiny_config, tmp_path):
    model = YuanForCausalLM(tiny_config.replace(bias_update_rate=0.01))
    saved = {name: buf.normal_() for name, buf in model.state_dict().items() if name.endswith("expert_bias")}
    assert saved
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert_same_weights(model, loaded)
    assert all(not buf.is_meta for buf in loaded.buffers())
    ids = torch.randint(0, tiny_config.vocab_size, (1, 5))
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_official_checkpoint_saves_back_bit_exact(tmp_path):
    model = from_pretrained(GOLDEN)
    save_pretrained(model, tmp_path / "out", fmt="official", max_shard_bytes=300_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    written = {k: v for shard in shards for k, v in load_file(tmp_path / "out" / shard).items()}
    assert written.keys() == GOLDEN_TENSORS.keys()
    for name, tensor in GOLDEN_TENSORS.items():
        assert torch.equal(written[name], tensor), name
    assert_same_weights(model, from_pretrained(tmp_path / "out"))


def test_convert_command_round_trip_is_bit_exact(tmp_path, capsys):
    assert cli_main(["convert", str(GOLDEN), str(tmp_path / "native"), "--to", "native"]) == 0
    assert "model_type" not in json.loads((tmp_path / "native" / "config.json").read_text())
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "official"]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == GOLDEN_TENSORS.keys()
    assert all(torch.equal(back[k], GOLDEN_TENSORS[k]) for k in back)
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "native"]) == 2
    assert "error: no checkpoint at" in capsys.readouterr().err


def test_sharded_bin_checkpoint_loads_in_requested_dtype(tmp_path):
    folder = official_copy(tmp_path)
    (folder / "model.safetensors").unlink()
    names = sorted(GOLDEN_TENSORS)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({n: GOLDEN_TENSORS[n] for n in part}, folder / file)
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    reference = from_pretrained(GOLDEN)
    loaded = from_pretrained(folder)
    assert_same_weights(reference, loaded)
    half = from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert torch.equal(half.embed_tokens.weight, reference.embed_tokens.weight.bfloat16())


def test_save_replaces_an_existing_checkpoint_and_refuses_other_folders(tiny_config, tmp_path):
    first, second = YuanForCausalLM(tiny_config), YuanForCausalLM(tiny_config)
    save_pretrained(first, tmp_path / "ckpt")
    save_pretrained(second, tmp_path / "ckpt")
    assert_same_weights(second, from_pretrained(tmp_path / "ckpt"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_pretrained(first, tmp_path / "notes")


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    tensors = dict(GOLDEN_TENSORS)
    del tensors["model.layers.1.mlp.experts.3.w2.weight"]
    tensors["model.layers.0.mlp.shared.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(official_copy(tmp_path, tensors))
    assert "model.layers.1.mlp.experts.3.w2.weight" in str(err.value)
    assert "model.layers.0.mlp.shared.weight" in str(err.value)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    tensors = dict(GOLDEN_TENSORS, **{"model.norm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* \(32,\) .* \(64,\)"):
        from_pretrained(official_copy(tmp_path, tensors))


def test_unusable_inputs_raise_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="use_shareqk"):
        from_pretrained(official_copy(tmp_path, config_changes={"use_shareqk": True}))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(GOLDEN, corrupt)
    (corrupt / "model.safetensors").chmod(0o644)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        from_pretrained(corrupt)
    (corrupt / "model.safetensors").unlink()
    (corrupt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard-1.safetensors"):
        from_pretrained(corrupt)


@pytest.mark.parametrize("overrides, message", [
    (dict(router="linear"), "only the attention router"),
    (dict(num_shared_experts=1), "no shared experts"),
    (dict(bias_update_rate=0.01), "no per-expert routing bias"),
])
def test_official_export_refuses_what_the_official_code_cannot_run(tmp_path, overrides, message):
    model = YuanForCausalLM(preset("tiny", **overrides))
    with pytest.raises(ConfigError, match=message):
        save_pretrained(model, tmp_path / "official", fmt="official")
