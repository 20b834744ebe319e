"""Fine-tuning: chat SFT data rendered as `yuan chat` renders it, LoRA adapters (attention, experts,
router, LFA) that train, merge and load on top of their base."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint

from conftest import CORPUS, TOKENIZER_DIR
from yuanmoe.checkpoint import from_pretrained
from yuanmoe.cli import main as cli_main
from yuanmoe.data import TokenDataset, prepare_dataset
from yuanmoe.data.packed import IGNORE_INDEX
from yuanmoe.inference import encode_prompt
from yuanmoe.inference.text import TextStream
from yuanmoe.distributed.checkpoint import load_weights
from yuanmoe.evaluation.lm import EvalModel
from yuanmoe.tokenizer import load_tokenizer
from yuanmoe.training import TrainConfig, train
from yuanmoe.training.lora import LoraSpec, adapter_record, apply_lora

CONVERSATIONS = [
    [{"role": "system", "content": "You are Yuan, a helpful assistant."},
     {"role": "user", "content": "Name two prime numbers."},
     {"role": "assistant", "content": "2 and 3.\nBoth are prime."},
     {"role": "user", "content": "请再说一个。"},
     {"role": "assistant", "content": "5 也是质数。"}],
    [{"role": "user", "content": "Write a haiku\nabout rain."},
     {"role": "assistant", "content": "Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth"}],
]


def documents(folder, meta, split="train"):
    """The token documents of a prepared folder, in order, each ending in <eod>."""
    docs = []
    for shard in meta["sources"][0][split]:
        tokens = np.fromfile(folder / shard["file"], dtype=np.uint32)
        starts = list(np.load(folder / shard["index"])) + [len(tokens)]
        docs += [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
    return docs


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n"
                                             for c in CONVERSATIONS))
    meta = prepare_dataset([str(root / "chat.jsonl")], root / "data", tokenizer=TOKENIZER_DIR,
                           heldout_fraction=0.0, workers=1, progress=False)
    return root / "data", meta


def test_chat_sft_renders_each_assistant_turn_as_yuan_chat_does(chat_data):
    folder, meta = chat_data
    tok = load_tokenizer(TOKENIZER_DIR)
    docs = documents(folder, meta)
    expected = [(c[:i], m["content"]) for c in CONVERSATIONS for i, m in enumerate(c) if m["role"] == "assistant"]
    assert len(docs) == len(expected) == 3
    for doc, (history, answer) in zip(docs, expected):
        prompt = encode_prompt(tok, history, chat=True)  # what `yuan chat` and the server feed the model
        assert doc[: len(prompt)] == prompt and prompt[-1] == tok.sep_id
        assert doc[-1] == tok.eod_id and doc.count(tok.sep_id) == 1
        # The answer is what the model must write, newlines as `<n>` as in the official layout (and in
        # the history `yuan chat` renders); streamed as in a chat, it reads as the reply.
        assert doc[len(prompt):-1] == tok.encode(answer.replace("\n", "<n>"))
        stream = TextStream(tok, prompt, chat=True)
        text = "".join(stream.push(i) for i in doc[len(prompt):-1]) + stream.flush()
        assert text == answer
    # The second turn's prompt holds the first answer, written as `yuan chat` keeps its history.
    assert tok.decode(docs[1]).startswith("You are Yuan, a helpful assistant.<n>Name two prime numbers.<n>"
                                          "2 and 3.<n>Both are prime.<n>请再说一个。<sep>")


def test_chat_sft_trains_on_answers_only(chat_data):
    """Loss on each turn's answer and <eod>; earlier answers inside a later prompt are context only."""
    folder, meta = chat_data
    tok = load_tokenizer(TOKENIZER_DIR)
    docs = documents(folder, meta)
    stream = [t for d in docs for t in d]
    ds = TokenDataset(folder, seq_len=len(stream) - 1, seed=0, answer_only=True)
    windows = ds.train[0]
    tokens, shard, start = windows.window(0)
    _, _, targets = ds._sample(tokens, windows.answer_mask(shard, start, len(tokens), ds.sep_id))
    assert tokens.tolist() == stream
    assert targets[targets != IGNORE_INDEX].tolist() == [t for d in docs for t in d[d.index(tok.sep_id) + 1:]]


@pytest.mark.parametrize("messages, error", [
    ([{"role": "assistant", "content": "hi"}], "does not follow a user message"),
    ([{"role": "user", "content": "hi"}], "at least one assistant message"),
    ([{"role": "bot", "content": "hi"}], "unknown chat role"),
])
def test_bad_conversation_names_its_record(tmp_path, messages, error):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=f"chat.jsonl record 1: .*{error}"):
        prepare_dataset([str(tmp_path / "chat.jsonl")], tmp_path / "data", tokenizer=TOKENIZER_DIR,
                        workers=1, progress=False)


# ------------------------------------------------------------------ LoRA
def sft_conversations() -> list[dict]:
    """Short question-answer turns from a play: the model learns to continue a line with the next."""
    lines = [line.strip() for line in (CORPUS / "tinyshakespeare.txt").read_text()[:4000].splitlines()
             if len(line.strip()) > 12]
    return [{"messages": [{"role": "user", "content": "Next line: " + a}, {"role": "assistant", "content": b}]}
            for a, b in zip(lines[:40], lines[1:41])]


@pytest.fixture(scope="module")
def lora_run(golden_with_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in sft_conversations()))
    prepare_dataset([str(root / "sft.jsonl")], root / "data", tokenizer=golden_with_tokenizer,
                    heldout_fraction=0.0, workers=1, progress=False)
    cfg = TrainConfig(data=str(root / "data"), out=str(root / "run"), init_from=str(golden_with_tokenizer),
                      lora_rank=4, lora_targets="attention,experts,router,lfa", answer_only=True, max_steps=30,
                      batch_size=4, seq_len=64, lr=2e-2, warmup_steps=1, weight_decay=0.0, dtype="float32",
                      save_every=30, eval_every=1000, tensorboard=False, progress=False, device="cpu")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = train(None, cfg)
    return root, printed.getvalue(), result


def answer_loss(model, data_dir) -> float:
    ds = TokenDataset(data_dir, seq_len=64, seed=0, answer_only=True)
    batch = ds.batch(range(16))
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                   ignore_index=IGNORE_INDEX))


def test_lora_lowers_the_sft_loss_training_only_adapters(lora_run, golden_with_tokenizer):
    root, _, result = lora_run
    base = from_pretrained(golden_with_tokenizer)
    tuned = from_pretrained(result.checkpoint)  # the adapters on top of their base, folded in
    before, after = answer_loss(base, root / "data"), answer_loss(tuned, root / "data")
    assert after < before - 0.7, (before, after)  # nats per answer token: 6.54 -> 5.42 measured
    # Only adapters were trained and saved: the frozen base is unchanged in the trained model...
    trained = result.model
    frozen = {n: p for n, p in trained.named_parameters() if not p.requires_grad}
    assert frozen and all(n.endswith(".original") or "lora_" not in n for n in frozen)
    assert torch.equal(trained.embed_tokens.weight, base.embed_tokens.weight)
    # ... and the checkpoint holds the adapters alone, with their base named beside them.
    saved = torch.distributed.checkpoint.FileSystemReader(result.checkpoint).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    adapters = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert model_keys == adapters and all(".lora_A" in k or ".lora_B" in k for k in adapters)
    assert any(".experts.parametrizations.w1.0.lora_A" in k for k in adapters)
    assert adapter_record(result.checkpoint)["base"] == str(golden_with_tokenizer.resolve())


def test_trainable_parameter_count_is_printed(lora_run, golden_with_tokenizer):
    _, printed, _ = lora_run
    assert "LoRA rank 4 (alpha 8) on attention,experts,router,lfa: 36,800 trainable parameters" in printed
    model = from_pretrained(golden_with_tokenizer)
    count = apply_lora(model, LoraSpec.parse(4, None, "attention,experts"))
    config, d, r = model.config, model.config.hidden_size, 4
    per_layer = 4 * r * (d + config.attention_projection_size)  # q, k, v: d -> proj; o: proj -> d
    per_layer += config.num_experts * r * ((d + 2 * config.ffn_hidden_size) + (config.ffn_hidden_size + d))
    assert count == config.num_layers * per_layer
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_merged_export_matches_base_plus_adapters(lora_run, golden_with_tokenizer, tmp_path):
    _, _, result = lora_run
    record = adapter_record(result.checkpoint)
    adapted = from_pretrained(golden_with_tokenizer)
    apply_lora(adapted, LoraSpec(record["rank"], record["alpha"], tuple(record["targets"])))
    load_weights(result.checkpoint, adapted)
    assert any(float(p.detach().abs().max()) > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    for fmt in ("official", "native"):
        assert cli_main(["convert", str(result.checkpoint), str(tmp_path / fmt), "--to", fmt, "--merge-lora"]) == 0
        merged = from_pretrained(tmp_path / fmt)
        ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected, got = adapted(ids).logits, merged(ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.equal(got, from_pretrained(golden_with_tokenizer)(ids).logits)
    # generate, serve and eval load a checkpoint with its tokenizer: the adapter checkpoint is one.
    lm = EvalModel.from_checkpoint(result.checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ sharded start and LoRA under torchrun
# name: (layout, source) at 2 ranks; the 4-rank launch runs the same with dp doubled where it can.
SHARDED_LAYOUTS = {
    "fsdp": ("dp={n}", "official"),
    "fsdp_ep": ("dp={n},ep=2", "official"),
    "fsdp_pp": ("dp={h},pp=2", "native"),
    "fsdp_ep_run_checkpoint": ("dp={n},ep=2", "run"),
}
LORA_BATCHES = [torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def lora_steps(pm) -> list[float]:
    """Three AdamW steps of LoRA (all targets) on fixed batches; the losses."""
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in LORA_BATCHES:
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        losses.append(pm.train_step([{"input_ids": ids, "targets": targets}]).loss)
        pm.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad()
    return losses


def sharded_start(source, dims, lora: bool = False):
    from yuanmoe.checkpoint import empty_model, load_config
    from yuanmoe.distributed import build_mesh, parallelize
    from yuanmoe.distributed.sharded_start import load_start_weights, materialize

    spec = LoraSpec.parse(4, None, ",".join(("attention", "experts", "router", "lfa")))
    pm = parallelize(empty_model(load_config(source)[0]), build_mesh(dims), dims,
                     adapt=(lambda m: apply_lora(m, spec)) if lora else None)
    materialize(pm)
    load_start_weights(pm, source)
    return pm


def _shards_equal_the_full_model(pm, reference) -> dict:
    """Whether every parameter this rank holds is its slice of the reference model, and which share
    of the model's values this rank holds."""
    from torch.distributed.tensor import DTensor

    full = dict(reference.named_parameters(remove_duplicate=False))
    equal, local, total = True, 0, sum(p.numel() for p in reference.parameters())
    for name, p in pm.named_parameters():
        value = p.full_tensor() if isinstance(p, DTensor) else p  # gathered over the FSDP ranks
        expected = full[name]
        if name in pm.expert_fqns:
            owner = pm.module.get_submodule(name.rsplit(".", 1)[0])
            expected = expected[owner.first_expert: owner.first_expert + owner.num_experts]
        equal &= torch.equal(value.detach(), expected)
        local += (p.to_local() if isinstance(p, DTensor) else p).numel()
    return {"equal": bool(equal), "share": local / total}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _worker(out: Path, golden: Path, native: Path, run_checkpoint: Path, big: Path) -> None:
    import resource

    import torch.distributed as dist

    from yuanmoe.distributed import ParallelDims, init_distributed

    torch.set_num_threads(1)
    init_distributed("cpu", timeout_s=120)
    n, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    # Peak memory first, before anything large was allocated: the start of a few-hundred-MB model,
    # after a start of the tiny model has loaded all the code it runs.
    del sharded_start(golden, ParallelDims(dp=n)).module
    base_rss = _rss_kib()
    pm = sharded_start(big, ParallelDims(dp=n))
    results["rss"] = {"baseline_kib": base_rss, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "shard_bytes": sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4
                                         for p in pm.parameters())}
    del pm
    reference = from_pretrained(golden)
    sources = {"official": golden, "native": native, "run": run_checkpoint}
    for name, (layout, source) in SHARDED_LAYOUTS.items():
        dims = ParallelDims.parse(layout.format(n=n, h=n // 2))
        results[name] = _shards_equal_the_full_model(sharded_start(sources[source], dims), reference)
    results["lora_fsdp_losses"] = lora_steps(sharded_start(golden, ParallelDims(dp=n), lora=True))
    gathered = [None] * n
    dist.all_gather_object(gathered, results)
    if rank == 0:
        (out / f"results-{n}.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def big_model_config():
    """A model of about 420 MB in fp32 (105 M parameters), the largest tensor (an expert stack) 64 MiB."""
    from yuanmoe import preset

    return preset("tiny", vocab_size=8192, hidden_size=512, num_heads=8, attention_projection_size=512,
                  num_layers=4, num_experts=16, ffn_hidden_size=1024)


@pytest.fixture(scope="module")
def sharded_sources(golden_with_tokenizer, tmp_path_factory):
    from yuanmoe import YuanForCausalLM
    from yuanmoe.checkpoint import save_pretrained
    from yuanmoe.distributed import save_checkpoint

    root = tmp_path_factory.mktemp("sharded")
    reference = from_pretrained(golden_with_tokenizer)
    save_pretrained(reference, root / "native")
    save_checkpoint(root / "run", reference)
    torch.manual_seed(0)
    save_pretrained(YuanForCausalLM(big_model_config()), root / "big", fmt="official")
    return root


@pytest.fixture(scope="module", params=[2, 4])
def sharded_run(request, sharded_sources, golden_with_tokenizer):
    import os
    import subprocess

    root, ranks = sharded_sources, request.param
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, str(root), str(golden_with_tokenizer), str(root / "native"), str(root / "run"),
               str(root / "big")]
    proc = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, [line for line in proc.stderr.splitlines() if "Error" in line][-5:]
    return ranks, json.loads((root / f"results-{ranks}.json").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("layout", SHARDED_LAYOUTS)
def test_sharded_start_loads_each_rank_its_slices_of_the_full_model(sharded_run, layout):
    ranks, results = sharded_run
    assert all(r[layout]["equal"] for r in results)
    if layout in ("fsdp", "fsdp_ep"):  # nothing is held twice: together the ranks hold the model once
        assert sum(r[layout]["share"] for r in results) == pytest.approx(1.0, abs=1e-6)


# Above the interpreter, torch and the process group (measured before the model is built), a rank
# may use its shards, one tensor being read (the largest: an expert stack, 64 MiB in fp32) and this.
RSS_SLACK_MIB = 64


@pytest.mark.distributed
def test_sharded_start_peak_memory_is_a_share_of_the_model(sharded_run):
    ranks, results = sharded_run
    config = big_model_config()
    largest = config.num_experts * 2 * config.ffn_hidden_size * config.hidden_size * 4
    weights = sum(4 * p.numel() for p in torch.nn.Module.parameters(_meta_model(config)))
    for r in results:
        used = (r["rss"]["peak_kib"] - r["rss"]["baseline_kib"]) * 1024
        bound = weights / ranks + largest + RSS_SLACK_MIB * 2**20
        print(f"{ranks} ranks: peak {used / 2**20:.0f} MiB above the baseline, bound {bound / 2**20:.0f} MiB "
              f"(model {weights / 2**20:.0f} MiB, shard {r['rss']['shard_bytes'] / 2**20:.0f} MiB)")
        assert used <= bound


def _meta_model(config):
    from yuanmoe.checkpoint import empty_model

    return empty_model(config)


@pytest.mark.distributed
def test_lora_under_fsdp_follows_the_single_process_run(sharded_run, golden_with_tokenizer):
    from yuanmoe.distributed import ParallelDims
    from yuanmoe.distributed.mesh import init_distributed

    _, results = sharded_run
    init_distributed("cpu")
    expected = lora_steps(sharded_start(golden_with_tokenizer, ParallelDims(), lora=True))
    for r in results:
        assert r["lora_fsdp_losses"] == pytest.approx(expected, rel=1e-5)
    assert expected[-1] < expected[0]


if __name__ == "__main__":
    _worker(*map(Path, sys.argv[1:6]))


# ------------------------------------------------------------------ yuan plan
def test_plan_counts_the_model_and_shards_it():
    from yuanmoe import preset
    from yuanmoe.info import model_stats
    from yuanmoe.plan import Layout, estimate

    config = preset("tiny")
    total = model_stats(config)["total_params"]
    one = estimate(config, Layout(1, 1, 1, True), seq_len=64)
    assert (one.weights, one.gradients, one.optimizer) == (4 * total, 4 * total, 8 * total)
    sharded = estimate(config, Layout(2, 2, 1, True), seq_len=64)
    assert sharded.weights == pytest.approx(one.weights / 2)  # experts split by ep, the rest by FSDP
    spec = LoraSpec.parse(4, None, "attention,experts")
    adapters = apply_lora(_meta(config), spec)
    lora = estimate(config, Layout(1, 1, 1, True), seq_len=64, lora=spec)
    assert lora.gradients == 4 * adapters and lora.weights == 2 * total + 4 * adapters
    checkpointed = estimate(config, Layout(1, 1, 1, True), seq_len=64, activation_checkpointing=True)
    assert checkpointed.activations < one.activations


def _meta(config):
    from yuanmoe.checkpoint import empty_model

    return empty_model(config)


def test_yuan_plan_prints_every_layout_and_which_fit(capsys):
    args = ["plan", "--preset", "yuan2-m32", "--gpus", "8", "--gpu-memory", "80", "--seq", "4096", "--json"]
    assert cli_main(args) == 0
    full = json.loads(capsys.readouterr().out)
    assert cli_main(args + ["--lora-rank", "16", "--activation-checkpointing"]) == 0
    lora = json.loads(capsys.readouterr().out)
    layouts = {e["layout"] for e in full["layouts"]}
    assert {"dp=8,ep=1,pp=1 fsdp", "dp=8,ep=8,pp=1 fsdp", "dp=4,ep=2,pp=2 fsdp", "dp=1,ep=1,pp=8 fsdp"} <= layouts
    # 40 B parameters with fp32 weights, gradients and AdamW need 16 bytes each: more than 8 x 80 GB.
    assert not any(e["fits"] for e in full["layouts"])
    assert any(e["fits"] for e in lora["layouts"])
    assert cli_main(["plan", "--gpus", "0"]) == 2
    assert "--gpus must be positive" in capsys.readouterr().err


def test_bad_lora_runs_fail_with_one_clear_sentence(lora_run, tmp_path, capsys):
    from yuanmoe.config import ConfigError
    from yuanmoe.training.trainer import TrainingError

    root, _, result = lora_run
    common = dict(data=str(root / "data"), max_steps=1, progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="unknown LoRA target.*mlp.*choose from attention, experts, router, lfa"):
        TrainConfig(out=str(tmp_path / "a"), lora_rank=4, lora_targets="attention,mlp", **common)
    with pytest.raises(ConfigError, match="name it with --init"):
        train(None, TrainConfig(out=str(tmp_path / "b"), lora_rank=4, **common))
    with pytest.raises(TrainingError, match="holds LoRA adapters; resume it with the --lora-"):
        train(None, TrainConfig(out=str(root / "run"), **{**common, "max_steps": 40}), resume=True)
    base = adapter_record(result.checkpoint)["base"]
    assert cli_main(["convert", base, str(tmp_path / "c"), "--to", "native", "--merge-lora"]) == 2
    assert "holds no LoRA adapters" in capsys.readouterr().err
