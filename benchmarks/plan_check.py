"""Check `yuan plan` against the peak memory of real training steps on the CPU.

Each case runs in a fresh process (launched by this script, or by torchrun for the 2-rank FSDP
cases): the resident set is read after torch, the package and the process group are loaded
(baseline), then the model is built as `yuan train` builds it (random weights; a LoRA base on the
meta device, materialised in bf16), parallelized, and trained for 2 AdamW steps with bf16 autocast;
the measure is the peak resident set (ru_maxrss) minus the baseline. On the CPU there is no
caching allocator, so the resident set follows what is allocated; the planner's prediction is
its total for the same layout, without the GPU reserve. glibc is told to serve large blocks from
mmap (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the resident set instead of staying in its
heap.

    python benchmarks/plan_check.py            # all cases, a table of measured vs predicted
    python benchmarks/plan_check.py --fit      # refit the activation coefficients of plan.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

CONFIG = dict(vocab_size=8192, hidden_size=512, num_layers=4, num_heads=8, attention_projection_size=512,
              max_position_embeddings=1024, num_experts=8, top_k=2, ffn_hidden_size=1024)
SEQ, MICRO_BATCH = 512, 4
CASES = {  # name: (ranks, LoRA, activation checkpointing)
    "full": (1, False, False),
    "full_ac": (1, False, True),
    "lora": (1, True, False),
    "lora_ac": (1, True, True),
    "full_fsdp2": (2, False, False),
    "lora_fsdp2": (2, True, False),
}


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(lora: bool, checkpointing: bool) -> dict:
    """Run in this process (one rank of the case); returns the peak above the baseline."""
    import torch.distributed as dist

    from yuanmoe import YuanForCausalLM, preset
    from yuanmoe.checkpoint import empty_model
    from yuanmoe.distributed import ParallelDims, build_mesh, init_distributed, parallelize
    from yuanmoe.distributed.sharded_start import fill_local, materialize
    from yuanmoe.training.lora import LoraSpec, apply_lora, init_adapters
    from yuanmoe.training.trainer import enable_activation_checkpointing

    torch.set_num_threads(1)
    init_distributed("cpu")
    world = dist.get_world_size()
    config = preset("small", **CONFIG)
    baseline = rss_kib()
    dims = ParallelDims(dp=world)
    spec = LoraSpec.parse(8, None, "attention,experts") if lora else None
    model = empty_model(config) if lora else YuanForCausalLM(config)
    if checkpointing:
        enable_activation_checkpointing(model)
    pm = parallelize(model, build_mesh(dims), dims, adapt=(lambda m: apply_lora(m, spec, dtype=torch.bfloat16))
                     if lora else None, param_dtype=torch.bfloat16 if lora else None)
    if lora:
        materialize(pm)
        with torch.no_grad():
            for p in pm.parameters():
                p.normal_(0, 0.02)
        init_adapters(pm.module, fill=fill_local)
    pm.autocast_dtype = torch.bfloat16
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, config.vocab_size, (MICRO_BATCH * world, SEQ + 1), generator=generator)
        pm.train_step([{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rank": dist.get_rank(), "measured": (peak - baseline) * 1024}


def predicted(ranks: int, lora: bool, checkpointing: bool) -> dict:
    from yuanmoe import preset
    from yuanmoe.plan import Layout, estimate
    from yuanmoe.training.lora import LoraSpec

    spec = LoraSpec.parse(8, None, "attention,experts") if lora else None
    e = estimate(preset("small", **CONFIG), Layout(ranks, 1, 1, True), SEQ, MICRO_BATCH, spec, checkpointing)
    return {k: getattr(e, k) for k in ("weights", "gradients", "optimizer", "activations", "buffers", "total")}


def run_case(name: str) -> list[dict]:
    ranks, lora, checkpointing = CASES[name]
    # Large blocks from mmap, returned to the system when freed: the resident set then follows what
    # is allocated, not what glibc's heap kept from earlier allocations.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    if ranks == 1:
        command = [sys.executable, __file__, "--worker", name]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   __file__, "--worker", name]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def fit() -> None:
    """Least squares of the bytes autograd saves per token in one decoder layer, over six shapes."""
    import numpy as np

    from yuanmoe import YuanForCausalLM, preset
    from yuanmoe.training.lora import LoraSpec, apply_lora

    torch.set_num_threads(1)

    def saved_bytes(config, tokens: int, lora: bool) -> int:
        model = YuanForCausalLM(config)
        if lora:
            apply_lora(model, LoraSpec.parse(8, None, "attention,experts"), dtype=torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, config.vocab_size, (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            model(ids)
        return sum(seen.values())

    base = preset("small", num_layers=1)
    shapes = [{}, dict(hidden_size=512, attention_projection_size=512, num_heads=8),
              dict(attention_projection_size=1024, num_heads=8), dict(ffn_hidden_size=1536), dict(top_k=4),
              dict(hidden_size=384, attention_projection_size=768, num_heads=6, ffn_hidden_size=1024, top_k=3)]
    for lora in (False, True):
        rows, per_token = [], []
        for shape in shapes:
            one, two = base.replace(**shape), base.replace(num_layers=2, **shape)
            layer = {t: saved_bytes(two, t, lora) - saved_bytes(one, t, lora) for t in (128, 256)}
            per_token.append((layer[256] - layer[128]) / 128)
            rows.append([one.hidden_size, one.attention_projection_size, one.top_k * one.ffn_hidden_size,
                         one.top_k * one.hidden_size])
        coef, *_ = np.linalg.lstsq(np.array(rows, float), np.array(per_token), rcond=None)
        error = np.max(np.abs(np.array(rows) @ coef - per_token) / per_token)
        print(f"{'bf16 base (LoRA)' if lora else 'fp32 weights':<18} bytes/token/layer = {coef[0]:.1f} h + "
              f"{coef[1]:.1f} P + {coef[2]:.1f} kF + {coef[3]:.1f} kh   (largest error {error:.2%})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=sorted(CASES))
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    if args.worker:
        _, lora, checkpointing = CASES[args.worker]
        print(json.dumps(measure(lora, checkpointing)))
        return
    if args.fit:
        fit()
        return
    print(f"model: preset small with {CONFIG}; {MICRO_BATCH} x {SEQ} tokens per rank per step; MiB per rank")
    print(f"{'case':<12}{'measured':>10}{'predicted':>10}{'error':>8}   prediction: weights/grads/optim/activ/buffers")
    for name in args.cases:
        ranks, lora, checkpointing = CASES[name]
        p = predicted(ranks, lora, checkpointing)
        for r in run_case(name):
            m = r["measured"]
            parts = "/".join(f"{p[k] / 2**20:.0f}" for k in ("weights", "gradients", "optimizer", "activations",
                                                              "buffers"))
            label = name if ranks == 1 else f"{name} r{r['rank']}"
            print(f"{label:<12}"
                  f"{m / 2**20:10.0f}{p['total'] / 2**20:10.0f}{(p['total'] - m) / m:8.1%}   {parts}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
