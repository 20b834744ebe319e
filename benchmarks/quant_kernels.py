"""Each CPU kernel (quant/kernels.py) against the dense bf16 matmul, per M32 weight shape and rows.

For x [rows, in] @ W.T in bf16: the dense bf16 weight (the baseline), then int4 (group 128) and
int8 (one scale per row) through every kernel this CPU runs (avx512-vnni, avx2, scalar; int8 and
float activations) and the pure-PyTorch dequantize + matmul path (`torch`). Prints milliseconds and
GB/s of the stored weight, the speed-up over the dense bf16 matmul, and this machine's weight-read line (an int64 sum over 1 GiB) measured
in the same run. Each path calls copies of its weight in turn (256 MiB in all), so weights come
from memory, not from the caches, as in decoding.

    .venv/bin/python benchmarks/quant_kernels.py [--threads 1] [--rows 1 4 32 128] [--kernels avx2 ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from yuanmoe.quant import kernels, modules
from yuanmoe.quant.modules import QuantLinear

STREAM_BYTES = 256 * 2**20  # well above the CPU caches
SHAPES = {"attention q/k/v [4096, 2048]": (4096, 2048), "expert w1 [16384, 2048]": (16384, 2048),
          "expert w2 [2048, 8192]": (2048, 8192)}


def best_ms(layers, x, repeat: int) -> float:
    """Best time of one call, calling the copies in turn so that the weights come from memory."""
    def run():
        for m in layers:
            m(x)

    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3 / len(layers)


def copies(module: torch.nn.Module, nbytes: int) -> list[torch.nn.Module]:
    return [module] + [copy.deepcopy(module) for _ in range(-(-STREAM_BYTES // nbytes) - 1)]


def read_line() -> float:
    ints = torch.randint(0, 2**40, (2**27,), dtype=torch.int64)
    ints.sum()
    start = time.perf_counter()
    for _ in range(3):
        ints.sum()
    return 3 * ints.nbytes / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32, 128])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kernels", nargs="+", help="default: every kernel this CPU runs, and torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.kernels or [k for k in reversed(kernels.available())]
    paths = [(k, a) for k in names if k != "torch" for a in kernels.ACTIVATIONS] + \
        ([("torch", "-")] if "torch" in names else [])
    torch.manual_seed(0)
    print(f"threads {args.threads}; {kernels.describe()}; read line {read_line():.1f} GB/s")
    print("ms per call, GB/s of the stored weight, and speed relative to the dense bf16 matmul")
    for label, (out, inp) in SHAPES.items():
        linear = torch.nn.Linear(inp, out, bias=False).to(torch.bfloat16)
        dense = copies(linear, out * inp * 2)
        layers, nbytes = {}, {}
        for bits, group in ((4, 128), (8, 0)):
            layer = QuantLinear.quantize(linear, bits, group)
            nbytes[bits] = layer.qweight.nbytes + layer.scales_and_zeros.nbytes
            layers[bits] = copies(layer, nbytes[bits])
        print(f"\n{label}")
        print(f"{'rows':>5} {'path':<24} {'ms':>8} {'GB/s':>6} {'x bf16':>7}")
        for rows in args.rows:
            x = torch.randn(rows, inp, dtype=torch.bfloat16)
            base = best_ms(dense, x, args.repeat)
            print(f"{rows:>5} {'bf16 dense':<24} {base:>8.2f} {out * inp * 2 / base / 1e6:>6.1f} {1:>7.2f}")
            for bits in (4, 8):
                for kernel, activations in paths:
                    os.environ[kernels.KERNEL_ENV] = "scalar" if kernel == "torch" else kernel
                    kernels.selected.cache_clear()
                    modules.KERNELS = kernel != "torch"
                    for m in layers[bits]:
                        m.activations = activations if activations != "-" else "int8"
                    ms = best_ms(layers[bits], x, args.repeat)
                    name = f"int{bits} {kernel}" + (f"/{activations}" if activations != "-" else "")
                    print(f"{rows:>5} {name:<24} {ms:>8.2f} {nbytes[bits] / ms / 1e6:>6.1f} {base / ms:>7.2f}")
            modules.KERNELS = True
    os.environ.pop(kernels.KERNEL_ENV, None)
    kernels.selected.cache_clear()


if __name__ == "__main__":
    main()
