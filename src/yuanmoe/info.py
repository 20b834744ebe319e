"""Parameter and FLOP counts of a configuration, computed on the meta device (nothing allocated)."""

from __future__ import annotations

import json

import torch

from .config import PRESETS, ConfigError, YuanConfig, preset


def model_stats(config: YuanConfig, seq_len: int | None = None) -> dict:
    from .model import YuanForCausalLM

    with torch.device("meta"):
        model = YuanForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = experts // (config.num_experts * config.num_layers) if config.is_moe else 0
    active = total - experts + config.num_layers * config.top_k * per_expert if config.is_moe else total
    embedding = config.vocab_size * config.hidden_size
    # Every active weight is one multiply-add per token; the tied head counts as the output matmul
    # while the embedding lookup is free, so 2 * active covers both with no double count.
    matmul_params = active - (0 if config.tie_word_embeddings else embedding)
    seq_len = seq_len or config.max_position_embeddings
    # Causal attention: QK^T and AV over on average seq_len/2 keys, per layer.
    attn_flops = 2 * 2 * config.num_layers * config.attention_projection_size * seq_len / 2
    return {
        "total_params": total,
        "active_params": active,
        "expert_params": experts,
        "embedding_params": embedding,
        "forward_gflops_per_token": 2 * matmul_params / 1e9,
        "attention_gflops_per_token": attn_flops / 1e9,
        "attention_seq_len": seq_len,
    }


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter and FLOP counts of a preset or config")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="yuan2-m32")
    src.add_argument("--config", help="a config.json (this project's or the official format)")
    p.add_argument("--seq-len", type=int, help="sequence length for the attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigError(f"--seq-len must be at least 1, got {args.seq_len}")
    if args.config:
        config = load_any_config(args.config)
    else:
        config = preset(args.preset)
    stats = model_stats(config, args.seq_len)
    if args.json:
        print(json.dumps({"config": config.to_dict(), **stats}))
    else:
        print(f"total parameters        {_count(stats['total_params'])}")
        print(f"active per token        {_count(stats['active_params'])}")
        print(f"forward GFLOPs / token  {stats['forward_gflops_per_token']:8.4g}"
              f"  (+ {stats['attention_gflops_per_token']:.4g} attention at {stats['attention_seq_len']} tokens)")
        print(f"layers {config.num_layers}, hidden {config.hidden_size}, heads {config.num_heads} x "
              f"{config.head_dim}, experts {config.num_experts} (top-{config.top_k}, FFN {config.ffn_hidden_size}), "
              f"router {config.router}")
    return 0


def load_any_config(path: str) -> YuanConfig:
    """A config.json in this project's format or the official one (recognised by model_type)."""
    from pathlib import Path

    from .convert import config_from_official

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"no config file at {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a JSON object")
    return config_from_official(data) if "model_type" in data else YuanConfig.from_dict(data)


def _count(n: int) -> str:
    """A parameter count in billions, or in millions below one billion (tiny presets are not 0.000 B)."""
    return f"{n / 1e9:8.3f} B" if n >= 1e9 else f"{n / 1e6:8.3f} M"
