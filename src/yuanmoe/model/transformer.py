"""The Yuan 2.0-M32 decoder: pre-norm layers of LFA attention and a mixture of SwiGLU experts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import YuanConfig
from ..routers import RouterOutput
from .attention import LocalizedFilteringAttention, rope_cos_sin
from .cache import DecodeCache
from .moe import MoE, FeedForward
from .norm import RMSNorm


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [batch, seq, vocab]
    loss: torch.Tensor | None = None  # next-token cross entropy (+ router aux losses) when labels are given
    aux_loss: torch.Tensor | None = None  # sum of the routers' balancing losses
    router_outputs: list[RouterOutput] = field(default_factory=list)  # per MoE layer, when asked for


class DecoderLayer(nn.Module):
    def __init__(self, config: YuanConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LocalizedFilteringAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe else FeedForward(config.hidden_size, config.ffn_hidden_size)

    def forward(self, x, rope, keep, mask, cache=None) -> tuple[torch.Tensor, RouterOutput | None]:
        h = x + self.self_attn(self.input_layernorm(x), rope, keep, mask, cache)
        y = self.mlp(self.post_attention_layernorm(h))
        if isinstance(y, tuple):
            y, routing = y
            return h + y, routing
        return h + y, None


def attention_mask(position_ids: torch.Tensor, cache: DecodeCache | None) -> torch.Tensor:
    """Bool mask [b, 1, s, keys]: causal, within each document (a document starts where the
    position id is 0), and over the cache only to keys of the document still open."""
    b, s = position_ids.shape
    doc = torch.cumsum(position_ids == 0, dim=1)  # [b, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    mask = causal & (doc.unsqueeze(2) == doc.unsqueeze(1))
    if cache is not None and cache.length > 0:
        continues = (doc == 0).unsqueeze(2)  # query still in the document the cache ended in
        past = cache.valid[:, : cache.length].unsqueeze(1) & continues
        mask = torch.cat([past, mask], dim=2)
    return mask.unsqueeze(1)


class YuanForCausalLM(nn.Module):
    def __init__(self, config: YuanConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights; the projections back into the residual stream are
        scaled by 1/sqrt(2 * layers) (GPT-2 / Megatron); norms one, biases zero."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: DecodeCache | None = None,
                output_router: bool = False, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids [b, s]. position_ids [b, s] restart at 0 where a packed document starts; the
        model then neither attends nor filters across the boundary. With a cache, the tokens
        continue each row's sequence. labels [b, s] (HF style, shifted inside, -100 ignored)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab}")
        if cache is not None and cache.length + s > cache.max_len:
            raise ValueError(f"sequence of {cache.length + s} tokens exceeds the cache ({cache.max_len})")

        if position_ids is None:
            start = cache.next_position.unsqueeze(1) if cache is not None else 0
            position_ids = start + torch.arange(s, device=input_ids.device).expand(b, s)
            mask = None if cache is None else attention_mask(position_ids, cache)
        else:
            mask = attention_mask(position_ids, cache)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's context "
                             f"({self.config.max_position_embeddings} positions)")
        keep = position_ids > 0
        rope = rope_cos_sin(position_ids, self.config.rope_dim, self.config.rope_base)

        h = self.embed_tokens(input_ids)
        routings = []
        for layer in self.layers:
            h, routing = layer(h, rope, keep, mask, cache)
            if routing is not None:
                routings.append(routing)
        if logits_to_keep > 0:
            if labels is not None:
                raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(h))

        if cache is not None:
            doc = torch.cumsum(position_ids == 0, dim=1)
            opened = doc[:, -1:] > 0
            cache.valid[:, : cache.length] &= ~opened
            cache.valid[:, cache.length: cache.length + s] = doc == doc[:, -1:]
            cache.next_position = position_ids[:, -1] + 1
            cache.length += s

        aux = torch.stack([r.aux_loss for r in routings]).sum() if routings else logits.new_zeros(())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100) + aux
        return CausalLMOutput(logits, loss, aux, routings if output_router else [])

    def new_cache(self, batch_size: int, max_len: int | None = None) -> DecodeCache:
        return DecodeCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                           self.dtype, self.device)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
                 **kwargs) -> torch.Tensor:
        """Full sequences [batch, prompt + new] decoded with the incremental cache."""
        from ..inference.generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)
