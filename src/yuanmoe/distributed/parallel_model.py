"""`parallelize`: apply expert, pipeline and data parallel to a single-device model, from outside.

Order of application (each step only sees modules, never edits model code):
1. expert parallel swaps each MoE layer's `experts` for its `ExpertParallelExperts` slice;
2. pipeline parallel keeps this rank's stage of the layer stack (`PipelineStageModule`);
3. data parallel wraps what is left: FSDP2 `fully_shard` per decoder layer and at the root, or DDP.

Gradients come out as the gradient of the mean loss over the global batch, as on one process:
FSDP/DDP average over `dp`; an expert's gradient arrives summed over the `ep` ranks whose tokens it
served, so it is divided by `ep` and averaged over the `dp_rep` ranks that hold the same experts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from ..data.packed import IGNORE_INDEX
from ..device import autocast
from ..model.loss import cross_entropy_sum
from ..model.transformer import YuanForCausalLM
from .expert_parallel import ExpertParallelExperts, all_to_all_bytes, apply_expert_parallel
from .mesh import ParallelDims, dp_mesh
from .pipeline import PipelineStageModule, YuanPipelineStage

DATA_PARALLEL = ("fsdp", "ddp")
SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


@dataclass
class StepStats:
    loss: float  # mean cross entropy per target token over the global batch of the step
    aux_loss: float  # router balancing losses, mean over ranks and micro-batches
    expert_load: list[list[int]]  # tokens routed to each expert, per MoE layer, over the global batch


class ParallelModel:
    """This rank's share of a parallelized model and the training step that fits it.

    `module` holds the parameters (the model, a pipeline stage, or their FSDP/DDP form); give
    `parameters()` to the optimizer. `train_step` runs forward and backward on this rank's rows of
    a global batch; `clip_grad_norm_` clips by the norm over all ranks.
    """

    def __init__(self, module: nn.Module, mesh: DeviceMesh, dims: ParallelDims, config, device: torch.device,
                 expert_fqns: set[str], stage: PipelineStageModule | None, schedule: str, microbatches: int):
        self.module, self.mesh, self.dims, self.config, self.device = module, mesh, dims, config, device
        self.expert_fqns = expert_fqns  # parameter names holding only this rank's experts
        self.stage = stage
        self.dp_group = dp_mesh(mesh).get_group()
        self.autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 for mixed precision
        self._loss_scale = 1.0  # of the cross-entropy sum: dp / targets in the global batch
        self.microbatches = microbatches if stage is not None else 1  # pipeline micro-batches per step
        self._schedule = None
        if stage is not None:
            pp_stage = YuanPipelineStage(module, stage.stage, dims.pp, device, group=mesh["pp"].get_group())
            # The loss already carries the global normalisation, so the schedule must not rescale.
            self._schedule = SCHEDULES[schedule](pp_stage, microbatches, loss_fn=self._pipeline_loss,
                                                 scale_grads=False)
            stage.aux_weight = 1.0 / microbatches
        self._tied_group = _tied_weight_group(mesh, dims) if stage is not None and stage.ties_embedding else None

    # ----------------------------------------------------------------- parameters
    def named_parameters(self):
        """(name, parameter) with the names of the single-device model."""
        return _unwrap(self.module).named_parameters()

    def parameters(self):
        return _unwrap(self.module).parameters()

    @property
    def rows_multiple(self) -> int:
        """A global batch's rows must be a multiple of this: dp ranks, each cutting pipeline micro-batches."""
        return self.dims.dp * self.microbatches

    def local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global batch of [B, ...] tensors (B divisible by dp), on its device."""
        sizes = {v.shape[0] for v in batch.values()}
        if len(sizes) != 1 or next(iter(sizes)) % self.dims.dp:
            raise ValueError(f"a global batch of {sorted(sizes)} rows does not split evenly over dp={self.dims.dp} ranks")
        rows = next(iter(sizes)) // self.dims.dp
        first = dp_mesh(self.mesh).get_local_rank() * rows
        return {k: v[first: first + rows].to(self.device) for k, v in batch.items()}

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    # ----------------------------------------------------------------- one step
    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepStats:
        """Forward and backward over the micro-batches of one optimizer step: dicts of global [B, S]
        tensors `input_ids`, `targets` (the next token at each position, -100 ignored) and optionally
        `position_ids`. The cross entropy is averaged over all the step's targets on all ranks and the
        aux loss over micro-batches, so the gradient is the one a single process computes for the
        same global batch. Gradients accumulate into .grad as with loss.backward()."""
        batches = [self.local_rows(b) for b in batches]
        num_targets = torch.tensor(float(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)))
        _all_reduce(num_targets, self.dp_group)
        # Data parallel averages the ranks' gradients; undo that for a sum over the global batch.
        self._loss_scale = self.dims.dp / max(1.0, float(num_targets))
        load_before = [buffer.clone() for buffer in self._expert_load_buffers()]
        if self.stage is None:
            ce_sum, aux, load = self._model_step(batches)
        else:
            ce_sum, aux, load = self._pipeline_step(batches)
        self._sum_expert_load(load_before)
        totals = torch.stack([ce_sum.double().cpu(), aux.double().cpu()])
        _all_reduce(totals, self.dp_group)
        _all_reduce(load, self.dp_group)
        return StepStats(float(totals[0] / max(1.0, float(num_targets))), float(totals[1] / self.dims.dp),
                         load.tolist())

    def _model_step(self, batches):
        ce_total, aux_total, loads = torch.zeros(()), torch.zeros(()), []
        for batch in batches:
            with self._autocast():
                out = self.module(batch["input_ids"], position_ids=batch.get("position_ids"), output_router=True)
            ce_sum = cross_entropy_sum(out.logits, batch["targets"])
            aux = out.aux_loss / len(batches)
            (ce_sum * self._loss_scale + aux).backward()
            ce_total += ce_sum.detach().cpu()
            aux_total += aux.detach().cpu()
            loads.append(_routed_tokens([r.tokens_per_expert for r in out.router_outputs]))
        return ce_total, aux_total, torch.stack(loads).sum(0)

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, targets) * self._loss_scale

    def _pipeline_inputs(self, batches):
        input_ids = torch.cat([b["input_ids"] for b in batches])
        targets = torch.cat([b["targets"] for b in batches])
        positions = torch.cat([b["position_ids"] if b.get("position_ids") is not None else
                               torch.arange(b["input_ids"].shape[1], device=self.device).repeat(len(b["input_ids"]), 1)
                               for b in batches])
        return input_ids, positions, targets

    def _run_pipeline(self, run, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed the step's rows through the stages with `run` (the schedule's step or eval); returns
        this dp rank's cross-entropy sum, aux loss and expert load, the same on every stage."""
        input_ids, positions, targets = self._pipeline_inputs(batches)
        losses: list[torch.Tensor] = []  # per micro-batch, filled on the last stage
        self.stage.reset_stats()
        self.stage.autocast_dtype = self.autocast_dtype
        if self.stage.is_first:
            run(input_ids, positions, target=targets if self.stage.is_last else None, losses=losses)
        else:
            run(target=targets if self.stage.is_last else None, losses=losses)
        pp_group = self.mesh["pp"].get_group()
        ce_sum = sum(float(loss) for loss in losses) / self._loss_scale
        totals = torch.tensor([ce_sum, self.stage.aux_loss_sum], dtype=torch.float64)
        dist.all_reduce(totals, group=pp_group)
        loads: list[dict] = [None] * self.dims.pp
        dist.all_gather_object(loads, {i: c.tolist() for i, c in self.stage.expert_load.items()}, group=pp_group)
        merged = {i: c for stage_load in loads for i, c in stage_load.items()}
        load = _routed_tokens([torch.tensor(merged[i]) for i in sorted(merged)])
        return totals[0], totals[1], load

    def _pipeline_step(self, batches):
        ce_sum, aux, load = self._run_pipeline(self._schedule.step, batches)
        if self._tied_group is not None:  # the embedding and the lm_head are one weight: sum their gradients
            grad = self.stage.tied_weight().grad
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self._tied_group)
        return ce_sum, aux, load

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(sum of cross entropy, number of targets) over a global batch, forward only, in eval mode."""
        local = self.local_rows(batch)
        was_training = self.module.training
        self.module.train(False)
        try:
            if self.stage is None:
                with self._autocast():
                    logits = self.module(local["input_ids"], position_ids=local.get("position_ids")).logits
                ce_sum = cross_entropy_sum(logits, local["targets"]).double().cpu()
            else:
                ce_sum, _, _ = self._run_pipeline(self._schedule.eval, [local])
        finally:
            self.module.train(was_training)
        totals = torch.stack([ce_sum, (local["targets"] != IGNORE_INDEX).sum().double().cpu()])
        _all_reduce(totals, self.dp_group)
        return float(totals[0]), int(totals[1])

    def _expert_load_buffers(self) -> list[torch.Tensor]:
        """Routers that balance by a bias count the tokens each expert got (`observed_load`)."""
        return [m.observed_load for m in self.module.modules()
                if isinstance(getattr(m, "observed_load", None), torch.Tensor)]

    def _sum_expert_load(self, before: list[torch.Tensor]) -> None:
        """Make each router's load count this step's load over the whole batch, so bias updates
        stay equal on all data-parallel ranks."""
        for buffer, old in zip(self._expert_load_buffers(), before):
            step_load = buffer - old
            _all_reduce(step_load, self.dp_group)
            buffer.copy_(old + step_load)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = []
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grads.append(grad)
            if self.stage is not None and self.stage.ties_embedding and not self.stage.is_first:
                if p is self.stage.tied_weight():
                    continue  # counted on the first stage
            copies = 1 if isinstance(p.grad, DTensor) or name in self.expert_fqns else self.dims.dp
            squares += grad.double().pow(2).sum() / copies
        _all_reduce(squares)
        norm = squares.sqrt().float()
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))
        return norm

    def all_to_all_bytes(self, reset: bool = True) -> int:
        return all_to_all_bytes(self.module, reset)


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Sum over the group's ranks in place; nothing to do (and no collective) for a group of one,
    which is how a single-process run goes through this same code at no cost."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)


def _routed_tokens(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """[layers, experts] int64 on the CPU (an empty [0, 0] for a dense model)."""
    return torch.stack([c.cpu().long() for c in per_layer]) if per_layer else torch.zeros(0, 0, dtype=torch.long)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def _tied_weight_group(mesh: DeviceMesh, dims: ParallelDims) -> dist.ProcessGroup:
    """The group of {first stage, last stage} ranks with this rank's dp coordinate."""
    ranks = mesh.mesh.reshape(dims.pp, dims.dp)
    mine = None
    for column in range(dims.dp):  # every rank must create every group, in the same order
        group = dist.new_group([int(ranks[0, column]), int(ranks[-1, column])])
        if dist.get_rank() in (int(ranks[0, column]), int(ranks[-1, column])):
            mine = group
    return mine


def parallelize(model: YuanForCausalLM, mesh: DeviceMesh, dims: ParallelDims, *, data_parallel: str = "fsdp",
                schedule: str = "1f1b", microbatches: int | None = None,
                reshard_after_forward: bool = True, adapt: Callable[[nn.Module], None] | None = None,
                param_dtype: torch.dtype | None = None) -> ParallelModel:
    """Apply expert, pipeline and data parallel to `model` (built identically on every rank,
    e.g. from the same seed or checkpoint) and move it to this rank's device. Pipeline parallel
    splits each step's rows into `microbatches` (default pp) pipeline micro-batches.

    `adapt(model)`, if given, runs after expert parallel has sliced the experts and before data
    parallel wraps the parameters (LoRA adds its adapters there). `param_dtype` is the dtype FSDP
    gathers the weights in (needed when they mix dtypes, as a bf16 base with fp32 adapters does);
    gradients are reduced in fp32."""
    if data_parallel not in DATA_PARALLEL:
        raise ValueError(f"data_parallel must be one of {', '.join(DATA_PARALLEL)}, got {data_parallel!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if dims.ep > 1 and not model.config.is_moe:
        raise ValueError("expert parallel needs a mixture-of-experts model (num_experts > 0)")
    if data_parallel == "ddp" and (dims.pp > 1 or dims.dp_replicas > 1):
        raise ValueError("ddp does not combine with pipeline parallel or with 1 < ep < dp; use fsdp")
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device("cpu")
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and data_parallel == "ddp":
        raise ValueError("a model on the meta device needs FSDP (ddp replicates weights it does not have)")
    if not on_meta:  # else the caller materialises this rank's shards afterwards (sharded_start.py)
        model.to(device)

    if dims.ep > 1:
        apply_expert_parallel(model, mesh["ep"].get_group())
    if adapt is not None:
        adapt(model)
    stage = PipelineStageModule(model, mesh["pp"].get_local_rank(), dims.pp) if dims.pp > 1 else None
    module = stage if stage is not None else model
    expert_params = {p for m in module.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    expert_fqns = {name for name, p in module.named_parameters() if p in expert_params}

    if not (data_parallel == "fsdp" and dims.dp_replicas > 1):  # else FSDP divides them (see _apply_fsdp)
        for p in expert_params:  # summed over the ep ranks that sent tokens: make it their mean
            if p.requires_grad:
                p.register_hook(lambda grad: grad / dims.ep)
    if data_parallel == "fsdp" and dims.dp > 1:
        # A decoder layer and the root return the routers' outputs, views that nothing modifies in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(DecoderLayer|YuanForCausalLM)\) "
                                                  r"returned a view")
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype \
            else MixedPrecisionPolicy()
        _apply_fsdp(module, mesh, dims, expert_params, reshard_after_forward, mp_policy)
    elif data_parallel == "ddp" and dims.dp > 1:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(expert_fqns))
        module = DistributedDataParallel(module, process_group=dp_mesh(mesh).get_group(),
                                         device_ids=[device] if device.type == "cuda" else None)
    return ParallelModel(module, mesh, dims, model.config, device, expert_fqns, stage, schedule,
                         microbatches or dims.pp)


def _apply_fsdp(module: nn.Module, mesh: DeviceMesh, dims: ParallelDims, expert_params: set[nn.Parameter],
                reshard_after_forward: bool, mp_policy: MixedPrecisionPolicy) -> None:
    """FSDP2 over dp per decoder layer and at the root. Expert slices differ across the ep ranks, so
    they are sharded separately, over the dp_rep ranks that share them (or left whole, outside FSDP,
    when no other rank holds them)."""
    layers = module.layers.values() if isinstance(module.layers, nn.ModuleDict) else module.layers
    data_mesh = dp_mesh(mesh)
    for layer in layers:
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, ExpertParallelExperts):
            if dims.dp_replicas > 1:
                # Shard the feature dim: dim 0 is already split over ep, and a second split along a
                # different dim keeps the checkpoint's global layout a plain 2-D DTensor.
                fully_shard(experts, mesh=mesh["dp_rep"], shard_placement_fn=lambda p: Shard(1),
                            reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
                experts.set_gradient_divide_factor(float(dims.dp))
                experts.set_force_sum_reduction_for_comms(True)  # divide locally: gloo has no PREMUL_SUM
        ignored = expert_params if dims.dp_replicas == 1 else None
        fully_shard(layer, mesh=data_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored,
                    mp_policy=mp_policy)
    fully_shard(module, mesh=data_mesh, reshard_after_forward=False,
                ignored_params=expert_params if dims.dp_replicas == 1 else None, mp_policy=mp_policy)

