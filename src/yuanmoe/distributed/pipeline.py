"""Pipeline parallel: the layer stack cut into contiguous stages run by torch.distributed.pipelining.

`PipelineStageModule` holds the modules of one stage under the names they have in
`YuanForCausalLM` (`embed_tokens`, `layers.<i>`, `norm`, `lm_head`), so checkpoints keep the
single-device keys. Stages pass (hidden states, position ids) to each other; the last one returns
logits, to which the schedule applies the loss per micro-batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage

from ..device import autocast
from ..model.attention import rope_cos_sin
from ..model.transformer import YuanForCausalLM, attention_mask


class _AddAuxLoss(torch.autograd.Function):
    """Identity on the hidden states whose backward also gives the router's aux loss a gradient of one,
    so a stage's balancing loss trains without travelling to the last stage (Megatron's trick)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, as even as possible, earlier stages one layer longer (the last also runs the head)."""
    if num_stages > num_layers:
        raise ValueError(f"pp ({num_stages}) cannot exceed the number of layers ({num_layers})")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class PipelineStageModule(nn.Module):
    def __init__(self, model: YuanForCausalLM, stage: int, num_stages: int):
        super().__init__()
        self.config = model.config
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        layer_ids = stage_layer_ranges(model.config.num_layers, num_stages)[stage]
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.aux_weight = 1.0  # of each micro-batch's router aux loss (1 / micro-batches: their mean)
        self.autocast_dtype: torch.dtype | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.aux_loss_sum = 0.0  # weighted router aux losses of this stage since the reset
        self.expert_load: dict[int, torch.Tensor] = {}  # layer index -> tokens routed to each expert
        self.counting = True

    @contextmanager
    def shape_inference(self):
        """A forward run only to learn shapes: it must not count in the statistics or in the
        routers' load counts (the bias balancing reads those)."""
        loads = [(m.observed_load, m.observed_load.clone()) for m in self.modules()
                 if isinstance(getattr(m, "observed_load", None), torch.Tensor)]
        self.counting = False
        try:
            yield
        finally:
            self.counting = True
            for buffer, saved in loads:
                buffer.copy_(saved)

    @property
    def ties_embedding(self) -> bool:
        """Whether this stage holds a copy of the tied embedding / lm_head weight that another stage
        also holds, so their gradients must be summed."""
        return self.config.tie_word_embeddings and self.num_stages > 1 and (self.is_first or self.is_last)

    def tied_weight(self) -> nn.Parameter:
        return self.embed_tokens.weight if self.is_first else self.lm_head.weight

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """First stage: (input_ids, position_ids); later ones: (hidden, position_ids) from the previous."""
        plain = torch.equal(position_ids, torch.arange(position_ids.shape[1], device=position_ids.device)
                            .expand_as(position_ids))
        # One document per row: the causal kernel, as the model uses when given no position ids.
        mask = None if plain else attention_mask(position_ids, None)
        keep = position_ids > 0
        rope = rope_cos_sin(position_ids, self.config)
        with autocast(x.device, self.autocast_dtype):
            h = self.embed_tokens(x) if self.is_first else x
            for index, layer in self.layers.items():
                h, routing = layer(h, rope, keep, mask)
                if routing is not None:
                    aux = routing.aux_loss * self.aux_weight
                    if self.counting:
                        self.aux_loss_sum += float(aux)
                        self.expert_load[int(index)] = self.expert_load.get(int(index), 0) + routing.tokens_per_expert
                    if aux.requires_grad:
                        h = _AddAuxLoss.apply(h, aux)
            if self.is_last:
                return self.lm_head(self.norm(h))
        return h, position_ids


class YuanPipelineStage(PipelineStage):
    """torch runs one forward to infer the shapes stages exchange (before the first step and after
    each switch between training and evaluation), on real or uninitialised inputs; this stage runs
    it under `PipelineStageModule.shape_inference` so that it leaves no trace in the statistics."""

    def _forward_metadata_inference(self, *args, **kwargs):
        with self.submod.shape_inference():
            return super()._forward_metadata_inference(*args, **kwargs)
