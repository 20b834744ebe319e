"""Peak memory of loading a checkpoint: (peak RSS - RSS before loading) / bytes of the loaded weights.

Saves a few-hundred-MB model in the native and the official format, then loads each in a fresh
process (so every peak is that load's own). The baseline, in the same way, is the eager approach:
build the model with random weights, read the whole file, convert, load_state_dict.

    .venv/bin/python benchmarks/checkpoint_memory.py [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, folder: str) -> None:
    import torch

    from yuanmoe import YuanForCausalLM, from_pretrained
    from yuanmoe.checkpoint import load_config

    config, _ = load_config(folder)
    before = rss_kib("VmRSS")
    if mode == "eager":
        from safetensors.torch import load_file

        from yuanmoe.convert.official import official_to_native

        model = YuanForCausalLM(config)
        model.load_state_dict(official_to_native(load_file(Path(folder) / "model.safetensors"), config), strict=False)
    else:
        model = from_pretrained(folder, dtype=torch.bfloat16 if mode.endswith("bf16") else None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_over_weights": (rss_kib("VmHWM") - before) * 1024 / weights, "weights": weights}))


def measure(mode: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="layers of the test model (about 50 MB each in fp32)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    import torch

    from yuanmoe import YuanForCausalLM, preset, save_pretrained

    # Half of M32's layers, its expert count over a narrow width: ~660 MB in fp32 at 12 layers.
    config = preset("small", vocab_size=32000, hidden_size=384, num_layers=args.layers, num_heads=6,
                    attention_projection_size=384, num_experts=16, ffn_hidden_size=640)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            model = YuanForCausalLM(config)
        save_pretrained(model, Path(tmp) / "native")
        save_pretrained(model, Path(tmp) / "official", fmt="official")
        del model
        eager = measure("eager", Path(tmp) / "official")
        print(f"model: {eager['weights'] / 1e6:.0f} MB of fp32 weights ({config.num_layers} layers, "
              f"{config.num_experts} experts)")
        print(f"{'eager load (baseline)':34s} peak RSS / weights {eager['peak_over_weights']:.2f}")
        for mode, label in [("native", "from_pretrained native"), ("official", "from_pretrained official"),
                            ("official-bf16", "from_pretrained official -> bf16")]:
            r = measure(mode, Path(tmp) / mode.split("-")[0])
            print(f"{label:34s} peak RSS / weights {r['peak_over_weights']:.2f}  "
                  f"({r['peak_over_weights'] / eager['peak_over_weights']:.2f}x baseline)")


if __name__ == "__main__":
    main()
