"""The full-size proof: a random-weight Yuan 2.0-M32 (24 layers, 32 experts, ~40B parameters) in int4,
written to disk without ever existing in bf16, loaded in a fresh process, 32 tokens decoded at batch 1.

Prints the weight-read line of this machine measured in the same run (best of an int64 sum, a bf16
and an int8 matrix-vector product over 1 GiB), the folder's size, the load time, resident memory
after loading and at its peak, decode tok/s, and the fraction of the line that decoding reaches:
bytes of weights read per token x tok/s / line. Targets (issue 12): peak RSS <= 22 GB, decode >= 60%
of the line. The folder (~21 GB at int4) is deleted at the end unless --keep.

    .venv/bin/python benchmarks/m32_full.py [--bits 4] [--layers 24] [--threads 1] [--dir /tmp] [--warm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_memory import rss_kib

GiB = 2**30


def weight_read_line(threads: int) -> dict[str, float]:
    """GB/s reading 1 GiB: an int64 sum, a bf16 and an int8 matrix-vector product (best of 5 each)."""
    torch.set_num_threads(threads)

    def best(fn, nbytes):
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return nbytes / min(times) / 1e9

    def bf16_matvec():
        w, x = torch.randn(GiB // (2 * 8192), 8192, dtype=torch.bfloat16), torch.randn(1, 8192, dtype=torch.bfloat16)
        return best(lambda: torch.nn.functional.linear(x, w), GiB)

    def int8_matvec():
        w = torch.randint(-127, 128, (GiB // 8192, 8192), dtype=torch.int8)
        x, scale = torch.randn(1, 8192, dtype=torch.bfloat16), torch.rand(GiB // 8192, dtype=torch.bfloat16)
        return best(lambda: torch._weight_int8pack_mm(x, w, scale), GiB)

    def int64_sum():
        ints = torch.randint(0, 2**40, (GiB // 8,), dtype=torch.int64)
        return best(lambda: ints.sum(), GiB)

    return {"int64 sum": int64_sum(), "bf16 matvec": bf16_matvec(), "int8 matvec": int8_matvec()}


def random_groups(config, q):
    """The tensors of a quantized folder, one group at a time, drawn at random directly in their
    stored form (random bytes are valid packed int4 codes): no float weight is ever made."""
    from yuanmoe.checkpoint import empty_model
    from yuanmoe.quant.convert import STORED_DTYPE
    from yuanmoe.quant.formats import native_buffer_names, native_plan

    shapes = {k: tuple(v.shape) for k, v in empty_model(config).state_dict().items() if k != "lm_head.weight"}
    shapes["lm_head.weight"] = shapes["embed_tokens.weight"]  # tied: the head's own int8 copy
    groups: dict[int | None, list[str]] = {}
    for name in shapes:
        groups.setdefault(int(name.split(".")[1]) if name.startswith("layers.") else None, []).append(name)
    for names in groups.values():
        out = {}
        for name in names:
            shape = shapes[name]
            plan = native_plan(name, shape, q)
            if plan is None:
                out[name] = (torch.ones(shape) if name.endswith("norm.weight") else
                             torch.zeros(shape) if name.endswith("bias") else torch.randn(shape) * 0.02).to(STORED_DTYPE)
                continue
            bits, group_size = plan
            *lead, rows, cols = shape
            qweight, sz = native_buffer_names(name)
            if bits == 4:
                out[qweight] = torch.randint(0, 256, (*lead, rows, cols // 2), dtype=torch.uint8)
            else:
                out[qweight] = torch.randint(-127, 128, (*lead, rows, cols), dtype=torch.int8)
            # Scales for weights of std ~0.02 (uniform codes: std 4.6 at 4 bits, 73 at 8), zeros 0.
            scales = torch.full((*lead, cols // group_size, rows, 1), 0.02 / (4.6 if bits == 4 else 73))
            out[sz] = torch.cat([scales, torch.zeros_like(scales)], dim=-1).to(STORED_DTYPE)
        yield out


def active_bytes(model) -> int:
    """Bytes of weights one decoded token reads: every non-expert weight (the embedding row aside)
    and top_k / num_experts of each layer's experts."""
    config = model.config
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name == "embed_tokens.weight":
            total += t[0].nbytes
        elif ".experts." in name:
            total += t.nbytes * config.top_k // config.num_experts
        else:
            total += t.nbytes
    return total


def child(folder: str, threads: int, new_tokens: int, warm: bool) -> None:
    """In a fresh process: load, prefill 8 tokens, decode new_tokens at batch 1 as pages come in
    from the file (cold); with `warm`, bring in every page of the weights and decode new_tokens more."""
    torch.set_num_threads(threads)
    from yuanmoe import from_pretrained

    before = rss_kib("VmRSS")
    start = time.perf_counter()
    model = from_pretrained(folder)
    load_s = time.perf_counter() - start
    after_load = rss_kib("VmRSS")
    times = {"cold": [], "warm": []} if warm else {"cold": []}
    touch_s = None
    # Greedy decoding of random weights repeats one token, whose hidden state picks the same two
    # experts in every layer at every step; feeding random tokens spreads the choices over the
    # experts as a real model's text does (same cost per step), and the chosen experts are counted.
    tokens = torch.randint(0, model.config.vocab_size, (1, 8 + 2 * new_tokens), generator=torch.Generator().manual_seed(0))
    used: set[tuple[int, int]] = set()
    with torch.inference_mode():
        cache = model.new_cache(1, 8 + 2 * new_tokens)
        model(tokens[:, :8], cache=cache, logits_to_keep=1)
        step = 8
        for phase in times:
            if phase == "warm":  # every page of the weights brought in: decoding from memory, not from disk
                start = time.perf_counter()
                for t in [*model.buffers(), *model.parameters()]:
                    t.detach().flatten().view(torch.uint8)[::4096].sum()  # one byte of every 4 KiB page
                touch_s = time.perf_counter() - start
            for _ in range(new_tokens):
                start = time.perf_counter()
                out = model(tokens[:, step:step + 1], cache=cache, logits_to_keep=1, output_router=True)
                out.logits.argmax(-1)  # what choosing the next token costs
                times[phase].append(time.perf_counter() - start)
                used.update((layer, e) for layer, r in enumerate(out.router_outputs) for e in r.experts.flatten().tolist())
                step += 1
    print(json.dumps({"load_s": load_s, "rss_after_load_gib": (after_load - before) * 1024 / GiB,
                      "peak_rss_gib": rss_kib("VmHWM") * 1024 / GiB, "token_s": times, "touch_s": touch_s,
                      "active_bytes": active_bytes(model), "experts_used": len(used),
                      "experts": model.config.num_layers * model.config.num_experts}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--layers", type=int, default=24, help="fewer than M32's 24 when the disk or memory is short")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 by default: on a shared, busy machine a second thread mostly waits for the first")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the folder")
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    parser.add_argument("--warm", action="store_true",
                        help="then bring every weight page into memory and decode as many tokens again")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.threads, args.new_tokens, args.warm)

    from yuanmoe import preset
    from yuanmoe.quant.convert import write_quantized
    from yuanmoe.quant.formats import NATIVE_METHOD, QuantConfig

    line = weight_read_line(args.threads)
    best_line = max(line.values())
    print("weight-read line (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in line.items()) + f"; best {best_line:.1f}")

    config = preset("yuan2-m32", num_layers=args.layers)
    q = QuantConfig(NATIVE_METHOD, args.bits, 128 if args.bits == 4 else 0)
    folder = Path(args.dir) / f"m32-int{args.bits}-{args.layers}l"
    try:
        start = time.perf_counter()
        write_quantized(folder, config, q, random_groups(config, q))
        write_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"wrote {folder}: {size / 1e9:.2f} GB in {write_s:.0f} s (writer peak RSS "
              f"{rss_kib('VmHWM') / 2**20:.2f} GiB)")
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--threads", str(args.threads),
                              "--new-tokens", str(args.new_tokens)] + ["--warm"] * args.warm,
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the decoding process failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    # Measured again after decoding: on a shared machine the line moves with the other jobs.
    after = weight_read_line(args.threads)
    print("weight-read line after decoding (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in after.items()))
    best_line = max(best_line, *after.values())
    matvec_line = max(line["bf16 matvec"], line["int8 matvec"], after["bf16 matvec"], after["int8 matvec"])
    phases = [(f"{args.new_tokens} tokens from a cold map", r["token_s"]["cold"])]
    if args.warm:
        print(f"bringing in every weight page took {r['touch_s']:.1f} s")
        phases.append((f"{args.new_tokens} more after bringing in every page", r["token_s"]["warm"]))
    for label, ts in phases:
        tok_s = len(ts) / sum(ts)
        fraction = r["active_bytes"] * tok_s / (best_line * 1e9)
        print(f"decode, {label}: {tok_s:.2f} tok/s, {r['active_bytes'] / 1e9:.2f} GB read per token = "
              f"{r['active_bytes'] * tok_s / 1e9:.1f} GB/s, {fraction:.0%} of the best line ({best_line:.1f} GB/s), "
              f"{fraction * best_line / matvec_line:.0%} of the best matrix-vector line ({matvec_line:.1f} GB/s)")
    print(f"experts chosen at least once: {r['experts_used']} of {r['experts']}")
    print(f"load {r['load_s']:.1f} s; RSS after load {r['rss_after_load_gib']:.2f} GiB "
          f"({r['rss_after_load_gib'] * GiB / size:.2f} x the weight files); peak RSS {r['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
