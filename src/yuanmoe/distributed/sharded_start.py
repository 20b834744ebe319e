"""Start from a checkpoint without any rank holding the whole model.

The model is built on the meta device (no memory), `parallelize` slices the experts (expert
parallel), keeps this rank's layers (pipeline) and shards the rest (FSDP2), all still on meta;
`materialize` then allocates only this rank's shards, and `load_start_weights` fills them:

* from an official or native folder, one group of tensors at a time (the shared ones, then each
  layer) through memory maps: every tensor of the group is converted to this project's layout
  from the mapped file and only this rank's slice of it is copied, so the peak above the rank's
  shards is the group's converted tensors (at most the stacked experts of one layer, or the
  embedding), never the model;
* from a run checkpoint (DCP shards), whose reader fetches only the slices this rank asks for.

LoRA (training/lora.py) adds its adapters inside `parallelize`; they are initialised here after
the base is read, each rank writing its part of the same full initial values.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..config import YuanConfig
from .checkpoint import _checkpoint_key, _dcp, _distributed, _global_view, is_run_checkpoint
from .parallel_model import ParallelModel, _unwrap

_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def materialize(pm: ParallelModel) -> None:
    """Allocate this rank's parameters (uninitialised) on its device; buffers keep their values, and
    a parameter shared by several modules (the tied embedding and head) stays shared, which
    `to_empty` alone would undo (it gives each module a new parameter)."""
    module = _unwrap(pm.module)
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    places: dict[int, list[tuple]] = {}
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((owner, name))
    module.to_empty(device=pm.device)
    for (first, first_name), *others in places.values():
        for owner, name in others:
            setattr(owner, name, getattr(first, first_name))
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])


def local_rows(param: torch.Tensor) -> range:
    """The rows (dim 0) of the parameter's global value that this rank holds a part of."""
    if not isinstance(param, DTensor):
        return range(param.shape[0])
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return range(offset[0], offset[0] + shape[0])


@torch.no_grad()
def fill_local(param: torch.Tensor, value: torch.Tensor, first_row: int = 0) -> None:
    """Write this rank's part of the parameter's global value into `param`; `value` holds the rows
    from `first_row` on of that global value (at least those this rank holds)."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        if local.numel():
            offset = (offset[0] - first_row, *offset[1:])
            local.copy_(value[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
    else:  # this rank holds all of it: value has every row
        param.copy_(value)


def _targets(pm: ParallelModel) -> dict[str, tuple[torch.Tensor, slice | None]]:
    """Checkpoint name -> (this rank's parameter, the experts it holds if it is an expert slice), for
    every parameter a start checkpoint provides (LoRA adapters are not in it)."""
    from ..training.lora import base_name, is_adapter_name

    module, config = _unwrap(pm.module), pm.config
    targets = {}
    for name, p in module.named_parameters():
        if is_adapter_name(name):
            continue
        key = _checkpoint_key(base_name(name), module, config)
        if key is None:
            continue
        experts = None
        if name in pm.expert_fqns:
            owner = module.get_submodule(name.rsplit(".", 1)[0].split(".parametrizations")[0])
            experts = slice(owner.first_expert, owner.first_expert + owner.num_experts)
        targets[key] = (p, experts)
    return targets


def load_start_weights(pm: ParallelModel, path: str | Path, seed: int = 0) -> None:
    """Fill a materialised ParallelModel from checkpoint `path` (official, native or a run's), each
    rank reading only its shards; then initialise LoRA adapters, if any. All ranks call it."""
    from ..checkpoint import load_config
    from ..training.lora import init_adapters, is_adapted

    path = Path(path)
    config, fmt = load_config(path)
    if config.to_dict() != pm.config.to_dict():
        differ = [k for k, v in config.to_dict().items() if getattr(pm.config, k) != v]
        raise ValueError(f"checkpoint {path} was saved for another model configuration (different {', '.join(differ)})")
    targets = _targets(pm)
    if is_run_checkpoint(path):
        _load_run_checkpoint(pm, path, targets)
    else:
        _load_weight_files(path, config, fmt, targets)
    module = _unwrap(pm.module)
    if is_adapted(module):
        init_adapters(module, seed, fill=fill_local)


def _load_run_checkpoint(pm: ParallelModel, path: Path, targets: dict) -> None:
    from ..training.lora import base_name

    names = {key: name for name, _ in _unwrap(pm.module).named_parameters()
             if (key := _checkpoint_key(base_name(name), _unwrap(pm.module), pm.config)) in targets}
    state = {key: _global_view(pm, names[key], p) for key, (p, _) in targets.items()}
    _dcp(dcp.load, {"model": state}, path, single_process=not _distributed())


def _load_weight_files(folder: Path, config: YuanConfig, fmt: str, targets: dict) -> None:
    from ..checkpoint import _WeightFiles
    from ..convert import CheckpointError

    weights = _WeightFiles(folder)
    groups: dict[int | None, list[str]] = {}
    for name in weights.names:
        m = _LAYER.match(name)
        groups.setdefault(int(m.group(1)) if m else None, []).append(name)
    wanted_layers = {int(m.group(1)) for key in targets if (m := _LAYER.match(key))}
    missing = set(targets)
    for layer, names in groups.items():
        if layer is None or layer in wanted_layers:  # not another pipeline stage's layer
            with weights.read(names) as mapped:
                missing -= _fill_group(mapped, layer, config, fmt, targets)
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensor(s) the model needs: {', '.join(sorted(missing)[:10])}")


def _fill_group(mapped: dict[str, torch.Tensor], layer: int | None, config: YuanConfig, fmt: str,
                targets: dict) -> set[str]:
    """Fill the targets of one group of mapped tensors (the shared ones, or a layer's); returns the
    names filled. Nothing refers to the mapped files once it returns, so their pages are let go."""
    from ..convert.official import official_expert_name, official_layer_to_native, official_shared_to_native

    filled = set()
    if fmt == "native":
        native = mapped
    elif layer is None:
        native = official_shared_to_native(mapped, config)
    else:
        # Official experts are separate tensors: stack only the experts this rank holds (its rows
        # of the native [E, ...] stack), so the other experts are never read.
        native = official_layer_to_native(mapped, config, layer, experts=False)
        for w in ("w1", "w2") if config.is_moe else ():
            key = f"layers.{layer}.mlp.experts.{w}"
            if key in targets:
                param, experts = targets[key]
                rows = local_rows(param)
                first = (experts.start if experts else 0) + rows.start
                if len(rows):
                    fill_local(param, torch.stack([mapped[official_expert_name(layer, e, w)]
                                                   for e in range(first, first + len(rows))]), rows.start)
                filled.add(key)
    for key, full in native.items():
        if key in targets:
            param, experts = targets[key]
            fill_local(param, full[experts] if experts is not None else full)
            filled.add(key)
    return filled
