"""Training throughput on 1 process against 2+ processes (torchrun, one thread per rank), and the
bytes the expert-parallel all-to-all moves per step.

Every layout trains the same model on the same global batch (random tokens, fixed seed) with
AdamW; tokens/s counts the global batch's tokens over the timed steps (after warm-up steps) and is
printed as a ratio to the 1-process run launched by this same command. All-to-all bytes are token
rows this rank sent to other ranks (dispatch + combine; the backward sends as many again as
gradients), measured by `ExpertParallelExperts` and compared with the expectation for uniform
routing: layers * tokens_per_rank * top_k * (ep - 1) / ep * 2 * hidden * bytes_per_element.

Usage: python benchmarks/distributed_throughput.py [--preset small] [--batch 8] [--seq 128]
       [--steps 4] [--warmup 1] [--layouts dp=2 dp=2,ep=2 pp=2] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from yuanmoe import YuanForCausalLM, preset
    from yuanmoe.distributed import ParallelDims, build_mesh, init_distributed, parallelize

    torch.set_num_threads(1)
    device = init_distributed()
    dims = ParallelDims.parse(args.layout)
    torch.manual_seed(0)
    config = preset(args.preset)
    pm = parallelize(YuanForCausalLM(config), build_mesh(dims, device.type), dims)
    if args.bf16:
        pm.autocast_dtype = torch.bfloat16
    optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=generator)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def step() -> None:
        pm.train_step([batch])
        pm.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    pm.all_to_all_bytes(reset=True)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    sent = torch.tensor(float(pm.all_to_all_bytes()))
    dist.all_reduce(sent)
    if dist.get_rank() == 0:
        layers = config.num_layers
        tokens_per_rank = args.batch * args.seq // dims.dp
        element = 2 if args.bf16 else 4
        expected = (layers * tokens_per_rank * config.top_k * (dims.ep - 1) / dims.ep * 2 * config.hidden_size * element
                    if dims.ep > 1 else 0.0)
        result = {"tokens_per_s": args.batch * args.seq * args.steps / elapsed,
                  "all_to_all_bytes_per_rank_step": float(sent) / dims.world_size / args.steps,
                  "expected_uniform": expected}
        with open(args.result, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def launch(layout: str, args) -> dict:
    from yuanmoe.distributed import ParallelDims

    dims = ParallelDims.parse(layout)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(dims.world_size), __file__, "--worker", "--layout", layout, "--result", out.name,
                   "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{layout} failed:\n{proc.stderr[-3000:]}")
        with open(out.name) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8, help="global batch, sequences")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", default=["dp=2", "dp=2,ep=2", "pp=2"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"preset {args.preset}, global batch {args.batch} x {args.seq} tokens, {args.steps} timed steps, "
          f"{'bf16' if args.bf16 else 'fp32'}, 1 thread per process")
    baseline = launch("dp=1", args)
    print(f"{'layout':<14}{'tokens/s':>10}{'vs 1 proc':>11}{'a2a MB/rank/step':>18}{'uniform est.':>14}")
    print(f"{'1 process':<14}{baseline['tokens_per_s']:>10.0f}{1.0:>11.2f}{'-':>18}{'-':>14}")
    for layout in args.layouts:
        r = launch(layout, args)
        ratio = r["tokens_per_s"] / baseline["tokens_per_s"]
        a2a = f"{r['all_to_all_bytes_per_rank_step'] / 1e6:.2f}" if r["expected_uniform"] else "-"
        est = f"{r['expected_uniform'] / 1e6:.2f}" if r["expected_uniform"] else "-"
        print(f"{layout:<14}{r['tokens_per_s']:>10.0f}{ratio:>11.2f}{a2a:>18}{est:>14}")


if __name__ == "__main__":
    main()
