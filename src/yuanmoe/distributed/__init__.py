"""Training on many processes with torch.distributed: FSDP2 / DDP, expert and pipeline parallel,
and distributed checkpoints, all applied from outside the single-device model.

Names load on first use, so that `yuan` and `import yuanmoe.distributed` start without
importing torch.distributed's pipelining and checkpoint machinery.
"""

import importlib

_HOMES = {
    "ParallelDims": "mesh", "build_mesh": "mesh", "default_device": "mesh", "init_distributed": "mesh",
    "ExpertParallelExperts": "expert_parallel", "all_to_all_bytes": "expert_parallel",
    "apply_expert_parallel": "expert_parallel",
    "ParallelModel": "parallel_model", "StepStats": "parallel_model", "parallelize": "parallel_model",
    "PipelineStageModule": "pipeline",
    "export_checkpoint": "checkpoint", "gather_model": "checkpoint", "is_distributed_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "train_parallel": "train",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = sorted(_HOMES)
