"""Which matmul path is fastest per shape, rows and bit width (quant/modules.py picks by rows).

For M32's weight shapes, times x [rows, in] @ W.T in bf16 for: the bf16 weight (baseline), int8 per
output row through `torch._weight_int8pack_mm`, int4 group-128 through
`_weight_int4pack_mm_for_cpu`, and each one's dequantize + bf16 matmul fallback. Prints
milliseconds and the weight bytes read per second (GB/s of the stored weight). Each path calls
copies of its weight in turn (256 MiB in all), so weights come from memory, not from the caches.

    .venv/bin/python benchmarks/quant_kernels.py [--threads 1] [--rows 1 2 4 8 32 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from yuanmoe.quant import modules
from yuanmoe.quant.modules import QuantLinear

STREAM_BYTES = 256 * 2**20  # well above this machine's 32 MiB L3
INT8_LIMIT, INT4_LIMIT = modules.INT8_KERNEL_MAX_ROWS, modules.INT4_KERNEL_MAX_ROWS
SHAPES = {"attention q/k/v [4096, 2048]": (4096, 2048), "expert w1 [16384, 2048]": (16384, 2048),
          "expert w2 [2048, 8192]": (2048, 8192)}


def best_ms(modules_, x, repeat: int) -> float:
    """Best time of one call, calling the copies in turn so that the weights come from memory."""
    def run():
        for m in modules_:
            m(x)

    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3 / len(modules_)


def copies(module: torch.nn.Module, nbytes: int) -> list[torch.nn.Module]:
    """Enough copies of a module that together they exceed the CPU caches (STREAM_BYTES)."""
    import copy

    return [module] + [copy.deepcopy(module) for _ in range(-(-STREAM_BYTES // nbytes) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32, 256])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modules.INT8_KERNEL_MAX_ROWS = modules.INT4_KERNEL_MAX_ROWS = 2**31
    torch.manual_seed(0)
    print(f"threads {args.threads}; ms (GB/s of stored weight); * = the path quant_matmul takes")
    for label, (out, inp) in SHAPES.items():
        linear = torch.nn.Linear(inp, out, bias=False).to(torch.bfloat16)
        layers = {"int8": QuantLinear.quantize(linear, 8, 0), "int4": QuantLinear.quantize(linear, 4, 128)}
        nbytes = {name: layer.qweight.nbytes + layer.scales_and_zeros.nbytes for name, layer in layers.items()}
        linears = copies(linear, out * inp * 2)
        layers = {name: copies(layer, nbytes[name]) for name, layer in layers.items()}
        print(f"\n{label}")
        print(f"{'rows':>5} {'bf16':>16} {'int8 kernel':>16} {'int8 dequant':>16} {'int4 kernel':>16} {'int4 dequant':>16}")
        for rows in args.rows:
            x = torch.randn(rows, inp, dtype=torch.bfloat16)
            cells = [(best_ms(linears, x, args.repeat), out * inp * 2, False)]
            for name, limit in (("int8", INT8_LIMIT), ("int4", INT4_LIMIT)):
                modules.KERNELS = True  # with the row limits lifted: the kernel at every row count
                cells.append((best_ms(layers[name], x, args.repeat), nbytes[name], rows <= limit))
                modules.KERNELS = False
                cells.append((best_ms(layers[name], x, args.repeat), nbytes[name], rows > limit))
            modules.KERNELS = True
            line = "".join(f"{ms:>8.2f} ({nbytes / ms / 1e6:4.1f}){'*' if chosen else ' '}" for ms, nbytes, chosen in cells)
            print(f"{rows:>5} {line}")


if __name__ == "__main__":
    main()
