"""The trainer: learning, the official schedule and weight decay, exact resume, clean stops, errors."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from conftest import CORPUS, TOKENIZER_DIR
from yuanmoe import preset
from yuanmoe.checkpoint import from_pretrained
from yuanmoe.cli import main as cli_main
from yuanmoe.data import prepare_dataset
from yuanmoe.distributed.parallel_model import ParallelModel
from yuanmoe.inference.generate import generate
from yuanmoe.training import TrainConfig, TrainingError, build_optimizer, learning_rate, train
from yuanmoe.training.trainer import config_for_data




@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    text = (CORPUS / "tinyshakespeare.txt").read_text()[:6000]
    for i in range(6):
        (root / f"part{i}.txt").write_text(text[i * 1000: (i + 1) * 1000])
    prepare_dataset([str(root)], root / "data", train_tokenizer_vocab=320, heldout_fraction=0.2, workers=1,
                    progress=False)
    return root / "data"


def tiny(data_dir, **overrides):
    meta = json.loads((data_dir / "meta.json").read_text())
    return config_for_data(preset("tiny", max_position_embeddings=64), meta).replace(**overrides)


def run_config(data_dir, out, **overrides):
    settings = dict(max_steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=3, save_every=3,
                    keep_last=5, dtype="float32", tensorboard=False, progress=False)
    return TrainConfig(data=str(data_dir), out=str(out), **{**settings, **overrides})


def test_tiny_model_overfits_a_short_text(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text((CORPUS / "tinyshakespeare.txt").read_text()[:700])
    prepare_dataset([str(text)], tmp_path / "data", train_tokenizer_vocab=300, heldout_fraction=0, workers=1,
                    progress=False)
    cfg = run_config(tmp_path / "data", tmp_path / "run", max_steps=120, lr=3e-3, warmup_steps=4, save_every=120,
                     eval_every=120, grad_accum=2)
    result = train(tiny(tmp_path / "data"), cfg)
    first, last = result.losses[1], sum(result.losses[s] for s in range(116, 121)) / 5
    assert first > 5.0 and last < 2.5, (first, last)
    tmp_path = tmp_path / "run"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_record = records[0]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "expert_load"} <= set(step_record)
    assert len(step_record["expert_load"]) == 2 and math.isclose(sum(step_record["expert_load"][0]), 1, abs_tol=1e-3)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    full = train(tiny(data_dir), run_config(data_dir, tmp_path / "full", grad_accum=2, fim_rate=0.5))
    # The same run, stopped by a SIGTERM during step 3 (it saves a checkpoint and returns), then resumed.
    interrupted = tmp_path / "interrupted"
    original_step = ParallelModel.train_step
    calls = []

    def train_step_then_sigterm(*args):
        calls.append(1)
        out = original_step(*args)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(ParallelModel, "train_step", train_step_then_sigterm)
        stopped = train(tiny(data_dir), run_config(data_dir, interrupted, grad_accum=2, fim_rate=0.5))
    assert stopped.interrupted and stopped.step == 3 and stopped.checkpoint.name == "step-0000003"
    resumed = train(None, run_config(data_dir, interrupted, grad_accum=2, fim_rate=0.5), resume=True)
    assert [resumed.losses[s] for s in (4, 5, 6)] == [full.losses[s] for s in (4, 5, 6)]
    assert resumed.eval_loss == full.eval_loss
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(4) == 1, "records after the checkpoint are not duplicated"


def test_checkpoints_are_self_contained_and_only_the_last_k_kept(data_dir, tmp_path):
    result = train(tiny(data_dir), run_config(data_dir, tmp_path, max_steps=4, save_every=1, keep_last=2))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-0000003", "step-0000004"]
    model = from_pretrained(result.checkpoint)
    assert (result.checkpoint / "tokenizer.json").is_file()
    assert generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4).shape[1] <= 7
    # A new run started from the checkpoint's weights (fine-tuning), with a zero learning rate, keeps them.
    tuned = train(None, run_config(data_dir, tmp_path / "tuned", max_steps=1, lr=0.0,
                                   init_from=str(result.checkpoint)))
    tuned_state = from_pretrained(tuned.checkpoint).state_dict()
    assert all(torch.equal(tuned_state[k], v) for k, v in model.state_dict().items())


def test_schedule_warms_up_then_decays_by_cosine_to_a_tenth():
    lrs = [learning_rate(s, 1e-3, warmup_steps=10, decay_steps=110, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.55e-3) and lrs[110] == lrs[119] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_weight_decay_skips_norms_and_biases():
    from yuanmoe import YuanForCausalLM

    model = YuanForCausalLM(preset("tiny"))
    decay, no_decay = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters()
                                                         if n.endswith(("norm.weight", ".bias"))}
    assert any(".experts." in names[id(p)] for p in decay["params"])


def test_diverging_loss_stops_and_names_the_step(data_dir, tmp_path):
    with pytest.raises(TrainingError, match=r"at step \d+"):
        train(tiny(data_dir), run_config(data_dir, tmp_path, lr=1e6, warmup_steps=1, max_steps=20))


def test_bad_runs_fail_with_one_clear_sentence(data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="vocabulary of 320 tokens but the model has 256"):
        train(tiny(data_dir, vocab_size=256), run_config(data_dir, tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint to continue"):
        train(None, run_config(data_dir, tmp_path), resume=True)
    (tmp_path / "old" / "checkpoints" / "step-0000001").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "step-0000001" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="earlier version, which cannot be resumed; .* --init"):
        train(None, run_config(data_dir, tmp_path / "old"), resume=True)
    train(tiny(data_dir), run_config(data_dir, tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny(data_dir), run_config(data_dir, tmp_path))
    with pytest.raises(TrainingError, match="another architecture: num_layers"):
        train(tiny(data_dir, num_layers=3), run_config(data_dir, tmp_path), resume=True)
    official = tmp_path / "official-data"
    (official / "in.txt").parent.mkdir()
    (official / "in.txt").write_text("一段中文文本。\n" * 20)
    assert cli_main(["data", "prepare", str(official / "in.txt"), "--out", str(official / "d"),
                     "--tokenizer", str(TOKENIZER_DIR), "--workers", "1"]) == 0
    code = cli_main(["train", "--config", str(tmp_path / "checkpoints" / "step-0000001"), "--data",
                     str(official / "d"), "--out", str(tmp_path / "other")])
    assert code == 2 and "tokenized with a vocabulary of" in capsys.readouterr().err


def test_time_limit_stops_early_with_an_evaluated_checkpoint(data_dir, tmp_path):
    result = train(tiny(data_dir), run_config(data_dir, tmp_path, max_steps=50, time_limit_s=0.0))
    assert result.step == 1 and not result.interrupted
    assert result.checkpoint.name == "step-0000001" and result.eval_loss is not None


def test_activation_checkpointing_gives_the_same_losses(data_dir, tmp_path):
    plain = train(tiny(data_dir), run_config(data_dir, tmp_path / "plain", max_steps=2))
    recomputed = train(tiny(data_dir), run_config(data_dir, tmp_path / "ckpt", max_steps=2,
                                                  activation_checkpointing=True))
    assert recomputed.losses == plain.losses
    assert from_pretrained(recomputed.checkpoint).config.num_layers == 2


def test_activation_checkpointing_recomputes_each_layer_in_the_backward_pass(data_dir, tmp_path, monkeypatch):
    """With checkpointing each decoder layer's forward runs twice per micro-batch (the forward, then
    its recomputation in the backward pass), without it once: a wrapper that does nothing fails this."""
    from yuanmoe.model.transformer import DecoderLayer

    calls = []
    forward = DecoderLayer.forward

    def counting_forward(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training forwards and recomputations, not evaluation
            calls.append(self.self_attn.layer_idx)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", counting_forward)
    counts = {}
    for name, on in (("plain", False), ("recomputed", True)):
        calls.clear()
        train(tiny(data_dir), run_config(data_dir, tmp_path / name, max_steps=1, grad_accum=2,
                                         activation_checkpointing=on))
        counts[name] = {layer: calls.count(layer) for layer in set(calls)}
    assert len(counts["plain"]) == 2 and set(counts["plain"].values()) == {2}  # 2 layers, 2 micro-batches
    assert counts["recomputed"] == {layer: 2 * n for layer, n in counts["plain"].items()}


def test_train_command_writes_checkpoint_metrics_and_tensorboard(data_dir, tmp_path, capsys):
    code = cli_main(["train", "--preset", "tiny", "--set", "max_position_embeddings=64", "--data", str(data_dir),
                     "--out", str(tmp_path), "--max-steps", "2", "--batch-size", "2", "--seq-len", "32",
                     "--grad-accum", "2", "--warmup-steps", "1"])
    assert code == 0 and "held-out loss" in capsys.readouterr().out
    assert from_pretrained(tmp_path / "checkpoints" / "step-0000002").config.num_layers == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]
    # The run checkpoint is what every command takes, as it is.
    checkpoint = str(tmp_path / "checkpoints" / "step-0000002")
    assert cli_main(["generate", checkpoint, "To be", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert cli_main(["convert", checkpoint, str(tmp_path / "native"), "--to", "native"]) == 0
    assert torch.equal(from_pretrained(tmp_path / "native").state_dict()["lm_head.weight"],
                       from_pretrained(checkpoint).state_dict()["lm_head.weight"])


def test_aux_loss_free_bias_is_updated_by_the_trainer(data_dir, tmp_path):
    result = train(tiny(data_dir, bias_update_rate=0.01), run_config(data_dir, tmp_path / "run", max_steps=3))
    model = from_pretrained(result.checkpoint)
    biases = torch.stack([layer.mlp.router.expert_bias for layer in model.layers])
    # Each step moves a bias by at most the rate, towards the mean load.
    assert 0.0 < biases.abs().max().item() <= 0.03 + 1e-6


def test_warmup_longer_than_the_run_is_clamped_with_a_note(data_dir, tmp_path, capsys):
    train(tiny(data_dir), run_config(data_dir, tmp_path, max_steps=4, warmup_steps=100, eval_every=4))
    assert "warming up for 1 steps instead" in capsys.readouterr().out
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    # Peak at the first step, then the cosine decay: an unclamped warm-up would still be climbing.
    assert lrs[0] == pytest.approx(3e-3) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 3e-3


def test_train_options_are_generated_from_the_config_defaults():
    from yuanmoe.cli import build_parser
    from yuanmoe.training.config import train_config_from_args

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    assert train_config_from_args(args) == TrainConfig(data="d", out="o")
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--no-bf16", "--no-tensorboard",
                                      "--activation-checkpointing", "--init", "ckpt", "--time-limit", "60"])
    cfg = train_config_from_args(args)
    assert (cfg.dtype, cfg.tensorboard, cfg.activation_checkpointing, cfg.init_from, cfg.time_limit_s) == \
        ("float32", False, True, "ckpt", 60.0)
    with pytest.raises(ValueError, match="float16 training needs loss scaling"):
        TrainConfig(data="d", out="o", dtype="fp16")


def test_router_lr_scale_and_weight_decay_act_on_the_router_weights_only():
    from types import SimpleNamespace

    from yuanmoe import YuanForCausalLM
    from yuanmoe.training.trainer import begin_step

    cfg = TrainConfig(data="d", out="o", lr=1e-2, max_steps=10, warmup_steps=0)
    moved = {}
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        model = YuanForCausalLM(preset("tiny"))
        optimizer = build_optimizer(model, cfg.lr, 0.1, (0.9, 0.95), router_lr_scale=scale, router_weight_decay=False)
        groups = {round(g["weight_decay"], 3): g for g in optimizer.param_groups}
        router = [g for g in optimizer.param_groups if "lr_scale" in g]
        names = {id(p): n for n, p in model.named_parameters()}
        assert len(router) == 1 and router[0]["weight_decay"] == 0.0 and groups[0.1]["weight_decay"] == 0.1
        assert {names[id(p)] for p in router[0]["params"]} == {n for n in names.values() if ".router." in n}
        begin_step(optimizer, SimpleNamespace(batch=lambda indices: None), cfg, 0, 0)
        assert router[0]["lr"] == pytest.approx(scale * cfg.lr) and groups[0.1]["lr"] == pytest.approx(cfg.lr)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        moved[scale] = {names[id(p)]: float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)}
    for name, distance in moved[1.0].items():
        # Adam's first step moves each weight by its rate; the routers' weights do not decay.
        expected = 3.0 if ".router." in name else 1.0
        assert moved[3.0][name] == pytest.approx(expected * distance, rel=1e-4), name
    router_name = next(n for n in moved[1.0] if ".router." in n)
    assert moved[1.0][router_name] == pytest.approx(cfg.lr, rel=1e-4)
