"""Checkpoint folders: save a model in this project's format or the official one, load either.

Run checkpoints (`checkpoints/step-N` of a training run, any world size) load here too: see
distributed/checkpoint.py.

Native format: `config.json` (YuanConfig JSON) + `model.safetensors` (this project's tensor names;
the tied lm_head is not stored) + tokenizer files. Official format (Yuan2-M32-hf): official
`config.json` (it has `model_type`) + tensors under official names, in `.safetensors` or `.bin`
files, single or sharded with an index JSON; convert/official.py maps the two.

Quantized folders (this project's `yuan quantize` output, the official AutoGPTQ INT4/INT8) have a
`quantize_config.json`; quant/formats.py says what they hold and builds their modules, the former
left memory-mapped.

Loading is lazy and memory-safe: the model is built on the meta device, the weight files are
memory-mapped, and each group of tensors (the embedding and final norm, then one layer at a time)
is read, converted, cast to the requested dtype and assigned in place of the meta parameters
before the next group is mapped. Peak memory is one copy of the model plus one layer.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .config import ConfigError, YuanConfig
from .convert.official import (CheckpointError, config_from_official, config_to_official, native_to_official,
                               official_layer_to_native, official_shared_to_native)
from .utils import writing_folder as _output_folder
from .device import auto_dtype, dtype_name, resolve_device, resolve_dtype
from .model import YuanForCausalLM
from .model.attention import rope_description
from .quant import kernels
from .quant.formats import QuantConfig, expected_shapes, gptq_to_native, install_group, read_quant_config
from .quant.modules import DEFAULT_ACTIVATIONS, set_activations

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FORMATS = ("native", "official")
# Weight files in the order they are looked for; an index JSON names the shards of a sharded checkpoint.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")
# Official checkpoints may carry RoPE tables as buffers; they are recomputed, never loaded.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------- saving
def save_pretrained(model: YuanForCausalLM, path: str | Path, tokenizer=None, fmt: str = "native",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a self-contained checkpoint folder (config, weights, tokenizer files). The folder is
    built under a temporary name beside `path` and renamed into place, so `path` never holds a
    half-written checkpoint; an existing checkpoint folder at `path` is replaced."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    config = model.config
    state = {k: v for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    if fmt == "official":
        config_text = json.dumps(config_to_official(config), indent=2) + "\n"
        tensors = native_to_official(state, config)
    else:
        config_text = config.to_json()
        tensors = state
    if tokenizer is not None:
        check_tokenizer_fits(config, tokenizer)
    with writing_folder(path) as tmp:
        (tmp / CONFIG_FILE).write_text(config_text)
        _write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def check_tokenizer_fits(config: YuanConfig, tokenizer) -> None:
    """A checkpoint is written with a tokenizer only if that tokenizer can be the model's: all its ids
    inside the model's vocabulary, and the same <eod> (where generation stops), <sep> and <pad>."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer to attach has {tokenizer.vocab_size} tokens but the model's vocabulary "
                              f"holds {config.vocab_size}, so it is another model's tokenizer; attach the one the "
                              f"model was trained with (--tokenizer)")
    differ = [f"<{name}> is token {ours} in the tokenizer but {theirs} in the model config"
              for name, ours, theirs in (("eod", tokenizer.eod_id, config.eod_token_id),
                                         ("sep", tokenizer.sep_id, config.sep_token_id),
                                         ("pad", tokenizer.pad_id, config.pad_token_id)) if ours != theirs]
    if differ:
        raise CheckpointError(f"the tokenizer to attach does not belong to the model: {'; '.join(differ)}; attach "
                              f"the one the model was trained with (--tokenizer)")


def writing_folder(path: Path):
    """Where a checkpoint folder is built (utils.writing_folder): `path` never holds half a checkpoint."""
    return _output_folder(path, CONFIG_FILE, "checkpoint")


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, names in zip(tqdm(files, desc="saving", unit="shard", disable=None), shards):
        # Cloning one shard at a time gives every tensor its own storage (safetensors refuses views
        # such as per-expert slices or the tied head) without copying the whole model at once.
        shard = {n: tensors[n].detach().to("cpu").contiguous().clone() for n in names}
        save_file(shard, folder / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- loading
def load_config(path: str | Path) -> tuple[YuanConfig, str]:
    """The model config of a checkpoint folder and its format, "native" or "official"."""
    folder = _checkpoint_folder(path)
    try:
        data = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{folder / CONFIG_FILE} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if "model_type" in data:
        return config_from_official(data), "official"
    return YuanConfig.from_dict(data), "native"


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu", activations: str | None = None) -> YuanForCausalLM:
    """Load a native or official checkpoint folder; returns the model in eval mode. dtype None
    keeps the dtype the weights are stored in (names as `--dtype` takes them: float32, bf16, auto...;
    a quantized folder's default is auto: bf16 only where the hardware computes it natively);
    device is cpu, cuda, cuda:N or auto (CUDA when present), and the weights go straight there.
    activations: how quantized weights take their input on the CPU, "int8" (the default, as
    llama.cpp) or "float" (exact); see quant/kernels.py."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = _checkpoint_folder(path)
    config, fmt = load_config(folder)
    if (folder / ".metadata").is_file():  # a training run's checkpoint (DCP shards) of any world size
        from .distributed.checkpoint import load_weights
        from .training.lora import adapter_record

        if adapter_record(folder) is not None:  # LoRA adapters: on top of their base, folded in
            return load_adapted(folder, dtype=dtype, device=device)

        model = YuanForCausalLM(config)
        load_weights(folder, model)
        check_finite(model.state_dict(), folder)
        return model.to(device=device, dtype=dtype).eval()
    quant = read_quant_config(folder)
    model = empty_model(config)
    weights, groups = _open_weights(folder, model, fmt, quant)
    # Quantized folders compute in bf16 or fp32 as the hardware prefers (never their fp16 scales' dtype).
    dtype = dtype or (auto_dtype(device) if quant else weights.dtype_of(_embedding_name(fmt)))
    activations = activations or DEFAULT_ACTIVATIONS
    kernel = (f"; {kernels.describe()}, {activations} activations" if quant and device.type == "cpu" else "")
    log.info("loading %s: RoPE %s; %s%s%s", folder, rope_description(config), dtype_name(dtype),
             f"; weights {quant.describe()}" if quant else "", kernel)
    for layer, names in tqdm(groups.items(), desc="loading", unit="group", disable=None):
        if quant:
            with weights.read(names) as mapped:
                state = install_group(model, mapped, layer, config, quant, dtype, device)
        else:
            state = _read_group(weights, names, layer, config, fmt, dtype, device)
        check_finite(state, folder)
        model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):  # a quantized head is its own
        model.lm_head.weight = model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{folder} left these model tensors unset: {', '.join(left[:10])}")
    if quant:
        set_activations(model, activations)
    return model.to(device).eval()  # moves the buffers that are not in the checkpoint


def iter_weights(path: str | Path, dtype: torch.dtype | str | None = None
                 ) -> tuple[YuanConfig, Iterator[tuple[int | None, dict[str, torch.Tensor]]]]:
    """The config of a checkpoint folder and its weights under native names, one group at a time
    (the shared tensors, then each layer), on the CPU: for tools that stream a model too large to
    hold twice, such as `yuan quantize`. The tied head is not among them. An AutoGPTQ folder gives
    its groups as this project's quantized folders hold them (quant/formats.py)."""
    dtype = resolve_dtype(dtype)
    folder = _checkpoint_folder(path)
    config, fmt = load_config(folder)
    quant = read_quant_config(folder)
    if quant and quant.method != "gptq":
        raise CheckpointError(f"{folder} is already quantized; start from the unquantized checkpoint")
    if quant:
        weights, groups = _open_weights(folder, empty_model(config), fmt, quant)
        return config, (_gptq_group(weights, layer, names, config, quant, dtype or torch.bfloat16)
                        for layer, names in groups.items())
    if (folder / ".metadata").is_file():  # a training run's checkpoint: small enough to load whole
        state = from_pretrained(folder, dtype=dtype).state_dict()
        groups = _group_names(k for k in state if not (config.tie_word_embeddings and k == "lm_head.weight"))
        return config, ((layer, {k: state[k] for k in names}) for layer, names in groups.items())
    weights, groups = _open_weights(folder, empty_model(config), fmt)
    dtype = dtype or weights.dtype_of(_embedding_name(fmt))
    return config, ((layer, _read_group(weights, names, layer, config, fmt, dtype, "cpu"))
                    for layer, names in groups.items())


def _gptq_group(weights: "_WeightFiles", layer: int | None, names: list[str], config: YuanConfig, quant: QuantConfig,
                dtype: torch.dtype) -> tuple[int | None, dict[str, torch.Tensor]]:
    with weights.read(names) as mapped:
        return layer, _unmapped(gptq_to_native(mapped, layer, config, quant, dtype), mapped)


def _unmapped(tensors: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with those that still view the mapped files copied out of them."""
    mapped_storages = {t.untyped_storage().data_ptr() for t in mapped.values()}
    return {k: t.clone() if t.untyped_storage().data_ptr() in mapped_storages else t for k, t in tensors.items()}


def _embedding_name(fmt: str) -> str:
    return "embed_tokens.weight" if fmt == "native" else "model.embed_tokens.weight"


def _open_weights(folder: Path, model: YuanForCausalLM, fmt: str, quant: QuantConfig | None = None
                  ) -> tuple["_WeightFiles", dict[int | None, list[str]]]:
    """The folder's weight files, checked against the names and shapes the model needs, and their
    tensor names grouped by layer (None: the tensors outside the layers)."""
    config = model.config
    weights = _WeightFiles(folder, quant.weight_files if quant else WEIGHT_FILES)
    # Stand-ins with the parameters' shapes and no memory (a broadcast scalar), to learn the names
    # and shapes the checkpoint must have. Meta tensors would do, but the meta kernels of the
    # reshaping ops in native_to_official import torch._dynamo (~3 s).
    expected = {k: torch.zeros((), dtype=torch.uint8).expand(v.shape) for k, v in model.state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
    if fmt == "official":
        expected = native_to_official(expected, config)
        optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    else:
        optional = set()
    expected = {k: tuple(v.shape) for k, v in expected.items()}
    if quant:
        expected = expected_shapes(expected, config, quant)
    _check_names_and_shapes(weights, expected, optional, folder)
    return weights, _group_names(weights.names)


def _group_names(names) -> dict[int | None, list[str]]:
    groups: dict[int | None, list[str]] = {}
    for name in names:
        m = _LAYER.match(name)
        groups.setdefault(int(m.group(1)) if m else None, []).append(name)
    return groups


def load_adapted(folder: str | Path, base: str | Path | None = None, dtype: torch.dtype | str | None = None,
                 device: str | torch.device = "cpu") -> YuanForCausalLM:
    """The base model of a LoRA run's checkpoint with its adapters folded in (training/lora.py), in
    eval mode: the base from `base`, or the one the run started from."""
    from .distributed.checkpoint import load_weights
    from .tokenizer import check_same_tokenizer, folder_fingerprint
    from .training.lora import LoraSpec, adapter_record, apply_lora, merge_lora

    folder = _checkpoint_folder(folder)
    record = adapter_record(folder)
    if record is None:
        raise ConfigError(f"{folder} holds no LoRA adapters (it is not a checkpoint of a `yuan train --lora-rank` run)")
    base = Path(base or record["base"])
    if not base.exists():
        raise FileNotFoundError(f"the base model of the adapters in {folder}, {base}, does not exist; "
                                f"give its new place with --base")
    if load_config(base)[0].to_dict() != load_config(folder)[0].to_dict():
        raise ConfigError(f"{base} is not the base the adapters in {folder} were trained on (another architecture)")
    check_same_tokenizer(f"the adapters in {folder}", folder_fingerprint(folder), f"the base {base}",
                         folder_fingerprint(base), "give the base they were trained on with --base")
    model = from_pretrained(base, device=device)
    apply_lora(model, LoraSpec(record["rank"], record["alpha"], tuple(record["targets"])))
    load_weights(folder, model)
    model = merge_lora(model)
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    return model.eval()


def check_finite(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Weights holding NaN or inf make every answer empty or garbage: refuse them by name. One sum
    per tensor (NaN and inf survive it; finite weights are far too small to overflow it)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)):
            raise CheckpointError(f"tensor {name} holds NaN or infinite values in {folder}; the checkpoint is damaged "
                                  f"or comes from a run that diverged, so load an earlier one")


def empty_model(config: YuanConfig) -> YuanForCausalLM:
    """The model with its parameters on the meta device (no memory), ready to receive weights.
    Buffers are built for real: those not saved with the weights keep their initial value."""
    # Parameters are moved to meta as modules register them (their CPU allocation is never touched),
    # and the nn.init functions are no-ops meanwhile: random init of weights about to be replaced is
    # wasted work, and on meta tensors it imports torch's meta kernels (~3 s on first use).
    inits = {name: fn for name, fn in vars(nn.init).items() if name.endswith("_") and not name.startswith("_")}
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    try:
        for name in inits:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        nn.Module.register_parameter = register_on_meta
        return YuanForCausalLM(config)
    finally:
        nn.Module.register_parameter = register
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


def _read_group(weights: "_WeightFiles", names: list[str], layer: int | None, config: YuanConfig, fmt: str,
                dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """One group of tensors (the shared ones, or one layer) under native names, in the requested
    dtype and on the requested device, none of them referring to the mapped files any more."""
    with weights.read(names) as mapped:
        # Cast before converting, so the conversion's copies (stacked experts...) are already in dtype.
        tensors = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                   for k, t in mapped.items()}
        if fmt == "official":
            tensors = (official_shared_to_native(tensors, config) if layer is None
                       else official_layer_to_native(tensors, config, layer))
        return _unmapped(tensors, mapped)


def _checkpoint_folder(path: str | Path) -> Path:
    folder = Path(path)
    if folder.is_file():  # config.json or a weight file: the folder around it is the checkpoint
        folder = folder.parent
    if not folder.exists():
        raise FileNotFoundError(f"no checkpoint at {folder}")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: it has no {CONFIG_FILE}")
    return folder


def _listing(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _check_names_and_shapes(weights: "_WeightFiles", expected: dict[str, tuple], optional: set[str],
                            folder: Path) -> None:
    have = set(weights.names)
    missing = sorted(set(expected) - have - optional)
    extra = sorted(have - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) the model needs: {_listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {_listing(extra)}")
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not match its config: " + "; ".join(problems))
    for name in weights.names:
        if weights.shape_of(name) != expected[name]:
            raise CheckpointError(f"tensor {name} in {folder} has shape {weights.shape_of(name)} but the "
                                  f"config needs {expected[name]}")


class _WeightFiles:
    """The tensors of a checkpoint folder: names, shapes and dtypes from the file headers, data
    read on demand through memory maps."""

    def __init__(self, folder: Path, candidates: tuple[str, ...] = WEIGHT_FILES):
        found = next((folder / f for f in candidates if (folder / f).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{folder} has no weights ({', '.join(candidates)})")
        if found.name.endswith(".index.json"):
            try:
                weight_map = json.loads(found.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{found} is not a valid index (a JSON object with a weight_map)") from None
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{found} names shard(s) that do not exist: {_listing(absent)}")
        else:
            files = [found]
        self.safetensors = found.name.endswith((".safetensors", ".safetensors.index.json"))
        self.file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple, torch.dtype]] = {}
        for file in files:
            with self._open(file) as tensors:
                for name in tensors.keys():
                    if _IGNORED.match(name):
                        continue
                    if name in self.file_of:
                        raise CheckpointError(f"tensor {name} appears in both {self.file_of[name].name} and {file.name}")
                    self.file_of[name] = file
                    self._meta[name] = tensors.shape_and_dtype(name)
        self.names = list(self.file_of)

    def shape_of(self, name: str) -> tuple:
        return self._meta[name][0]

    def dtype_of(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    @contextmanager
    def read(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """The named tensors as views of the mapped files; the maps close when the block ends."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        handles = [self._open(file) for file in by_file]
        try:
            for handle, file_names in zip(handles, by_file.values()):
                for name in file_names:
                    out[name] = handle.get_tensor(name)
            yield out
        finally:
            out.clear()
            for handle in handles:
                handle.close()

    def _open(self, file: Path) -> "_MappedFile":
        return _SafetensorsFile(file) if self.safetensors else _TorchFile(file)


class _MappedFile:
    """One weight file, memory-mapped while open: keys(), shape_and_dtype(name), get_tensor(name)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SafetensorsFile(_MappedFile):
    def __init__(self, file: Path):
        from safetensors import SafetensorError, safe_open

        try:
            self._f = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
        self.file = file

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape_and_dtype(self, name: str) -> tuple[tuple, torch.dtype]:
        # get_slice reads only the header, not the data.
        t = self._f.get_slice(name)
        if t.get_dtype() not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name} in {self.file} has dtype {t.get_dtype()}, which this loader does not read")
        return tuple(t.get_shape()), _SAFETENSORS_DTYPES[t.get_dtype()]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._f.get_tensor(name)

    def close(self) -> None:
        self._f = None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _TorchFile(_MappedFile):
    """A pytorch_model*.bin file, memory-mapped by torch.load (zip format, torch >= 1.6)."""

    def __init__(self, file: Path):
        import pickle
        import zipfile

        try:
            self._tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable PyTorch weights file ({exc})") from None
        if not isinstance(self._tensors, dict):
            raise CheckpointError(f"{file} does not hold a dict of tensors")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape_and_dtype(self, name: str) -> tuple[tuple, torch.dtype]:
        t = self._tensors[name]
        return tuple(t.shape), t.dtype

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}
