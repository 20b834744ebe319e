"""Yuan 2.0-M32's layer shapes on this CPU, the project against llama.cpp in one window.

Writes a random-weight quantized folder of M32 with --layers layers (int4 group 128 or int8 per row,
the int8 head, as `yuan quantize` writes them), loads it in a fresh process per thread count, brings
every weight page into memory, and measures time to first token (one prefill of each --prompts
length) and decode tok/s at batch 1, feeding random tokens so that the routing spreads over the
experts as real text does (YUANMOE_CPU_KERNEL=avx2 runs another kernel than this CPU's best). Where llama.cpp's `llama-bench` is found (--llama-bench, $LLAMA_BENCH
or PATH) and the same-shape GGUF exists (--gguf; ../shared/tools/llamacpp_anchor/ says how to build
both), it runs llama-bench at the same bits, layers and threads right after, and prints each side's
tok/s and the ratio project / llama.cpp. Without it, the project's side and this machine's
weight-read line.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py --bits 4 --layers 4 --threads 1 2 \\
        --llama-bench /path/to/llama-bench --gguf m32-4l-q4_0.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from m32_full import active_bytes, random_groups, weight_read_line  # noqa: E402


def child(folder: str, threads: int, prompts: list[int], new_tokens: int, dtype: str) -> None:
    """In a fresh process: load, touch every weight page, time each prefill and then decoding."""
    torch.set_num_threads(threads)
    from yuanmoe import from_pretrained
    from yuanmoe.quant import kernels

    model = from_pretrained(folder, dtype=dtype)
    for t in [*model.buffers(), *model.parameters()]:
        t.detach().flatten().view(torch.uint8)[::4096].sum()  # one byte of every 4 KiB page
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ttft = {}
    with torch.inference_mode():
        for n in prompts:
            tokens = torch.randint(0, vocab, (1, n), generator=gen)
            cache = model.new_cache(1, n)
            model(tokens[:, :8], cache=model.new_cache(1, 8), logits_to_keep=1)  # warm-up
            start = time.perf_counter()
            model(tokens, cache=cache, logits_to_keep=1).logits.argmax(-1)
            ttft[n] = time.perf_counter() - start
        tokens = torch.randint(0, vocab, (1, 8 + new_tokens + 4), generator=gen)
        cache = model.new_cache(1, tokens.shape[1])
        model(tokens[:, :8], cache=cache, logits_to_keep=1)
        for step in range(8, 12):  # warm-up steps
            model(tokens[:, step:step + 1], cache=cache, logits_to_keep=1)
        start = time.perf_counter()
        for step in range(12, 12 + new_tokens):
            model(tokens[:, step:step + 1], cache=cache, logits_to_keep=1).logits.argmax(-1)
        decode_s = (time.perf_counter() - start) / new_tokens
    print(json.dumps({"ttft_s": ttft, "decode_tok_s": 1 / decode_s, "active_bytes": active_bytes(model),
                      "kernel": kernels.describe(), "dtype": str(model.embed_tokens.weight.dtype)}))


def llama_bench(binary: str, gguf: str, threads: int, prompt: int, new_tokens: int) -> dict[str, float]:
    """llama-bench's prefill (pp) and decode (tg) tok/s at these threads."""
    out = subprocess.run([binary, "-m", gguf, "-p", str(prompt), "-n", str(new_tokens), "-t", str(threads),
                          "-r", "2", "-o", "json"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"llama-bench failed:\n{out.stderr[-2000:]}")
    rows = json.loads(out.stdout)
    return {"prefill": next(r["avg_ts"] for r in rows if r["n_prompt"]),
            "decode": next(r["avg_ts"] for r in rows if r["n_gen"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, nargs="+", default=[512], help="prefill lengths (TTFT)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench"))
    parser.add_argument("--gguf", help="the same-shape GGUF (make_gguf.py --type q4_0/q8_0 --layers N)")
    parser.add_argument("--dtype", default="auto", help="the model's activations (auto: as from_pretrained)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.threads[0], args.prompts, args.new_tokens, args.dtype)

    from yuanmoe import preset
    from yuanmoe.device import cpu_flags
    from yuanmoe.quant.convert import write_quantized
    from yuanmoe.quant.formats import NATIVE_METHOD, QuantConfig

    anchor = args.llama_bench and args.gguf and Path(args.gguf).is_file()
    if args.llama_bench and not anchor:
        print(f"llama-bench found but no GGUF (--gguf): write one with ../shared/tools/llamacpp_anchor/make_gguf.py "
              f"--type q{args.bits}_0 --layers {args.layers}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in cpu_flags()]
    print(f"CPU: {cpu}; {os.cpu_count()} cores; flags {' '.join(isa) or '-'}; torch {torch.__version__}")
    config = preset("yuan2-m32", num_layers=args.layers)
    q = QuantConfig(NATIVE_METHOD, args.bits, 128 if args.bits == 4 else 0)
    folder = Path(args.dir) / f"m32-int{args.bits}-{args.layers}l-bench"
    results = []
    try:
        write_quantized(folder, config, q, random_groups(config, q))
        os.sync()  # dirty pages written back now, not while decoding is timed
        for threads in args.threads:
            line = max(weight_read_line(threads).values())
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--threads", str(threads),
                                  "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
                                  "--prompts", *map(str, args.prompts)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"the decoding process failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ref = llama_bench(args.llama_bench, args.gguf, threads, args.prompts[0], 64) if anchor else None
            results.append((threads, line, r, ref))
            if threads == args.threads[0]:
                print(f"{r['kernel']}; activations {r['dtype']}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\nM32 shapes, {args.layers} layers, int{args.bits} (llama.cpp Q{args.bits}_0), batch 1")
    head = f"{'threads':>7} {'read line GB/s':>14} {'decode tok/s':>12} {'of line':>7}"
    head += f" {'llama.cpp':>9} {'ratio':>6}" if anchor else ""
    for n in args.prompts:
        head += f" {'TTFT ' + str(n):>10} {'prefill tok/s':>13}"
        head += f" {'llama.cpp':>9} {'ratio':>6}" if anchor and n == args.prompts[0] else ""
    print(head)
    for threads, line, r, ref in results:
        row = f"{threads:>7} {line:>14.1f} {r['decode_tok_s']:>12.2f} {r['active_bytes'] * r['decode_tok_s'] / 1e9 / line:>7.0%}"
        row += f" {ref['decode']:>9.2f} {r['decode_tok_s'] / ref['decode']:>6.2f}" if ref else ""
        for n in args.prompts:
            s = r["ttft_s"][str(n)]
            row += f" {s:>9.2f}s {n / s:>13.1f}"
            row += f" {ref['prefill']:>9.1f} {n / s / ref['prefill']:>6.2f}" if ref and n == args.prompts[0] else ""
        print(row)
    print(f"(weights read per decoded token: {results[0][2]['active_bytes'] / 1e9:.3f} GB)")


if __name__ == "__main__":
    main()
