"""Quantized checkpoint folders: the official AutoGPTQ layout and this project's own, read into a model.

Both are recognised by a `quantize_config.json` beside `config.json`:

* AutoGPTQ (the released Yuan2-M32-HF-INT4 / -INT8): `quant_method` "gptq" (or absent), official
  config and names, weights in `{model_file_base_name}.safetensors`. Each quantized linear X has
  `X.qweight` int32 [in*bits/32, out], `X.qzeros` int32 [groups, out*bits/32] (zero point minus
  one), `X.scales` fp16 [groups, out], `X.g_idx` int32 [in]. They are decoded one layer at a time
  and repacked into the kernel layouts (the same number of bytes), never into float weights,
  except the routers' small [experts, hidden] matrices, which the routers read in fp32.
* This project's (written by `yuan quantize`): `quant_method` "yuanmoe", native config and names,
  one 64-byte-aligned safetensors shard per layer (`model.safetensors.index.json`) holding each
  quantized module's buffers exactly as the modules use them (`X.qweight`, `X.scales_and_zeros`;
  experts `experts.w1_qweight`...), so loading maps the files and the model computes from the
  mapped pages: nothing is copied. `from_gptq` marks one re-laid out from AutoGPTQ (same values),
  `head_bits` how the output head is held.

checkpoint.from_pretrained drives the loading; this module says which files and tensors a folder
must have and builds the quantized modules from one group of tensors at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, YuanConfig
from ..convert.official import CheckpointError, official_layer_to_native, official_shared_to_native
from .modules import QuantExperts, QuantLinear, check_shape, pack_codes
from .packing import BITS, dequantize, regular_group, unpack_gptq_rows, unpack_gptq_zeros

QUANT_CONFIG_FILE = "quantize_config.json"
NATIVE_METHOD = "yuanmoe"
# The stored weight layout of native folders: 2 = the kernels' tiles (packing.pack_tiles). Folders
# without it hold the layouts of PyTorch's own int4/int8 kernels, which this version no longer reads.
NATIVE_LAYOUT = 2
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
# The linears the official AutoGPTQ recipe (auto_gptq/modeling/yuan.py) quantizes.
_GPTQ_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.gate\.(query|key|value)"
                          r"|mlp\.experts\.\d+\.w[12])\.weight")
_EXPERTS = re.compile(r"(layers\.\d+\.mlp\.experts)\.(w[12])")
_GPTQ_NATIVE = re.compile(r"layers\.\d+\.self_attn\.[qkvo]_proj\.weight")  # and the experts


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq" or "yuanmoe"
    bits: int
    group_size: int  # columns per group; 0 = one group per output row
    symmetric: bool = True
    desc_act: bool = False
    file_base: str = "model"
    # A folder re-laid out from an AutoGPTQ one: its quantized linears and nothing else, values kept.
    from_gptq: bool = False
    head_bits: int = 8  # the output head: 8 (one scale per row), 4 (groups as the rest) or 0 (kept)

    @property
    def own_head(self) -> bool:
        """Whether a model with tied embeddings gets a quantized copy of the embedding as its head."""
        return self.method == NATIVE_METHOD and not self.from_gptq and self.head_bits > 0

    @property
    def weight_files(self) -> tuple[str, ...]:
        return (f"{self.file_base}.safetensors.index.json", f"{self.file_base}.safetensors")

    def describe(self) -> str:
        groups = f"group size {self.group_size}" if self.group_size else "one scale per output row"
        return f"{self.method} {self.bits}-bit, {groups}, {'symmetric' if self.symmetric else 'asymmetric'}"

    def to_json(self) -> str:
        return json.dumps({"quant_method": self.method, "bits": self.bits, "group_size": self.group_size,
                           "sym": self.symmetric, "from_gptq": self.from_gptq, "head_bits": self.head_bits,
                           "layout": NATIVE_LAYOUT},
                          indent=2) + "\n"


def read_quant_config(folder: Path) -> QuantConfig | None:
    """The folder's quantize_config.json, or None for an unquantized checkpoint. Refuses, in one
    sentence, what no loader here can compute exactly."""
    file = folder / QUANT_CONFIG_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        method = data.get("quant_method", "gptq")
        bits, group_size = int(data["bits"]), int(data.get("group_size", -1))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"{file} is not a valid quantization config (a JSON object with bits and group_size)") \
            from None
    if method not in ("gptq", NATIVE_METHOD):
        raise ConfigError(f"{file} asks for quant_method {method!r}; only gptq (AutoGPTQ) and {NATIVE_METHOD} "
                          f"folders can be loaded")
    if bits not in BITS:
        raise ConfigError(f"{file} holds {bits}-bit weights; only 4- and 8-bit checkpoints can be loaded "
                          f"(re-quantize the model with bits 4 or 8)")
    if data.get("is_marlin_format") or data.get("checkpoint_format", "gptq") != "gptq":
        raise ConfigError(f"{file} describes a repacked (Marlin/other) GPTQ layout; load the plain AutoGPTQ "
                          f"checkpoint instead")
    if method == NATIVE_METHOD and data.get("layout") != NATIVE_LAYOUT:
        raise ConfigError(f"{file}: this folder was written by an older yuanmoe, in a weight layout this version "
                          f"no longer reads; run `yuan quantize` again on the checkpoint it was made from")
    base = data.get("model_file_base_name") or (f"gptq_model-{bits}bit-{group_size}g" if method == "gptq"
                                                else "model")
    return QuantConfig(method, bits, max(group_size, 0), bool(data.get("sym", True)),
                       bool(data.get("desc_act", False)), base, bool(data.get("from_gptq", False)),
                       int(data.get("head_bits", 8)))


# ------------------------------------------------------------------------------ expected tensors
def native_plan(name: str, shape: tuple, q: QuantConfig) -> tuple[int, int] | None:
    """(bits, group_size) at which `yuan quantize` stores native tensor `name`, None to keep it
    as is. Every linear weight and the experts are quantized at the requested bits, except the
    routers (kept: tiny, and their expert choice is sensitive); a weight whose shape the requested
    layout cannot hold, and the output head, get 8 bits with one scale per output row (the head:
    unless head_bits says 4, or 0 to keep it), or are kept where the tiled layout cannot hold them
    at all. A folder
    re-laid out from AutoGPTQ holds what AutoGPTQ quantized (attention and experts) and nothing
    else (its routers arrive dequantized)."""
    experts = _EXPERTS.fullmatch(name)
    if q.from_gptq:
        return (q.bits, q.group_size or shape[-1]) if experts or _GPTQ_NATIVE.fullmatch(name) else None
    linear = name.endswith(".weight") and len(shape) == 2 and not name.endswith("norm.weight")
    if ".router." in name or name == "embed_tokens.weight" or not (experts or linear):
        return None
    out, inp = shape[-2:]
    if name == "lm_head.weight" and q.head_bits != 4:
        return _fits(out, inp, 8, inp) if q.head_bits == 8 else None
    return _fits(out, inp, q.bits, q.group_size or inp) or _fits(out, inp, 8, inp)


def _fits(out: int, inp: int, bits: int, group_size: int) -> tuple[int, int] | None:
    try:
        check_shape(out, inp, bits, group_size)
        return bits, group_size
    except ValueError:
        return None


def native_buffer_names(name: str) -> tuple[str, str]:
    experts = _EXPERTS.fullmatch(name)
    stem = f"{experts.group(1)}.{experts.group(2)}_" if experts else name[: -len("weight")]
    return stem + "qweight", stem + "scales_and_zeros"


def expected_shapes(expected: dict[str, tuple], config: YuanConfig, q: QuantConfig) -> dict[str, tuple]:
    """Map the names and shapes an unquantized folder of this config would hold (official names
    for GPTQ, native ones otherwise) to those the quantized folder holds."""
    if config.tie_word_embeddings and q.own_head:
        expected = {**expected, "lm_head.weight": expected["embed_tokens.weight"]}  # the head gets its own copy
    out: dict[str, tuple] = {}
    for name, shape in expected.items():
        if q.method == "gptq":
            if _GPTQ_LINEAR.fullmatch(name):
                rows, cols = shape
                groups = -(-cols // (q.group_size or cols))  # AutoGPTQ's last group may be shorter
                stem = name[: -len("weight")]
                # AutoGPTQ packs columns and zero points in whole blocks of 32, dropping a partial last one.
                out.update({stem + "qweight": (cols // 32 * q.bits, rows), stem + "qzeros": (groups, rows // 32 * q.bits),
                            stem + "scales": (groups, rows), stem + "g_idx": (cols,)})
            else:
                out[name] = shape
            continue
        plan = native_plan(name, shape, q)
        if plan is None:
            out[name] = shape
            continue
        bits, group_size = plan
        *lead, rows, cols = shape
        group_size = regular_group(cols, group_size)
        qweight, sz = native_buffer_names(name)
        out[qweight] = (*lead, rows, cols // 2 if bits == 4 else cols)
        out[sz] = (*lead, cols // group_size, rows, 2)
    return out


# ------------------------------------------------------------------------------ loading a group
def install_group(model: nn.Module, tensors: dict[str, torch.Tensor], layer: int | None, config: YuanConfig,
                  q: QuantConfig, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Put the quantized modules of one group of tensors (the shared ones, or one layer) into
    `model` and return the remaining plain tensors under native names, for load_state_dict."""
    if q.method == "gptq":
        # AutoGPTQ zero points may be anything: read them rather than trust `sym`.
        return _install_native(model, gptq_to_native(tensors, layer, config, q, dtype, device), None, dtype, device)
    return _install_native(model, tensors, q.symmetric or None, dtype, device)


def _to(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    # A no-op for mapped tensors already in the right dtype and place: they stay views of the file.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _install_native(model, tensors, symmetric: bool | None, dtype, device) -> dict[str, torch.Tensor]:
    plain = dict(tensors)
    for name in [n for n in tensors if n.endswith("qweight")]:
        stem = name[: -len("qweight")]
        qweight, sz = _to(plain.pop(name), dtype, device), _to(plain.pop(stem + "scales_and_zeros"), dtype, device)
        bits = 8 if qweight.dtype == torch.int8 else 4
        if stem.endswith(("w1_", "w2_")):  # experts: wait for both halves
            continue
        module = QuantLinear(qweight, sz, bits, _pop_bias(plain, stem, dtype, device), symmetric)
        _replace(model, stem[:-1], module)
    for name in [n for n in tensors if n.endswith("w1_qweight")]:
        path = name[: -len(".w1_qweight")]
        parts = {f"{w}_{part}": _to(tensors[f"{path}.{w}_{part}"], dtype, device)
                 for w in ("w1", "w2") for part in ("qweight", "scales_and_zeros")}
        _replace(model, path, QuantExperts(parts, 8 if parts["w1_qweight"].dtype == torch.int8 else 4, symmetric))
    return {k: _to(t, dtype, device) for k, t in plain.items()}


def _pop_bias(plain: dict, stem: str, dtype, device) -> torch.Tensor | None:
    bias = plain.pop(stem + "bias", None)
    return None if bias is None else _to(bias, dtype, device)


def gptq_to_native(tensors: dict[str, torch.Tensor], layer: int | None, config: YuanConfig, q: QuantConfig,
                   dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
    """One group of an AutoGPTQ folder as the tensors this project's quantized folder holds for it:
    native names, the kernels' layouts (the same bytes as the file's), the routers' weights in fp32."""
    if layer is None:  # the embedding, the final norm and the head are not quantized
        return official_shared_to_native({k: _to(t, dtype, device) for k, t in tensors.items()}, config)
    codes_src = {k: _to(t, dtype, device) for k, t in tensors.items() if k.rsplit(".", 1)[-1] not in GPTQ_PARTS}
    sz_src = dict(codes_src)
    for stem in sorted(k[: -len("qweight")] for k in tensors if k.endswith(".qweight")):
        codes, sz = decode_gptq(tensors, stem, q)
        codes_src[stem + "weight"] = codes.to(device)
        sz_src[stem + "weight"] = sz.transpose(0, 1).flatten(1).to(device)  # out first, as the converter expects
    # The official converter permutes q/k heads and stacks experts along the output rows: apply it
    # to the codes and, separately, to the scales and zeros.
    codes, sz = official_layer_to_native(codes_src, config, layer), official_layer_to_native(sz_src, config, layer)
    out = {}
    for name, c in codes.items():
        if c.dtype != torch.uint8:
            out[name] = c
            continue
        s = _scales_and_zeros(sz[name])
        if ".router." in name:  # small, and read in fp32 by the router: kept exact
            out[name] = dequantize(c, s, q.bits, torch.float32)
            continue
        qweight, scales_and_zeros = native_buffer_names(name)
        out[qweight], out[scales_and_zeros] = pack_codes(c, q.bits), s.to(dtype)
    return out


def _scales_and_zeros(flat: torch.Tensor) -> torch.Tensor:
    """[..., out, groups * 2] (as converted) -> [..., groups, out, 2], the kernels' layout."""
    return flat.unflatten(-1, (-1, 2)).transpose(-3, -2).contiguous()


def decode_gptq(tensors: dict[str, torch.Tensor], stem: str, q: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One AutoGPTQ linear -> codes uint8 [out, in] and scales_and_zeros fp32 [groups, out, 2]."""
    qweight, qzeros, scales, g_idx = (tensors[stem + part] for part in GPTQ_PARTS)
    codes = unpack_gptq_rows(qweight, q.bits)
    rows, cols = codes.shape[0], g_idx.numel()
    if codes.shape[1] != cols:
        raise CheckpointError(f"{stem}qweight holds {codes.shape[1]} of the layer's {cols} input columns: AutoGPTQ "
                              f"packs them in blocks of 32 and dropped the rest, so this layer cannot be decoded; "
                              f"quantize a model whose widths are multiples of 32")
    group_size = q.group_size or cols
    if not torch.equal(g_idx.long(), torch.arange(cols, device=g_idx.device) // group_size):
        why = "desc_act (act-order) with a permuted g_idx" if q.desc_act else "a g_idx that is not row // group_size"
        raise CheckpointError(f"{stem}g_idx: this GPTQ checkpoint uses {why}, which this loader does not "
                              f"support; quantize it with desc_act false")
    groups = -(-cols // group_size)
    if scales.shape[0] != groups:
        raise CheckpointError(f"{stem}scales: {scales.shape[0]} groups for {cols} input columns in groups of "
                              f"{group_size} (expected {groups}); the folder is damaged or its quantize_config.json "
                              f"is not the one it was written with")
    scale = scales.float()
    zero_point = unpack_gptq_zeros(qzeros, q.bits)[:, :rows].float()
    mid = 2 ** (q.bits - 1)
    if zero_point.shape[1] < rows:  # AutoGPTQ kept whole blocks of 32 zero points only
        if not q.symmetric:
            raise CheckpointError(f"{stem}qzeros holds the zero points of {zero_point.shape[1]} of the layer's "
                                  f"{rows} outputs (AutoGPTQ drops a partial block of 32), and the folder is not "
                                  f"symmetric, so the others are unknown; this layer cannot be decoded")
        zero_point = torch.cat([zero_point, zero_point.new_full((groups, rows - zero_point.shape[1]), mid)], dim=1)
    sz = torch.stack([scale, scale * (mid - zero_point)], dim=-1)
    regular = regular_group(cols, group_size)
    if regular != group_size:  # AutoGPTQ's shorter last group: the same scales over narrower, even groups
        sz = sz[torch.arange(cols // regular, device=sz.device) * regular // group_size]
    return codes, sz


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
