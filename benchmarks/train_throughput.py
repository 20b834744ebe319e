"""Training throughput: tokens/s and model-FLOPs utilization (MFU) of full training steps.

MFU = model FLOPs per second / the machine's matmul peak, both measured in this run: the peak is
the best of large square matmuls in the same dtype, timed between the steps. Model FLOPs per token are 3x the forward
FLOPs (forward + backward) from `yuan info`'s count: 2 per active weight plus causal attention.
The MoE model is compared with a dense model of the same active parameters (its FFN as wide as
top_k experts), whose ratio shows what routing, dispatch and grouped matmuls cost.

The two models and the peak matmul take turns and each keeps its fastest time: on a shared machine
the minimum is the least disturbed measurement, and alternating exposes all three to the same load. Each
thread count of --threads is measured in the same run. As the trainer does, the process first
calls `keep_freed_memory()`; --default-allocator measures glibc's default behaviour instead.
The warm-up is long (30 steps) because a training process's heap takes tens of steps to reach its
steady size: until then some steps fault in fresh pages (the MoE model's expert counts change every
step, so its buffers vary in size), which a trainer running thousands of steps does not pay. The
page faults per timed step are printed to show where the warm-up left each model.

    .venv/bin/python benchmarks/train_throughput.py [--preset small] [--threads 1,2] [--steps 5]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from yuanmoe import YuanForCausalLM, preset
from yuanmoe.device import keep_freed_memory
from yuanmoe.info import model_stats
from yuanmoe.training import build_optimizer

TARGET_RATIO, TARGET_MFU = 0.85, 0.30


def matmul_time(a: torch.Tensor, b: torch.Tensor, repeats: int = 2) -> float:
    """Seconds of the best of `repeats` products a @ b."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


class Trainee:
    """A model, its optimizer and a fixed batch of random tokens; `step()` times one optimizer step
    (forward, backward, clip, AdamW)."""

    def __init__(self, config, batch_size: int, seq_len: int, bf16: bool):
        torch.manual_seed(0)
        self.config, self.bf16 = config, bf16
        self.model = YuanForCausalLM(config).train()
        self.optimizer = build_optimizer(self.model, 1e-4, 0.1, (0.9, 0.95))
        self.ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))

    def step(self) -> tuple[float, int]:
        """Seconds of one step and the minor page faults during it."""
        faults, start = minor_faults(), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(self.ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), self.ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, minor_faults() - faults


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each model per thread count")
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed steps of each model before the first thread count is timed (kernel selection, the heap "
                             "reaching its steady size); at most 5 before the later ones, whose heap is warm")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure (default 1,2)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (each big tensor freshly mapped every step)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    allocator = "glibc default allocator" if args.default_allocator else (
        "keep_freed_memory()" if keep_freed_memory() else "default allocator (keep_freed_memory unavailable)")

    bf16 = not args.fp32
    moe = preset(args.preset)
    dense = moe.replace(num_experts=0, ffn_hidden_size=moe.top_k * moe.ffn_hidden_size)
    dtype = torch.bfloat16 if bf16 else torch.float32
    models = {f"{args.preset} (MoE, {moe.router} router)": moe, "dense, same active params": dense}
    trainees = {name: Trainee(config, args.batch_size, args.seq_len, bf16) for name, config in models.items()}
    print(f"torch {torch.__version__}, {'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, best of {args.steps} alternating steps, {allocator}")
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for count in threads:
        torch.set_num_threads(count)
        for _ in range(args.warmup if count == threads[0] else min(args.warmup, 5)):
            for trainee in trainees.values():
                trainee.step()
        best = {name: float("inf") for name in trainees}
        faults = {name: 0 for name in trainees}
        matmul = float("inf")
        for _ in range(args.steps):
            matmul = min(matmul, matmul_time(a, b))
            for name, trainee in trainees.items():
                seconds, step_faults = trainee.step()
                best[name], faults[name] = min(best[name], seconds), faults[name] + step_faults
        peak = 2 * n ** 3 / matmul
        print(f"\n{count} thread{'s' if count > 1 else ''}: matmul peak ({dtype}, {n}^3) {peak / 1e9:.0f} GFLOP/s")
        print(f"{'model':<30}{'active params':>14}{'GFLOP/token':>13}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
              f"{'faults/step':>13}")
        speeds, mfus = {}, {}
        for name, config in models.items():
            stats = model_stats(config, args.seq_len)
            flops_per_token = 3 * 1e9 * (stats["forward_gflops_per_token"] + stats["attention_gflops_per_token"])
            speeds[name] = args.batch_size * args.seq_len / best[name]
            achieved = speeds[name] * flops_per_token
            mfus[name] = achieved / peak
            print(f"{name:<30}{stats['active_params'] / 1e6:>13.1f}M{flops_per_token / 1e9:>13.3f}"
                  f"{speeds[name]:>10.0f}{achieved / 1e12:>9.3f}{mfus[name]:>7.1%}{faults[name] / args.steps:>13.0f}")
        moe_name, dense_name = models
        print(f"MoE / dense tokens per second: {speeds[moe_name] / speeds[dense_name]:.2f} (target >= {TARGET_RATIO}); "
              f"MoE MFU {mfus[moe_name]:.1%} (target >= {TARGET_MFU:.0%})")


if __name__ == "__main__":
    main()
