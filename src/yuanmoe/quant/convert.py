"""`yuan quantize SRC OUT --bits 8|4 [--group-size N]`: write a quantized folder every command loads.

The source (native or official, unquantized) is read one layer at a time and each layer is
quantized and written to its own shard before the next is read, so the whole model is never in
memory: peak memory is about one source layer. The folder (formats.py) holds native config and
names plus `quantize_config.json`; it loads memory-mapped, computing from the file's pages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import YuanConfig
from .formats import NATIVE_METHOD, QUANT_CONFIG_FILE, QuantConfig, native_buffer_names, native_plan, read_quant_config
from .modules import quantize_weight

STORED_DTYPE = torch.bfloat16  # the unquantized tensors and the scales


ALIGN = 64  # tensors start on cache lines: the kernels stream them from the mapped pages


def quantize_checkpoint(src: str | Path, out: str | Path, bits: int | None = None, group_size: int | None = None,
                        symmetric: bool = True, head_bits: int = 8) -> Path:
    """Quantize checkpoint folder `src` into folder `out` (written atomically). bits None: 4.
    group_size None: 128 at 4 bits, one group per output row at 8 bits (the fastest int8 kernel, and
    accurate enough). An AutoGPTQ folder (the official INT4/INT8) keeps its bits, groups and values,
    re-laid out so that it loads memory-mapped (its other tensors kept as they are)."""
    from ..checkpoint import _checkpoint_folder, iter_weights
    from ..tokenizer import load_tokenizer

    gptq = read_quant_config(_checkpoint_folder(src))
    gptq = gptq if gptq is not None and gptq.method == "gptq" else None  # iter_weights refuses our own
    if gptq is not None:
        if (bits or gptq.bits, gptq.group_size if group_size is None else group_size) != (gptq.bits, gptq.group_size):
            raise ValueError(f"{src} is an AutoGPTQ checkpoint of {gptq.bits} bits in groups of {gptq.group_size}; "
                             f"it keeps them (leave out --bits and --group-size)")
        bits, group_size, symmetric = gptq.bits, gptq.group_size, gptq.symmetric
    bits = bits or 4
    if bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8, got {bits}")
    if group_size is not None and group_size < 0:
        raise ValueError(f"--group-size must be positive (or 0 for one group per output row), got {group_size}")
    from_gptq = gptq is not None
    if head_bits not in (0, 4, 8):
        raise ValueError(f"--head-bits must be 0 (keep the head), 4 or 8, got {head_bits}")
    q = QuantConfig(NATIVE_METHOD, bits, (128 if bits == 4 else 0) if group_size is None else group_size, symmetric,
                    from_gptq=from_gptq, head_bits=head_bits)
    # An AutoGPTQ source keeps its fp16 scales and tensors: exactly its values.
    config, groups = iter_weights(src, torch.float16 if from_gptq else None)
    try:
        tokenizer = load_tokenizer(src)
    except FileNotFoundError:
        tokenizer = None
    quantized = (quantize_group(state, config, q) for _, state in groups)
    return write_quantized(out, config, q, quantized, tokenizer)


def quantize_group(state: dict[str, torch.Tensor], config: YuanConfig, q: QuantConfig) -> dict[str, torch.Tensor]:
    """One group of native tensors -> the tensors a quantized folder holds for them."""
    if config.tie_word_embeddings and "embed_tokens.weight" in state and q.own_head:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}  # the head gets its own copy
    out = {}
    for name, t in state.items():
        if name.endswith(("qweight", "scales_and_zeros")):  # quantized already (an AutoGPTQ source)
            out[name] = t
            continue
        plan = native_plan(name, tuple(t.shape), q)
        if plan is None:
            out[name] = t if q.from_gptq else t.to(STORED_DTYPE)
            continue
        qweight, sz = native_buffer_names(name)
        out[qweight], out[sz] = quantize_weight(t, *plan, q.symmetric, STORED_DTYPE, name)
    return out


def write_quantized(path: str | Path, config: YuanConfig, q: QuantConfig, groups: Iterable[dict[str, torch.Tensor]],
                    tokenizer=None) -> Path:
    """Write a quantized folder from its tensor groups (shared tensors and one per layer, in any
    order), each group its own shard written as it arrives."""
    from ..checkpoint import CONFIG_FILE, check_tokenizer_fits, writing_folder

    path = Path(path)
    if tokenizer is not None:
        check_tokenizer_fits(config, tokenizer)
    total = config.num_layers + 1
    weight_map: dict[str, str] = {}
    size = 0
    with writing_folder(path) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        (tmp / QUANT_CONFIG_FILE).write_text(q.to_json())
        for i, tensors in enumerate(tqdm(groups, total=total, desc="quantizing", unit="group", disable=None)):
            file = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            save_aligned(tensors, tmp / file)
            weight_map.update(dict.fromkeys(tensors, file))
            size += sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}


def save_aligned(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write a safetensors file whose tensors start at multiples of ALIGN bytes (those whose sizes
    are multiples of it; the others go last). The weight-only kernels read memory-mapped tensors in
    place and some of them fault on unaligned weights; safetensors' own writer packs tensors without
    regard to alignment."""
    order = sorted(tensors, key=lambda k: tensors[k].nbytes % ALIGN != 0)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data starts aligned too
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            f.write(tensors[name].detach().contiguous().flatten().view(torch.uint8).numpy().data)


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write an int8 or int4 weight-only copy of a checkpoint",
                       description="Quantize a checkpoint folder (native or official) one layer at a time into a "
                                   "folder that generate, chat, serve, eval and from_pretrained load memory-mapped. "
                                   "An official AutoGPTQ folder (Yuan2-M32-HF-INT4/INT8) is re-laid out, values kept.")
    p.add_argument("src", metavar="SRC", help="the unquantized checkpoint folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (replaced if it is a checkpoint folder)")
    p.add_argument("--bits", type=int, choices=(4, 8), help="4 (the default) or 8; an AutoGPTQ SRC keeps its own")
    p.add_argument("--group-size", type=int,
                   help="input columns per scale (default: 128 at 4 bits, a whole row at 8 bits; 0 = a whole row)")
    p.add_argument("--asymmetric", action="store_true", help="a zero point per group as well as a scale")
    p.add_argument("--head-bits", type=int, choices=(0, 4, 8), default=8,
                   help="the output head: 8 (the default, one scale per row), 4, or 0 to keep it (tied: the embedding)")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    out = quantize_checkpoint(args.src, args.out, args.bits, args.group_size, not args.asymmetric, args.head_bits)
    print(f"wrote {out}")
    return 0
