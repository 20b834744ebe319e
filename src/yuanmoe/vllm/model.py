"""YuanForCausalLM built from vLLM's layers, loading official Yuan2-M32-hf folders.

* Attention: q and k from the LFA-filtered input (`lfa.LocalizedFilter`), v from the normed input,
  RoPE (rotate-half) on the first hidden/heads dims of each head, vLLM's paged `Attention`. Heads
  are split over tensor-parallel ranks; the filter is replicated.
* MoE: the Attention Router's scores P = softmax(q k^T) v, in fp32, are the routing logits of a
  `FusedMoE`, whose routing function takes softmax(P), its top-k, renormalised when the config asks.
* Weights: official tensor names; the q/k head interleave and the Conv2d kernels are converted by
  `yuanmoe.convert.official`, expert w1 = [gate; up] is split into vLLM's w1/w3 shards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                               ReplicatedLinear, RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsPP
from vllm.model_executor.models.utils import (PPMissingLayer, is_pp_missing_parameter,
                                              make_empty_intermediate_tensors_factory, make_layers,
                                              maybe_prefix)
from vllm.sequence import IntermediateTensors

from ..convert.official import CheckpointError, _conv_to_linear, _qk_from_official
from .lfa import LocalizedFilter, lfa_state_shape


def attention_router_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FusedMoE routing from the Attention Router's scores: softmax over the experts in fp32, the
    top-k, renormalised to sum to 1 when `renormalize`."""
    weights, ids = torch.topk(torch.softmax(gating_output.float(), dim=-1), topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


class AttentionRouter(nn.Module):
    """P = softmax(q k^T) v per token, q, k, v in R^experts, everything in fp32 (replicated)."""

    def __init__(self, hidden_size: int, num_experts: int, prefix: str):
        super().__init__()
        for name in ("query", "key", "value"):
            setattr(self, name, ReplicatedLinear(hidden_size, num_experts, bias=False, params_dtype=torch.float32,
                                                 return_bias=False, prefix=f"{prefix}.{name}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        q, k, v = self.query(x), self.key(x), self.value(x)
        attn = torch.softmax(q.unsqueeze(-1) * k.unsqueeze(-2), dim=-1)  # [T, E, E]
        return torch.bmm(attn, v.unsqueeze(-1)).squeeze(-1)


class YuanMoE(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        moe = config.moe_config
        self.gate = AttentionRouter(config.hidden_size, moe["moe_num_experts"], prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(
            num_experts=moe["moe_num_experts"], top_k=moe.get("moe_top_k", 2), hidden_size=config.hidden_size,
            intermediate_size=moe.get("ffn_hidden_size") or config.intermediate_size,
            renormalize=bool(moe.get("norm_topk_prob", True)), quant_config=quant_config,
            custom_routing_function=attention_router_topk, prefix=f"{prefix}.experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class YuanAttention(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        tp = get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads {config.num_attention_heads} is not divisible by the "
                             f"tensor-parallel size {tp}")
        self.num_heads = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        size = config.num_attention_heads * self.head_dim
        self.lf_gate = LocalizedFilter(config.hidden_size, config.rms_norm_eps, vllm_config.model_config.dtype,
                                       prefix=f"{prefix}.lf_gate")
        self.qk_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=False,
                                                  quant_config=quant_config, prefix=f"{prefix}.qk_proj")
        self.v_proj = ColumnParallelLinear(config.hidden_size, size, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(size, config.hidden_size, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        rotary_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   is_neox_style=True, dtype=torch.float32,
                                   rope_parameters={"rope_type": "default", "rope_theta": config.rope_base,
                                                    "rope_dim": rotary_dim})
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        f = self.lf_gate(x, positions)
        q, k = self.qk_proj(f)[0].chunk(2, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        v = self.v_proj(x)[0]
        return self.o_proj(self.attn(q, k, v))[0]


class YuanDecoderLayer(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = YuanAttention(config, vllm_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.moe_config.get("moe_num_experts"):
            raise ValueError("config.json has no experts (moe_config.moe_num_experts); the yuanmoe vLLM plugin "
                             "serves the MoE models (Yuan 2.0-M32)")
        self.mlp = YuanMoE(config, vllm_config.quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class YuanModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: YuanDecoderLayer(config, vllm_config, prefix),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def forward(self, input_ids, positions, intermediate_tensors, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            h = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
            residual = None
        else:
            h, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in self.layers[self.start_layer:self.end_layer]:
            h, residual = layer(positions, h, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": h, "residual": residual})
        return self.norm(h, residual)[0]


class YuanForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsPP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = YuanModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int]]:
        return lfa_state_shape(vllm_config.model_config.hf_config.hidden_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return (vllm_config.model_config.dtype,)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        from vllm.model_executor.layers.mamba.mamba_utils import get_conv_copy_spec

        return (get_conv_copy_spec,)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor, kwargs in _vllm_weights(weights, self.config):
            if is_pp_missing_parameter(name, self):
                continue
            if name not in params:
                raise CheckpointError(f"checkpoint tensor maps to {name}, which this model does not have")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(tensor)
            elif "expert_id" in kwargs:
                loader(param, tensor, name, **kwargs)
            elif "shard" in kwargs:
                loader(param, tensor, kwargs["shard"])
            else:
                loader(param, tensor)
            loaded.add(name)
        return loaded


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _vllm_weights(weights: Iterable[tuple[str, torch.Tensor]], config) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """Official (name, tensor) pairs as (parameter name, tensor, weight_loader arguments)."""
    pending_qk: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:
                yield name, tensor, {}
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            yield name, tensor, {}
            continue
        p, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            pair = pending_qk.setdefault(p, {})
            pair[rest.split(".")[1]] = tensor
            if len(pair) == 2:
                del pending_qk[p]
                wq, wk = _qk_from_official(pair["q_proj"], pair["k_proj"], config.num_attention_heads)
                yield p + "self_attn.qk_proj.weight", wq, {"shard": 0}
                yield p + "self_attn.qk_proj.weight", wk, {"shard": 1}
        elif (conv := re.fullmatch(r"self_attn\.lf_gate\.(conv[12])\.weight", rest)) is not None:
            yield p + f"self_attn.lf_gate.{conv.group(1)}.weight", _conv_to_linear(tensor), {}
        elif (expert := re.fullmatch(r"mlp\.experts\.(\d+)\.(w[12])\.weight", rest)) is not None:
            e, which = int(expert.group(1)), expert.group(2)
            if which == "w1":
                gate, up = tensor.chunk(2, dim=0)
                yield p + "mlp.experts.routed_experts.w13_weight", gate, {"shard_id": "w1", "expert_id": e}
                yield p + "mlp.experts.routed_experts.w13_weight", up, {"shard_id": "w3", "expert_id": e}
            else:
                yield p + "mlp.experts.routed_experts.w2_weight", tensor, {"shard_id": "w2", "expert_id": e}
        else:
            yield name, tensor, {}
    if pending_qk:
        raise CheckpointError(f"checkpoint has q_proj without k_proj (or the reverse) in {sorted(pending_qk)}")
