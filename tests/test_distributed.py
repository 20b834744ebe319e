"""Multi-process training matches one process: expert parallel, FSDP2, DDP, pipeline, checkpoints.

One `torchrun --nproc_per_node 2` launch (gloo, one thread per rank) runs every distributed scenario
of this file (this file is its script) and writes the numbers to JSON; the tests compare them with
single-process runs of the same tiny model on the same global batches. Run alone with
`pytest -m distributed`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yuanmoe import YuanForCausalLM, preset
from yuanmoe.distributed import ParallelDims, load_checkpoint, save_checkpoint
from yuanmoe.routers import update_expert_bias

pytestmark = pytest.mark.distributed

STEPS = 3  # optimizer steps per run; checkpoints are taken after SAVE_AT of them
SAVE_AT = 1
LR = 1e-2
MAX_NORM = 0.5  # small enough that clipping is active, so wrong gradient norms change the curve
BALANCING = {"bias_update_rate": 0.01}  # routers whose state must stay equal on all ranks
AUX_LOSSES = {"aux_loss_coef": 0.01, "z_loss_coef": 0.001}
# name: (parallel layout, parallelize options, model config overrides, micro-batches per step)
TRAINING_LAYOUTS = {
    "fsdp": (ParallelDims(dp=2), {}, {}, 1),
    "fsdp_ep": (ParallelDims(dp=2, ep=2), {}, {}, 1),
    "fsdp_ep_accumulation": (ParallelDims(dp=2, ep=2), {}, {}, 2),
    "fsdp_ep_bias_balancing": (ParallelDims(dp=2, ep=2), {}, BALANCING, 1),
    "ddp_ep": (ParallelDims(dp=2, ep=2), {"data_parallel": "ddp"}, {}, 1),
    "pp_1f1b": (ParallelDims(pp=2), {"schedule": "1f1b"}, {}, 1),
    "pp_bias_balancing": (ParallelDims(pp=2), {}, BALANCING, 1),
    # GPipe with one micro-batch: the routers' aux losses see the same tokens as in one process.
    "pp_aux_losses": (ParallelDims(pp=2), {"schedule": "gpipe", "microbatches": 1}, AUX_LOSSES, 1),
}
# A second launch with 4 ranks: experts held by 2 ranks each (FSDP-sharded over those), and all three at once.
FOUR_RANK_LAYOUTS = {
    "fsdp4_ep2": (ParallelDims(dp=4, ep=2), {}, {}, 1),
    "fsdp2_ep2_pp2": (ParallelDims(dp=2, ep=2, pp=2), {}, {}, 1),
}
SAVED_LAYOUTS = ("fsdp_ep", "pp_1f1b", *FOUR_RANK_LAYOUTS)  # checkpointed after SAVE_AT steps




def tiny_model(seed: int = 0, **overrides) -> YuanForCausalLM:
    torch.manual_seed(seed)
    return YuanForCausalLM(preset("tiny", **overrides))


def global_batches() -> list[torch.Tensor]:
    """Tokens from a small part of the vocabulary, so a few steps already lower the loss clearly."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (4, 32), generator=generator) for _ in range(STEPS)]


def held_out_batch() -> dict:
    ids = torch.randint(0, 32, (4, 32), generator=torch.Generator().manual_seed(5))
    return as_micro_batches(ids, 1)[0]


def single_process_steps(model, optimizer, batches) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for ids in batches:
        loss = model(ids, labels=ids).loss
        loss.backward()
        loss = loss.detach()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        update_expert_bias(model)
        losses.append(float(loss))
    return losses, norms


def as_micro_batches(ids: torch.Tensor, count: int) -> list[dict]:
    """The trainer's format: targets are the next tokens (-100 where there is none)."""
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return [{"input_ids": i, "targets": t} for i, t in zip(ids.chunk(count), targets.chunk(count))]


def parallel_steps(pm, optimizer, batches, micro_batches: int = 1) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for ids in batches:
        stats = pm.train_step(as_micro_batches(ids, micro_batches))
        losses.append(stats.loss + stats.aux_loss)
        norms.append(float(pm.clip_grad_norm_(MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        update_expert_bias(pm.module)
    return losses, norms


# ------------------------------------------------------------------------------ the workers
def _expert_parallel_layer(group) -> dict:
    """An MoE layer split over 2 ranks, each feeding half the tokens, against the whole layer."""
    import torch.distributed as dist

    from yuanmoe.distributed import all_to_all_bytes, apply_expert_parallel

    moe = tiny_model().layers[0].mlp
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad_out = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(moe)
    ref_out, _ = reference(x)
    ref_out.backward(grad_out)

    rank = dist.get_rank(group)
    rows = slice(2 * rank, 2 * rank + 2)
    apply_expert_parallel(moe, group)
    x_local = x.detach()[rows].clone().requires_grad_(True)
    out, _ = moe(x_local)
    out.backward(grad_out[rows])
    experts = slice(4 * rank, 4 * rank + 4)
    router_grads = [p.grad.clone() for p in moe.router.parameters()]
    for g in router_grads:  # each rank has the router gradient of its own tokens
        dist.all_reduce(g, group=group)
    diffs = {
        "output": (out - ref_out[rows]).abs().max(),
        "input_grad": (x_local.grad - x.grad[rows]).abs().max(),
        "expert_w1_grad": (moe.experts.w1.grad - reference.experts.w1.grad[experts]).abs().max(),
        "expert_w2_grad": (moe.experts.w2.grad - reference.experts.w2.grad[experts]).abs().max(),
        "router_grad": max((g - r.grad).abs().max() for g, r in zip(router_grads, reference.router.parameters())),
    }
    return {"diffs": {k: float(v) for k, v in diffs.items()}, "all_to_all_bytes": all_to_all_bytes(moe)}


def _placement() -> dict:
    """What each of the 2 ranks holds and feeds: its rows of a global batch (data parallel), its
    shard of a parameter (FSDP), its experts (expert parallel), its layers (pipeline)."""
    import torch.distributed as dist

    from yuanmoe.distributed import build_mesh, parallelize

    def gathered(value):
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values

    rows = torch.arange(8).unsqueeze(1).expand(8, 4) * 10 + torch.arange(4)
    batch = {"input_ids": rows, "targets": rows + 1}
    result = {}
    for name, dims in (("fsdp", ParallelDims(dp=2)), ("fsdp_ep", ParallelDims(dp=2, ep=2))):
        pm = parallelize(tiny_model(), build_mesh(dims), dims)
        local = pm.local_rows(batch)
        result[f"{name}_rows"] = gathered({k: v.tolist() for k, v in local.items()})
    dims = ParallelDims(dp=2)
    pm = parallelize(tiny_model(), build_mesh(dims), dims)
    q = dict(pm.named_parameters())["layers.0.self_attn.q_proj.weight"]
    result["fsdp_shard"] = gathered({"local": q.to_local().numel(), "global": q.numel(),
                                     "full_equal": bool(torch.equal(q.full_tensor(),
                                                                    tiny_model().layers[0].self_attn.q_proj.weight))})
    dims = ParallelDims(dp=2, ep=2)
    pm = parallelize(tiny_model(), build_mesh(dims), dims)
    w1 = dict(pm.named_parameters())["layers.0.mlp.experts.w1"]
    w1 = w1.to_local() if hasattr(w1, "to_local") else w1
    reference = tiny_model().layers[0].mlp.experts.w1
    result["ep_experts"] = gathered({"count": w1.shape[0], "of": reference.shape[0],
                                     "which": [e for e in range(reference.shape[0])
                                               if any(torch.equal(w1[i], reference[e]) for i in range(w1.shape[0]))]})
    dims = ParallelDims(pp=2)
    pm = parallelize(tiny_model(), build_mesh(dims), dims)
    result["pp_names"] = gathered(sorted(n for n, _ in pm.named_parameters()))
    return result


def _train_layouts(layouts: dict, out_dir: Path) -> dict:
    from yuanmoe.distributed import build_mesh, parallelize

    batches, results = global_batches(), {}
    for name, (dims, options, overrides, micro_batches) in layouts.items():
        pm = parallelize(tiny_model(**overrides), build_mesh(dims), dims, **options)
        optimizer = torch.optim.AdamW(pm.parameters(), lr=LR)
        ce_sum, num_targets = pm.eval_loss(held_out_batch())  # before training: a pipeline then switches modes
        losses, norms = parallel_steps(pm, optimizer, batches[:SAVE_AT], micro_batches)
        if name in SAVED_LAYOUTS:
            save_checkpoint(out_dir / f"{name}-step{SAVE_AT}", pm, optimizer, extra={"step": SAVE_AT})
        more_losses, more_norms = parallel_steps(pm, optimizer, batches[SAVE_AT:], micro_batches)
        results[name] = {"losses": losses + more_losses, "norms": norms + more_norms,
                         "held_out_loss": ce_sum / num_targets}
    return results


def _worker(out_dir: Path, checkpoint_ws1: Path) -> None:
    import torch.distributed as dist

    from yuanmoe.distributed import build_mesh, init_distributed, parallelize

    torch.set_num_threads(1)
    init_distributed("cpu", timeout_s=120)
    if dist.get_world_size() == 4:
        results = _train_layouts(FOUR_RANK_LAYOUTS, out_dir)
    else:
        results = {"ep_layer": _expert_parallel_layer(build_mesh(ParallelDims(dp=2, ep=2))["ep"].get_group())}
        results["placement"] = _placement()
        results.update(_train_layouts(TRAINING_LAYOUTS, out_dir))
        dims = ParallelDims(dp=2, ep=2)
        pm = parallelize(tiny_model(seed=7), build_mesh(dims), dims)  # other weights: the load must replace them
        optimizer = torch.optim.AdamW(pm.parameters(), lr=LR)
        extra = load_checkpoint(checkpoint_ws1, pm, optimizer)
        losses, _ = parallel_steps(pm, optimizer, global_batches()[extra["step"]:])
        results["resumed_from_one_process"] = {"losses": losses}
    if dist.get_rank() == 0:
        (out_dir / f"results-{dist.get_world_size()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the tests
@functools.cache
def one_process_run(**overrides) -> dict:
    model = tiny_model(**overrides)
    batch = held_out_batch()
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"]).logits
    model.train()
    held_out = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = single_process_steps(model, optimizer, global_batches())
    return {"losses": losses, "norms": norms, "held_out_loss": float(held_out)}


@pytest.fixture(scope="module")
def reference():
    return one_process_run()


def _launch(out_dir: Path, ranks: int, checkpoint_ws1: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, str(out_dir), str(checkpoint_ws1)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out_dir / f"results-{ranks}.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Save a one-process checkpoint after SAVE_AT steps, then launch the 2-rank worker."""
    out_dir = tmp_path_factory.mktemp("distributed")
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    single_process_steps(model, optimizer, global_batches()[:SAVE_AT])
    checkpoint_ws1 = save_checkpoint(out_dir / "one-process", model, optimizer, extra={"step": SAVE_AT})
    return out_dir, _launch(out_dir, 2, checkpoint_ws1)


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed4")
    return out_dir, _launch(out_dir, 4, out_dir / "unused")


def run_of(request, layout: str):
    return request.getfixturevalue("run4" if layout in FOUR_RANK_LAYOUTS else "run")


def test_expert_parallel_layer_matches_single_process_outputs_and_gradients(run):
    _, results = run
    for what, diff in results["ep_layer"]["diffs"].items():
        assert diff <= 1e-5, f"{what} differs by {diff}"
    assert results["ep_layer"]["all_to_all_bytes"] > 0


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_ep"])
def test_data_parallel_ranks_take_disjoint_halves_of_the_global_batch(run, layout):
    _, results = run
    per_rank = results["placement"][f"{layout}_rows"]
    rows = [[ids[0] // 10 for ids in rank["input_ids"]] for rank in per_rank]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7]]  # each rank its own half, in order: none trains on all 8
    for rank, got in zip(rows, per_rank):
        assert got["targets"] == [[10 * r + c + 1 for c in range(4)] for r in rank]  # targets follow their rows


def test_fsdp_rank_holds_half_of_each_parameter(run):
    _, results = run
    shards = results["placement"]["fsdp_shard"]
    assert [s["global"] for s in shards] == [128 * 64] * 2
    assert [s["local"] for s in shards] == [128 * 64 // 2] * 2
    assert all(s["full_equal"] for s in shards)


def test_expert_parallel_rank_holds_its_half_of_the_experts(run):
    _, results = run
    experts = results["placement"]["ep_experts"]
    assert [e["count"] for e in experts] == [4, 4] and all(e["of"] == 8 for e in experts)
    assert [e["which"] for e in experts] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pipeline_stage_holds_only_its_layers(run):
    _, results = run
    layers = [{n.split(".")[1] for n in names if n.startswith("layers.")} for names in results["placement"]["pp_names"]]
    assert layers == [{"0"}, {"1"}]
    first, last = results["placement"]["pp_names"]
    assert "embed_tokens.weight" in first and not any(n.startswith("layers.1.") for n in first)
    assert not any(n.startswith("layers.0.") for n in last)


@pytest.mark.parametrize("layout", [*TRAINING_LAYOUTS, *FOUR_RANK_LAYOUTS])
def test_parallel_training_follows_single_process_loss_curve(request, layout):
    _, results = run_of(request, layout)
    got = results[layout]
    reference = one_process_run(**{**TRAINING_LAYOUTS, **FOUR_RANK_LAYOUTS}[layout][2])
    assert len(got["losses"]) == STEPS
    assert reference["losses"][-1] < reference["losses"][0] - 0.05  # the curve moves, so following it means something
    for step, (a, b) in enumerate(zip(got["losses"], reference["losses"]), 1):
        assert abs(a - b) <= 1e-4, f"step {step}: loss {a} vs {b} in one process"
    for step, (a, b) in enumerate(zip(got["norms"], reference["norms"]), 1):
        assert abs(a - b) <= 1e-4 * b, f"step {step}: gradient norm {a} vs {b} in one process"
    assert got["held_out_loss"] == pytest.approx(reference["held_out_loss"], abs=1e-5)


@pytest.mark.parametrize("layout", SAVED_LAYOUTS)
def test_checkpoint_saved_by_several_ranks_resumes_in_one_process(request, reference, layout):
    out_dir, _ = run_of(request, layout)
    model = tiny_model(seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    extra = load_checkpoint(out_dir / f"{layout}-step{SAVE_AT}", model, optimizer)
    assert extra == {"step": SAVE_AT}
    losses, _ = single_process_steps(model, optimizer, global_batches()[SAVE_AT:])
    # Two steps: the second also depends on the restored optimizer moments.
    assert losses == pytest.approx(reference["losses"][SAVE_AT:], abs=1e-4)


def test_checkpoint_saved_in_one_process_resumes_at_two_ranks(run, reference):
    _, results = run
    assert results["resumed_from_one_process"]["losses"] == pytest.approx(reference["losses"][SAVE_AT:], abs=1e-4)


def test_run_checkpoint_loads_and_converts_as_a_single_file_model(run, tmp_path):
    from yuanmoe.checkpoint import from_pretrained, save_pretrained

    out_dir, _ = run
    source = out_dir / f"fsdp_ep-step{SAVE_AT}"
    model = tiny_model(seed=7)
    load_checkpoint(source, model)
    ids = global_batches()[0]
    expected = model(ids).logits
    gathered = from_pretrained(source)  # a run checkpoint of 2 ranks, read directly
    assert torch.allclose(gathered(ids).logits, expected, atol=1e-5)
    for fmt in ("native", "official"):
        exported = from_pretrained(save_pretrained(gathered, tmp_path / fmt, fmt=fmt))
        assert torch.allclose(exported(ids).logits, expected, atol=1e-5), fmt
    from yuanmoe.cli import main as cli_main

    assert cli_main(["convert", str(source), str(tmp_path / "converted"), "--to", "official"]) == 0
    assert torch.allclose(from_pretrained(tmp_path / "converted")(ids).logits, expected, atol=1e-5)


def test_loading_a_checkpoint_of_another_model_names_the_difference(run):
    out_dir, _ = run
    other = YuanForCausalLM(preset("tiny", num_layers=3))
    with pytest.raises(ValueError, match="num_layers"):
        load_checkpoint(out_dir / f"fsdp_ep-step{SAVE_AT}", other)


def _metrics(run_dir: Path) -> dict:
    """step -> loss and step -> held-out loss from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"loss": {r["step"]: r["loss"] for r in records if "loss" in r},
            "eval_loss": {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}}


def test_yuan_train_resumes_across_world_sizes_with_no_flag_and_time_limit_stops_every_rank(tmp_path):
    """One run, continued 2 ranks -> 1 process -> 2 ranks, follows the loss curve of the same
    command in one process; `--time-limit` ends the torchrun and single-process legs alike."""
    from conftest import CORPUS
    from yuanmoe.cli import main as cli_main
    from yuanmoe.data import prepare_dataset

    text = (CORPUS / "tinyshakespeare.txt").read_text()[:6000]
    for i in range(6):
        (tmp_path / f"part{i}.txt").write_text(text[i * 1000: (i + 1) * 1000])
    prepare_dataset([str(tmp_path)], tmp_path / "data", train_tokenizer_vocab=320, heldout_fraction=0.2, workers=1,
                    progress=False)
    common = ["train", "--data", str(tmp_path / "data"), "--max-steps", "5", "--batch-size", "4", "--seq-len", "32",
              "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "1", "--save-every", "5", "--dtype", "float32",
              "--no-tensorboard"]
    new_run = ["--preset", "tiny", "--set", "max_position_embeddings=64"]
    assert cli_main(common + new_run + ["--out", str(tmp_path / "one")]) == 0
    one = _metrics(tmp_path / "one")

    chain = str(tmp_path / "chain")
    _torchrun(common + new_run + ["--out", chain, "--ep", "2", "--time-limit", "0"])  # stops after step 1
    assert sorted(_metrics(tmp_path / "chain")["loss"]) == [1]
    assert cli_main(common + ["--out", chain, "--resume", "--time-limit", "0"]) == 0  # one process: step 2
    _torchrun(common + ["--out", chain, "--resume"])  # 2 ranks again: steps 3 to 5
    got = _metrics(tmp_path / "chain")
    assert sorted(got["loss"]) == sorted(got["eval_loss"]) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "chain" / "checkpoints").iterdir()) == [
        "step-0000001", "step-0000002", "step-0000005"]
    assert one["loss"][5] < one["loss"][1] - 0.1  # the curve moves, so following it means something
    for key in ("loss", "eval_loss"):
        for step in one[key]:
            assert got[key][step] == pytest.approx(one[key][step], abs=1e-4), (key, step)


def test_init_under_torchrun_starts_from_the_given_weights(tmp_path, data_for_cli):
    from yuanmoe.checkpoint import from_pretrained
    from yuanmoe.cli import main as cli_main

    base = ["train", "--data", str(data_for_cli), "--batch-size", "4", "--seq-len", "32", "--no-tensorboard",
            "--dtype", "float32"]
    assert cli_main(base + ["--preset", "tiny", "--set", "max_position_embeddings=64", "--max-steps", "2",
                            "--out", str(tmp_path / "base")]) == 0
    start = tmp_path / "base" / "checkpoints" / "step-0000002"
    # A learning rate of zero keeps the weights: the torchrun run must have started from them.
    _torchrun(base + ["--init", str(start), "--lr", "0", "--max-steps", "1", "--out", str(tmp_path / "tuned"),
                      "--ep", "2"])
    tuned = from_pretrained(tmp_path / "tuned" / "checkpoints" / "step-0000001").state_dict()
    started = from_pretrained(start).state_dict()
    assert started.keys() == tuned.keys()
    assert all(torch.equal(tuned[k], v) for k, v in started.items())
    fresh = YuanForCausalLM(from_pretrained(start).config).state_dict()
    assert not torch.equal(fresh["layers.0.self_attn.q_proj.weight"], started["layers.0.self_attn.q_proj.weight"])


@pytest.fixture(scope="module")
def data_for_cli(tmp_path_factory):
    from conftest import CORPUS
    from yuanmoe.data import prepare_dataset

    root = tmp_path_factory.mktemp("cli-data")
    (root / "text.txt").write_text((CORPUS / "tinyshakespeare.txt").read_text()[:4000])
    prepare_dataset([str(root / "text.txt")], root / "data", train_tokenizer_vocab=320, heldout_fraction=0.2,
                    workers=1, progress=False)
    return root / "data"


def _torchrun(args: list[str], ranks: int = 2) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "yuanmoe.cli", *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_parallel_spec_parses_and_rejects_impossible_layouts():
    assert ParallelDims.parse("dp=4, ep=2,pp=2") == ParallelDims(dp=4, ep=2, pp=2)
    assert ParallelDims.parse("pp=2").world_size == 2
    with pytest.raises(ValueError, match="must divide dp"):
        ParallelDims(dp=2, ep=4)
    with pytest.raises(ValueError, match="dp=4,ep=2,pp=2"):
        ParallelDims.parse("dp=4;ep=2")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
