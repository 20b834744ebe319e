"""Memory of a long prompt: prefill L tokens into the decode cache, then decode a few, at 4K/8K/16K.

Each run is a fresh process (so each peak RSS is that run's own), on the small preset stretched to a
16K context. "causal" is the path a one-document prompt takes (SDPA's causal kernel, no mask);
"masked" forces the general path (an [L, L] boolean mask per row, as every cached prefill built
before), for comparison at the lengths where it fits. The KV cache itself is linear in L.

    .venv/bin/python benchmarks/long_context.py [--lengths 4096 8192 16384] [--masked-up-to 8192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from checkpoint_memory import rss_kib


def child(length: int, path: str) -> None:
    import torch

    from yuanmoe import YuanForCausalLM, preset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = YuanForCausalLM(preset("small", max_position_embeddings=16384)).eval()
    if path == "masked":
        check = YuanForCausalLM._check_inputs
        YuanForCausalLM._check_inputs = lambda *a: check(*a) and False
    ids = torch.randint(0, model.config.vocab_size, (1, length - 8))  # + 8 decoded = length
    before = rss_kib("VmRSS")
    with torch.inference_mode():
        cache = model.new_cache(1, length)
        start = time.perf_counter()
        logits = model(ids, cache=cache, logits_to_keep=1).logits
        prefill = time.perf_counter() - start
        for _ in range(8):
            logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
    cache_bytes = sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v, *cache.lfa])
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - before) / 1024, "cache_mib": cache_bytes / 2**20,
                      "prefill_s": prefill}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--masked-up-to", type=int, default=8192, help="longest prompt run on the masked path")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), args.child[1])
    print(f"{'tokens':>7} {'path':>7} {'peak MiB over model':>20} {'of which KV cache':>18} {'prefill s':>10}")
    for length in args.lengths:
        for path in ("causal", "masked"):
            if path == "masked" and length > args.masked_up_to:
                continue
            out = subprocess.run([sys.executable, __file__, "--child", str(length), path],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{length:>7} {path:>7} {r['peak_mib']:>20.0f} {r['cache_mib']:>18.0f} {r['prefill_s']:>10.1f}")


if __name__ == "__main__":
    main()
