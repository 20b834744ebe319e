"""Training throughput: tokens/s and model-FLOPs utilization (MFU) of full training steps.

MFU = model FLOPs per second / the machine's matmul peak, both measured in this run: the peak is
the best of a few large square matmuls in the same dtype. Model FLOPs per token are 3x the forward
FLOPs (forward + backward) from `yuan info`'s count: 2 per active weight plus causal attention.
The MoE model is compared with a dense model of the same active parameters (its FFN as wide as
top_k experts), whose ratio shows what routing, dispatch and grouped matmuls cost.

    .venv/bin/python benchmarks/train_throughput.py [--preset small] [--batch-size 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from yuanmoe import YuanForCausalLM, preset
from yuanmoe.info import model_stats
from yuanmoe.training import build_optimizer


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n x n matmuls."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def train_speed(config, batch_size: int, seq_len: int, steps: int, warmup: int, bf16: bool) -> float:
    """Tokens per second of optimizer steps (forward, backward, clip, AdamW) on random tokens."""
    torch.manual_seed(0)
    model = YuanForCausalLM(config).train()
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch_size * seq_len * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel selection, allocation)")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bf16 = not args.fp32
    moe = preset(args.preset)
    dense = moe.replace(num_experts=0, ffn_hidden_size=moe.top_k * moe.ffn_hidden_size)
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch_size} x {args.seq_len} tokens")
    print(f"matmul peak ({dtype}, 2048^3): {peak / 1e9:.0f} GFLOP/s")
    print(f"{'model':<28}{'active params':>14}{'GFLOP/token':>13}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}")
    speeds = {}
    for name, config in ((f"{args.preset} (MoE, {moe.router} router)", moe), ("dense, same active params", dense)):
        stats = model_stats(config, args.seq_len)
        flops_per_token = 3 * 1e9 * (stats["forward_gflops_per_token"] + stats["attention_gflops_per_token"])
        speeds[name] = tokens_per_s = train_speed(config, args.batch_size, args.seq_len, args.steps, args.warmup, bf16)
        achieved = tokens_per_s * flops_per_token
        print(f"{name:<28}{stats['active_params'] / 1e6:>13.1f}M{flops_per_token / 1e9:>13.3f}"
              f"{tokens_per_s:>10.0f}{achieved / 1e12:>9.3f}{achieved / peak:>7.1%}")
    moe_speed, dense_speed = speeds.values()
    print(f"MoE / dense tokens per second: {moe_speed / dense_speed:.2f}")


if __name__ == "__main__":
    main()
