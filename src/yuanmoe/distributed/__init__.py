"""Parallelism applied from outside the single-device model: FSDP2 / DDP, expert and pipeline
parallel (a no-op in a world of one process), and the run checkpoints every world size reads.

Names load on first use, so that `yuan` and `import yuanmoe.distributed` start without
importing torch.distributed's pipelining and checkpoint machinery.
"""

import importlib

_HOMES = {
    "ParallelDims": "mesh", "build_mesh": "mesh", "init_distributed": "mesh",
    "ExpertParallelExperts": "expert_parallel", "all_to_all_bytes": "expert_parallel",
    "apply_expert_parallel": "expert_parallel",
    "ParallelModel": "parallel_model", "StepStats": "parallel_model", "parallelize": "parallel_model",
    "PipelineStageModule": "pipeline",
    "Checkpointer": "checkpoint", "is_run_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "load_weights": "checkpoint", "save_checkpoint": "checkpoint",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = sorted(_HOMES)
