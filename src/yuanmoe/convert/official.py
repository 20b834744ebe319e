"""The official Yuan2-M32-hf format: config.json keys and tensor names, both directions.

Differences from this project's layout, all handled here and only here:
* q/k heads: the official code views cat([q_proj(f), k_proj(f)]) as [heads, 2*head_dim] and
  splits each head's slice, so query head h is rows [2hd, 2hd+d) of cat(Wq, Wk) and key head h
  rows [2hd+d, 2hd+2d). We keep plain q/k heads and permute the rows once at the boundary.
* LFA convolutions: Conv2d weights [out, in, 2, 1] <-> linear [out, 2*in] over (earlier, current).
* Experts: per-expert `experts.{e}.w1/w2` <-> stacked `[E, 2F, d]` / `[E, d, F]`.
* Dense FFN (no experts): official down(gate(x) * silu(up(x))) <-> w1 = [up; gate], w2 = down.
* Tied head: `lm_head.weight` is written (as official checkpoints carry it) and read only to
  check it matches the embedding.
"""

from __future__ import annotations

import re

import torch

from ..config import ConfigError, YuanConfig

OFFICIAL_ROUTERS = {"attention"}


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model expects; the message lists what is wrong."""


def config_from_official(data: dict) -> YuanConfig:
    """Build a YuanConfig from an official config.json dict."""
    try:
        return _config_from_official(data)
    except KeyError as exc:
        raise ConfigError(f"invalid official config: it lacks the field {exc.args[0]!r}") from None
    except (TypeError, AttributeError) as exc:
        raise ConfigError(f"invalid official config: a field has the wrong type ({exc})") from None


def _config_from_official(data: dict) -> YuanConfig:
    if data.get("model_type", "yuan") != "yuan":
        raise ConfigError(f"not a Yuan checkpoint: model_type is {data.get('model_type')!r}, expected 'yuan'")
    if data.get("use_shareqk"):
        raise ConfigError("config uses use_shareqk (Yuan 2.0 without LFA), which this model does not implement")
    moe = data.get("moe_config") or {}
    hidden = data["hidden_size"]
    experts = int(moe.get("moe_num_experts", 0) or 0)
    if experts > 0 and not moe.get("gated_linear_unit", True):
        raise ConfigError("moe_config.gated_linear_unit is false; only SwiGLU experts are supported")
    eod = data.get("eod_token", data.get("eod_token_id", 77185))
    sep = data.get("sep_token", data.get("sep_token_id", 77187))
    pad = data.get("pad_token_id", eod)
    return YuanConfig(
        **_rope_from_official(data),
        vocab_size=data["vocab_size"],
        hidden_size=hidden,
        num_layers=data["num_hidden_layers"],
        num_heads=data["num_attention_heads"],
        attention_projection_size=data.get("attention_projection_size") or hidden,
        rms_norm_eps=data.get("rms_norm_eps", 1e-6),
        num_experts=experts,
        top_k=int(moe.get("moe_top_k", 2)) if experts else 2,
        ffn_hidden_size=int(moe.get("ffn_hidden_size") or data.get("intermediate_size")),
        norm_topk_prob=bool(moe.get("norm_topk_prob", True)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
        eod_token_id=eod,
        sep_token_id=sep,
        pad_token_id=pad if pad is not None else eod,
        initializer_range=data.get("initializer_range", 0.02),
    )


def _rope_from_official(data: dict) -> dict:
    """RoPE fields of an official config.json (spec section 7): the base from `rotary_base` (the vLLM
    port's key) or else `rope_theta`, default 10000 (the official HF code always uses 10000 whatever
    the config says); YaRN from `use_yarn` with the vLLM port's defaults."""
    original = data.get("max_position_embeddings", 4096)
    fields = {"rope_base": float(data.get("rotary_base", data.get("rope_theta", 10000.0))),
              "max_position_embeddings": original}
    if data.get("use_yarn"):
        fields.update(yarn_scale_factor=float(data.get("yarn_scale_factor", 128)),
                      yarn_original_max_position=original,
                      max_position_embeddings=int(data.get("scaled_max_position_embeddings", original)),
                      yarn_attn_factor=float(data.get("attn_factor", 1.0)))
    return fields


def _rope_to_official(config: YuanConfig) -> dict:
    fields = {"rotary_base": config.rope_base, "rope_theta": config.rope_base,
              "max_position_embeddings": config.max_position_embeddings}
    if config.yarn_scale_factor is not None:
        fields.update(use_yarn=True, yarn_scale_factor=config.yarn_scale_factor,
                      max_position_embeddings=config.yarn_original_max_position or config.max_position_embeddings,
                      scaled_max_position_embeddings=config.max_position_embeddings,
                      attn_factor=config.yarn_attn_factor)
    return fields


def check_official_expressible(config: YuanConfig) -> None:
    """Raise ConfigError when the official modeling code cannot run this architecture."""
    if config.is_moe and config.router not in OFFICIAL_ROUTERS:
        raise ConfigError(f"the official format has only the attention router; this model uses {config.router!r}")
    if config.num_shared_experts:
        raise ConfigError("the official format has no shared experts")
    if config.is_moe and config.bias_update_rate > 0:
        raise ConfigError("the official format has no per-expert routing bias (aux-loss-free balancing); "
                          "export a model trained with bias_update_rate = 0")
    if config.rope_dim != config.hidden_size // config.num_heads:
        raise ConfigError("the official code fixes rotary_dim to hidden_size / num_heads")


def config_to_official(config: YuanConfig) -> dict:
    """The official config.json dict for a config the official code can run."""
    check_official_expressible(config)
    return {
        "architectures": ["YuanForCausalLM"],
        "model_type": "yuan",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "attention_projection_size": config.attention_projection_size,
        "hidden_act": "silu",
        **_rope_to_official(config),
        "model_max_length": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "causal_mask": True,
        "use_flash_attention": False,
        "reset_attention_mask": True,
        "reset_position_ids": True,
        "use_loss_mask": False,
        "eod_token": config.eod_token_id,
        "sep_token": config.sep_token_id,
        "eod_token_id": config.eod_token_id,
        "sep_token_id": config.sep_token_id,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.eod_token_id,
        "eos_token_id": config.eod_token_id,
        "output_router_logits": False,
        "moe_config": {
            "moe_num_experts": config.num_experts,
            "moe_top_k": config.top_k,
            "ffn_hidden_size": config.ffn_hidden_size,
            "norm_topk_prob": config.norm_topk_prob,
            "gated_linear_unit": True,
        },
        "torch_dtype": "bfloat16",
    }


def _qk_from_official(wq: torch.Tensor, wk: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.cat([wq, wk], dim=0)  # [2P, hidden]
    per_head = both.view(heads, 2, -1, both.shape[-1])  # [heads, (q|k), head_dim, hidden]
    return per_head[:, 0].reshape(wq.shape), per_head[:, 1].reshape(wk.shape)


def _qk_to_official(wq: torch.Tensor, wk: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = wq.shape[-1]
    both = torch.stack([wq.view(heads, -1, hidden), wk.view(heads, -1, hidden)], dim=1).reshape(-1, hidden)
    return both[: wq.shape[0]], both[wq.shape[0]:]


def _conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w[:, :, 0, 0], w[:, :, 1, 0]], dim=1)


def _linear_to_conv(w: torch.Tensor) -> torch.Tensor:
    return torch.stack(w.chunk(2, dim=1), dim=2).unsqueeze(-1)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _taker(src: dict[str, torch.Tensor]):
    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise CheckpointError(f"official checkpoint is missing tensor {name}")
        return src.pop(name)

    return take


def official_to_native(tensors: dict[str, torch.Tensor], config: YuanConfig) -> dict[str, torch.Tensor]:
    """Rename and reshape official tensors into this project's state dict (names as in
    YuanForCausalLM.state_dict(), lm_head omitted when tied)."""
    src = dict(tensors)
    take = _taker(src)
    out = _shared_from_official(take, src, config)
    for i in range(config.num_layers):
        out.update(_layer_from_official(take, config, i))
    leftovers = sorted(k for k in src if not k.endswith("rotary_emb.inv_freq"))
    if leftovers:
        shown = ", ".join(leftovers[:10]) + (f" and {len(leftovers) - 10} more" if len(leftovers) > 10 else "")
        raise CheckpointError(f"official checkpoint has unexpected tensors: {shown}")
    return out


def official_shared_to_native(tensors: dict[str, torch.Tensor], config: YuanConfig) -> dict[str, torch.Tensor]:
    """official_to_native for the tensors outside the layers: embedding, final norm, head."""
    src = dict(tensors)
    return _shared_from_official(_taker(src), src, config)


def official_layer_to_native(tensors: dict[str, torch.Tensor], config: YuanConfig, i: int,
                             experts: bool = True) -> dict[str, torch.Tensor]:
    """official_to_native for the tensors of layer i alone (`model.layers.{i}.*`), so a loader can
    convert a large checkpoint one layer at a time. experts=False leaves the experts out (and
    `tensors` need not hold them): a loader that wants only some experts stacks those itself."""
    return _layer_from_official(_taker(dict(tensors)), config, i, experts)


def official_expert_name(layer: int, expert: int, w: str) -> str:
    """The official name of one expert's w1 or w2; natively, row `expert` of `layers.{layer}.mlp.experts.{w}`."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{w}.weight"


def _shared_from_official(take, src: dict[str, torch.Tensor], config: YuanConfig) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if config.tie_word_embeddings:
        head = src.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, out["embed_tokens.weight"]):
            raise CheckpointError("tie_word_embeddings is set but lm_head.weight differs from the embedding")
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    return out


def _layer_from_official(take, config: YuanConfig, i: int, experts: bool = True) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    p, q = f"model.layers.{i}.", f"layers.{i}."
    out[q + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
    out[q + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
    a = p + "self_attn."
    wq, wk = _qk_from_official(take(a + "q_proj.weight"), take(a + "k_proj.weight"), config.num_heads)
    out[q + "self_attn.q_proj.weight"], out[q + "self_attn.k_proj.weight"] = wq, wk
    out[q + "self_attn.v_proj.weight"] = take(a + "v_proj.weight")
    out[q + "self_attn.o_proj.weight"] = take(a + "o_proj.weight")
    for conv in ("conv1", "conv2"):
        out[q + f"self_attn.lf_gate.{conv}.weight"] = _conv_to_linear(take(a + f"lf_gate.{conv}.weight"))
        out[q + f"self_attn.lf_gate.{conv}.bias"] = take(a + f"lf_gate.{conv}.bias")
    out[q + "self_attn.lf_gate.norm.weight"] = take(a + "lf_gate.output_layernorm.weight")
    m = p + "mlp."
    if config.is_moe:
        for proj in ("query", "key", "value"):
            out[q + f"mlp.router.{proj}.weight"] = take(m + f"gate.{proj}.weight")
        for w in ("w1", "w2") if experts else ():
            out[q + f"mlp.experts.{w}"] = torch.stack(
                [take(official_expert_name(i, e, w)) for e in range(config.num_experts)])
    else:
        out[q + "mlp.w1.weight"] = torch.cat([take(m + "up_proj.weight"), take(m + "gate_proj.weight")])
        out[q + "mlp.w2.weight"] = take(m + "down_proj.weight")
    return out


def native_to_official(state: dict[str, torch.Tensor], config: YuanConfig) -> dict[str, torch.Tensor]:
    """Inverse of official_to_native: this project's state dict in official names and layouts."""
    check_official_expressible(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _LAYER.match("model." + name)
        if name in ("embed_tokens.weight", "norm.weight"):
            out["model." + name] = t
        elif name == "lm_head.weight":
            out[name] = t
        elif m is None:
            raise CheckpointError(f"tensor {name} has no official counterpart")
        else:
            i, rest = m.group(1), m.group(2)
            p = f"model.layers.{i}."
            if rest == "self_attn.q_proj.weight":
                wq, wk = _qk_to_official(t, state[f"layers.{i}.self_attn.k_proj.weight"], config.num_heads)
                out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = wq, wk
            elif rest == "self_attn.k_proj.weight":
                continue
            elif rest.startswith("self_attn.lf_gate.conv") and rest.endswith(".weight"):
                out[p + rest] = _linear_to_conv(t)
            elif rest == "self_attn.lf_gate.norm.weight":
                out[p + "self_attn.lf_gate.output_layernorm.weight"] = t
            elif rest.startswith("mlp.router."):
                out[p + rest.replace("mlp.router.", "mlp.gate.")] = t
            elif rest in ("mlp.experts.w1", "mlp.experts.w2"):
                w = rest.rsplit(".", 1)[1]
                for e in range(t.shape[0]):
                    out[p + f"mlp.experts.{e}.{w}.weight"] = t[e]
            elif rest == "mlp.w1.weight":
                up, gate = t.chunk(2, dim=0)
                out[p + "mlp.up_proj.weight"], out[p + "mlp.gate_proj.weight"] = up, gate
            elif rest == "mlp.w2.weight":
                out[p + "mlp.down_proj.weight"] = t
            else:
                out[p + rest] = t
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
