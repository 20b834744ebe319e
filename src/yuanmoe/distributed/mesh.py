"""Process groups and the device mesh: which rank does what under data, expert and pipeline parallel.

The mesh has three dimensions, outermost first: `pp` (pipeline stages), `dp_rep` (replicas of one
set of experts) and `ep` (ranks that split the experts among them). Data parallel runs over `dp`,
the flattened (`dp_rep`, `ep`): expert parallel borrows its ranks from data parallel, as in
torchtitan and Megatron, so every rank still reads its own slice of the batch. `ep` is innermost
so the ranks exchanging tokens are neighbours (the same node on a GPU cluster).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..device import resolve_device


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1  # data-parallel ranks per pipeline stage (each reads its own slice of the batch)
    ep: int = 1  # expert-parallel ranks, a divisor of dp: each holds num_experts / ep experts
    pp: int = 1  # pipeline stages, each holding a contiguous block of layers

    def __post_init__(self) -> None:
        for name in ("dp", "ep", "pp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dp % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide dp ({self.dp}): expert parallel uses data-parallel ranks")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp

    @property
    def dp_replicas(self) -> int:
        """How many data-parallel ranks hold the same experts."""
        return self.dp // self.ep

    @classmethod
    def parse(cls, spec: str) -> "ParallelDims":
        """'dp=4,ep=2,pp=2' (any order, missing ones are 1)."""
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(dp|ep|pp)\s*=\s*(\d+)", part)
            if match is None:
                raise ValueError(f"bad parallel spec {part!r}; write it like 'dp=4,ep=2,pp=2'")
            sizes[match.group(1)] = int(match.group(2))
        return cls(**sizes)

    def __str__(self) -> str:
        return f"dp={self.dp},ep={self.ep},pp={self.pp}"

    @classmethod
    def for_world(cls, world_size: int, dp: int | None = None, ep: int | None = None,
                  pp: int | None = None) -> "ParallelDims":
        """The layout `yuan train --dp/--ep/--pp` asks for over `world_size` processes: dp defaults to
        the processes left over by pp, so with no flag every process is a data-parallel rank."""
        pp = pp or 1
        if world_size % pp:
            raise ValueError(f"pp ({pp}) must divide the number of processes ({world_size})")
        return cls(dp=dp or world_size // pp, ep=ep or 1, pp=pp)


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs) and return this
    rank's device (`device` as `--device` takes it; under torchrun `cuda` means the GPU of
    LOCAL_RANK). A process started without torchrun forms a world of one, so the same training
    code runs in one process and on many."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # On GPUs the small bookkeeping collectives on CPU tensors (loss sums, stop flags) use gloo.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None, **alone)
    return device


_MESHES: dict[tuple, DeviceMesh] = {}


def build_mesh(dims: ParallelDims, device_type: str = "cpu") -> DeviceMesh:
    """A mesh named ('pp', 'dp_rep', 'ep') over all ranks; `dp_mesh` gives its data-parallel part.
    Made once per layout and process group (a process that trains several models reuses it)."""
    if not dist.is_initialized():
        raise ValueError("distributed training needs a process group; launch with torchrun "
                         "(see docs/distributed.md)")
    if dims.world_size != dist.get_world_size():
        raise ValueError(f"{dims} needs dp * pp = {dims.world_size} processes, but {dist.get_world_size()} "
                         f"were launched; start it with torchrun --nproc_per_node {dims.world_size}")
    key = (dims, device_type, id(dist.group.WORLD))
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, (dims.pp, dims.dp_replicas, dims.ep),
                                        mesh_dim_names=("pp", "dp_rep", "ep"))
    return _MESHES[key]


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel ranks of this pipeline stage: (dp_rep, ep) flattened (made once, then cached)."""
    return mesh["dp_rep", "ep"]._flatten("dp")
