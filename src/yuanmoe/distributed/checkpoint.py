"""Run checkpoints, the one format a training run writes at any world size: torch.distributed.checkpoint
(DCP) shards, every rank writing its own in parallel under the single-device parameter names and
global shapes, so a checkpoint saved with one parallel layout loads into any other, into a plain
model in one process, or through `from_pretrained` (and from there into every command).

Folder layout: DCP's `.metadata` and `__<rank>_0.distcp` shards, `config.json` (YuanConfig),
`trainer_state.json` (whatever the caller passed as `extra`) and, from the `Checkpointer`, the
tokenizer files and `rng/rank-N.pt`. Written under a temporary name and renamed, so a crash never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..config import YuanConfig
from ..convert.official import CheckpointError
from ..utils import atomic_write_text
from .parallel_model import ParallelModel, _unwrap

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
EXTRA_FILE = "trainer_state.json"
RNG_DIR = "rng"


def _model_and_config(model: ParallelModel | nn.Module) -> tuple[nn.Module, YuanConfig]:
    if isinstance(model, ParallelModel):
        return _unwrap(model.module), model.config
    return model, model.config


def _checkpoint_key(name: str, module: nn.Module, config: YuanConfig) -> str | None:
    """The name a tensor is stored under: its single-device name, except that a tied lm_head is
    stored once, as the embedding (a last pipeline stage holds it without the embedding)."""
    if config.tie_word_embeddings and name == "lm_head.weight":
        return "embed_tokens.weight" if getattr(module, "embed_tokens", None) is None else None
    return name


def _global_view(model: ParallelModel | nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (a parameter or optimizer state of parameter `name`) as DCP should see it: FSDP
    shards are DTensors already; an expert slice becomes a DTensor of the global [E, ...] tensor
    (split over ep on dim 0, and over dp_rep on dim 1 when FSDP shards it); replicated tensors stay
    plain and are written once. Views share storage, so loading into them loads the model."""
    if not isinstance(model, ParallelModel) or name not in model.expert_fqns:
        return tensor.detach()
    fsdp_sharded = isinstance(tensor, DTensor)
    local = tensor.to_local() if fsdp_sharded else tensor.detach()
    shape = list(tensor.shape)
    shape[0] *= model.dims.ep
    stride = torch.empty(shape, device="meta").stride()
    placements = (Shard(1) if fsdp_sharded else Replicate(), Shard(0))
    return DTensor.from_local(local, model.mesh["dp_rep", "ep"], placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def _model_state(model: ParallelModel | nn.Module) -> dict[str, torch.Tensor]:
    module, config = _model_and_config(model)
    state = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
            continue  # a frozen base (LoRA): it comes from the checkpoint the run started from
        key = _checkpoint_key(name, module, config)
        if key is not None:
            state[key] = _global_view(model, name, tensor)
    return state


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (so DCP can load into them) with a step of learning rate
    zero on zero gradients, which leaves the weights as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def _optimizer_state(model: ParallelModel | nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Per parameter name, its optimizer state tensors, laid out like the parameter."""
    module, config = _model_and_config(model)
    state = {}
    for name, p in module.named_parameters():
        key = _checkpoint_key(name, module, config)
        if key is None or p not in optimizer.state:
            continue
        state[key] = {k: _global_view(model, name, v) if isinstance(v, torch.Tensor) and v.shape == p.shape
                      else v for k, v in optimizer.state[p].items()}
    return state


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp(operation, state: dict, path: Path, single_process: bool) -> None:
    """dcp.save or dcp.load, in one process when asked (DCP warns about that; it is intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        operation(state, checkpoint_id=path, no_dist=single_process)


def save_checkpoint(path: str | Path, model: ParallelModel | nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                    add_files: Callable[[Path], None] | None = None) -> Path:
    """Save the model (and optimizer state) from every rank; all ranks must call it. `extra` is a
    JSON-able dict (step, data position...) returned by `load_checkpoint`. `add_files(folder)`, if
    given, runs on every rank before the folder is published, to put more files in it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    leader = not _distributed() or dist.get_rank() == 0
    if leader:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if _distributed():
        dist.barrier()
    state = {"model": _model_state(model)}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(model, optimizer)
    _dcp(dcp.save, state, tmp, single_process=not _distributed())
    if add_files is not None:
        add_files(tmp)
    if _distributed():
        dist.barrier()
    if leader:
        _, config = _model_and_config(model)
        config.to_json(tmp / CONFIG_FILE)
        atomic_write_text(tmp / EXTRA_FILE, json.dumps(extra or {}, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    if _distributed():
        dist.barrier()
    return path


def is_run_checkpoint(path: str | Path) -> bool:
    """True for a folder written by `save_checkpoint` (DCP's .metadata beside a config.json)."""
    return (Path(path) / ".metadata").is_file() and (Path(path) / CONFIG_FILE).is_file()


def _check_folder(path: Path) -> None:
    if not is_run_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a run checkpoint (no .metadata or config.json); "
                                f"give a checkpoints/step-N folder of a training run")


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes a run checkpoint unusable (a missing or truncated file, unreadable JSON), or None.
    Reads only headers and sizes, so every rank comes to the same answer quickly."""
    path = Path(path)
    if not is_run_checkpoint(path):
        return "it has no .metadata or config.json"
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as exc:  # a truncated pickle raises whatever unpickling hits first
        return f"its .metadata cannot be read ({type(exc).__name__})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        if not (path / name).is_file() or (path / name).stat().st_size < size:
            return f"its shard {name} is missing or truncated"
    try:
        state = json.loads((path / EXTRA_FILE).read_text())
        YuanConfig.from_json(path / CONFIG_FILE)
    except (OSError, ValueError) as exc:
        return f"its {EXTRA_FILE} or {CONFIG_FILE} cannot be read ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"its {EXTRA_FILE} holds no step"
    for rng_file in sorted((path / RNG_DIR).glob("rank-*.pt")):
        try:
            torch.load(rng_file, weights_only=False)
        except Exception as exc:  # a truncated zip or pickle raises whatever it hits first
            return f"its {RNG_DIR}/{rng_file.name} cannot be read ({type(exc).__name__})"
    return None


def load_checkpoint(path: str | Path, model: ParallelModel | nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint saved at any world size and layout into `model` (parallelized or plain) and
    `optimizer`, in place; all ranks must call it. Returns the `extra` dict it was saved with."""
    path = Path(path)
    _check_folder(path)
    _, config = _model_and_config(model)
    saved = YuanConfig.from_json(path / CONFIG_FILE)
    if saved.to_dict() != config.to_dict():
        differ = [k for k, v in saved.to_dict().items() if getattr(config, k) != v]
        raise ValueError(f"checkpoint {path} was saved for another model configuration "
                         f"(different {', '.join(differ)})")
    state = {"model": _model_state(model)}
    if optimizer is not None:
        _init_optimizer_state(optimizer)
        state["optimizer"] = _optimizer_state(model, optimizer)
    _dcp(dcp.load, state, path, single_process=not _distributed())
    return json.loads((path / EXTRA_FILE).read_text())


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Read the weights of a run checkpoint into a plain single-device `model` of its config, in this
    process alone (no process group needed); the optimizer state is not read."""
    path = Path(path)
    _check_folder(path)
    _dcp(dcp.load, {"model": _model_state(model)}, path, single_process=True)


class Checkpointer:
    """The run checkpoints of a training run: `run/checkpoints/step-NNNNNNN/`, the newest
    `keep_last` kept.

    A checkpoint holds the model and optimizer as DCP shards under single-device names (so it loads
    at any world size and layout: 2 ranks -> 1 process -> 4 ranks), `config.json`, the tokenizer,
    `trainer_state.json` (step, the run's settings, its layout) and every rank's RNG state in
    `rng/`. `from_pretrained` and every command that takes a checkpoint read the folder as it is.
    Written under a temporary name and renamed, so a crash never leaves a half-written one.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3, tokenizer=None):
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep_last, self.tokenizer = keep_last, tokenizer

    def all(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if is_run_checkpoint(p)) if self.root.is_dir() else []

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def resumable(self, step: int | None = None) -> Path:
        """The checkpoint to resume: that of `step` if given, else the newest intact one; damaged newer
        ones (a disk that failed, a file cut short) are skipped with a warning."""
        if step is not None:
            path = self.root / f"step-{step:07d}"
            problem = checkpoint_problem(path) if path.is_dir() else "it does not exist"
            if problem:
                have = ", ".join(str(int(p.name[5:])) for p in self.all()) or "none"
                raise CheckpointError(f"cannot resume from step {step}: {path} is not usable because {problem} "
                                      f"(steps saved: {have})")
            return path
        skipped = []
        for path in reversed(self.all()):
            problem = checkpoint_problem(path)
            if problem is None:
                for bad, why in skipped:
                    print(f"warning: skipping checkpoint {bad}: {why}; resuming from {path.name}", file=sys.stderr)
                return path
            skipped.append((path, problem))
        raise CheckpointError(f"no checkpoint in {self.root} can be resumed: "
                              + "; ".join(f"{p.name}: {why}" for p, why in skipped))

    def remove_temporaries(self) -> None:
        """Delete the hidden folders of saves that a crash (kill -9, power loss) interrupted; they can
        be as large as the model. Only the leader calls it, before the run saves anything."""
        if self.root.is_dir():
            for tmp in self.root.glob(".step-*.tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def save(self, step: int, model: ParallelModel | nn.Module, optimizer: torch.optim.Optimizer,
             state: dict) -> Path:
        """Every rank calls it; `state` (JSON-able) comes back from `load`."""
        rank = dist.get_rank() if _distributed() else 0

        def add_files(folder: Path) -> None:
            (folder / RNG_DIR).mkdir(exist_ok=True)
            torch.save(_rng_state(), folder / RNG_DIR / f"rank-{rank}.pt")
            if rank == 0 and self.tokenizer is not None:
                self.tokenizer.save(folder)

        world = dist.get_world_size() if _distributed() else 1
        path = save_checkpoint(self.root / f"step-{step:07d}", model, optimizer,
                               {**state, "step": step, "world_size": world}, add_files)
        if rank == 0:
            for old in self.all()[:-self.keep_last]:
                shutil.rmtree(old)
        return path

    def load(self, path: Path, model: ParallelModel | nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore weights and optimizer moments (any layout) and, at the world size the checkpoint
        was saved with, this rank's RNG state; returns the saved state."""
        state = load_checkpoint(path, model, optimizer)
        rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        rng_file = Path(path) / RNG_DIR / f"rank-{rank}.pt"
        if state.get("world_size") == world and rng_file.is_file():
            try:
                rng = torch.load(rng_file, weights_only=False)
            except Exception as exc:  # a truncated zip or pickle raises whatever it hits first
                raise CheckpointError(f"{rng_file} is damaged ({type(exc).__name__}); resume an earlier step "
                                      f"with --resume-from STEP") from None
            _set_rng_state(rng)
        return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
