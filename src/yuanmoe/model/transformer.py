"""The Yuan 2.0-M32 decoder: pre-norm layers of LFA attention and a mixture of SwiGLU experts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import YuanConfig
from ..routers import RouterOutput
from .attention import LocalizedFilteringAttention, rope_cos_sin
from .cache import DecodeCache
from .loss import cross_entropy_mean
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


def attention_mask(position_ids: torch.Tensor, cache: DecodeCache | None = None) -> torch.Tensor:
    """Bool mask [b, 1, s, keys]: causal and within each document (a document starts where the
    position id is 0). Without a cache the keys are the s tokens. With one they are all its slots,
    the s tokens being written at `cache.slots(s)`: a token sees the new tokens of its document up
    to itself and, while it continues the document the cache ended in, the keys `cache.valid` marks.
    The shape does not depend on how full the cache is, so a decode step is the same every time."""
    b, s = position_ids.shape
    device = position_ids.device
    doc = torch.cumsum(position_ids == 0, dim=1)  # [b, s]; 0 = continues the cache's open document
    if cache is None:
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        return (causal & (doc.unsqueeze(2) == doc.unsqueeze(1))).unsqueeze(1)
    offset = torch.arange(cache.max_len, device=device) - cache.length  # [keys] index among the new tokens
    new = (offset >= 0) & (offset < s)
    key_doc = torch.where(new, doc[:, offset.clamp(0, s - 1)], 0)  # [b, keys]; 0 for earlier keys
    causal = offset <= torch.arange(s, device=device).unsqueeze(1)  # [s, keys]
    # cache.valid is False beyond the written slots, so earlier keys are the only ones it admits.
    mask = causal & (new | cache.valid).unsqueeze(1) & (key_doc.unsqueeze(1) == doc.unsqueeze(2))
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
            elif ".router." in name:
                nn.init.normal_(p, 0.0, std * self.config.router_init_scale)
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
        continue each row's sequence. labels [b, s] (HF style, shifted inside, -100 ignored).

        A decode step (a cache and one token per row) never waits on the values of its tensors, so
        it compiles to one graph; its callers keep ids, positions and cache slots in range (the
        generation engine checks prompts and budgets up front). Every other call checks them here."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if logits_to_keep > 0 and labels is not None:
            raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
        b, s = input_ids.shape
        # One document per row, starting at position 0 (and an empty cache): SDPA's causal kernel,
        # no [s, keys] mask (at 16K tokens that mask alone is 256 MB per row).
        one_document = position_ids is None and cache is None
        if position_ids is None:
            start = cache.next_position.unsqueeze(1) if cache is not None else 0
            position_ids = start + torch.arange(s, device=input_ids.device).expand(b, s)
        if cache is None or s > 1:
            one_document = self._check_inputs(input_ids, position_ids, cache) or one_document
        mask = None if one_document else attention_mask(position_ids, cache)
        keep = position_ids > 0
        rope = rope_cos_sin(position_ids, self.config)

        h = self.embed_tokens(input_ids)
        routings = []
        for layer in self.layers:
            h, routing = layer(h, rope, keep, mask, cache)
            if routing is not None:
                routings.append(routing)
        if cache is not None:
            cache.advance(position_ids)
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(h))

        aux = torch.stack([r.aux_loss for r in routings]).sum() if routings else logits.new_zeros(())
        loss = None
        if labels is not None:
            loss = cross_entropy_mean(logits[:, :-1], labels[:, 1:]) + aux
        return CausalLMOutput(logits, loss, aux, routings if output_router else [])

    def _check_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      cache: DecodeCache | None = None) -> bool:
        """Token ids within the vocabulary, positions within the context, the tokens within the
        cache: one host synchronisation for all three. Returns whether every row is one document
        from position 0 into an empty cache (so that plain causal attention is exact)."""
        if input_ids.numel() == 0:
            return False
        vocab, context = self.config.vocab_size, self.config.max_position_embeddings
        s = input_ids.shape[1]
        written = cache.length if cache is not None else input_ids.new_zeros((), dtype=torch.long)
        from_zero = (position_ids == torch.arange(s, device=position_ids.device)).all() & (written == 0)
        low, high, last, used, one_document = torch.stack(
            [input_ids.min().long(), input_ids.max().long(), position_ids.max().long(), written + s,
             from_zero.long()]).tolist()
        if low < 0 or high >= vocab:
            raise ValueError(f"token id {low if low < 0 else high} is out of range for a vocabulary of {vocab}")
        if last >= context:
            raise ValueError(f"position {last} is beyond the model's context ({context} positions)")
        if cache is not None and used > cache.max_len:
            raise ValueError(f"sequence of {used} tokens exceeds the cache ({cache.max_len})")
        return bool(one_document)

    def new_cache(self, batch_size: int, max_len: int | None = None, keep_inputs: bool = False) -> DecodeCache:
        return DecodeCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                           self.dtype, self.device, keep_inputs)
