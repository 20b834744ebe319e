"""`yuan plan`: per-GPU memory of a training run in every parallel layout, and which ones fit.

For each layout (dp data-parallel ranks, of which ep split the experts, pp pipeline stages, the
weights FSDP-sharded or replicated by DDP) it adds up, for the most loaded rank (a first pipeline
stage, with the embedding):

* weights: fp32 for full training (autocast computes in bf16); for LoRA the frozen base in bf16
  plus fp32 adapters. FSDP divides the non-expert weights by dp and the experts by dp / ep; expert
  parallel gives a rank E / ep experts.
* gradients (fp32) and AdamW's two moments (fp32) of what trains, sharded the same way.
* activations saved for the backward pass, per token and layer, for this code: measured by
  counting the bytes autograd saves (benchmarks/plan_check.py fits them; within 1% on six shapes):
  41h + 10P + 8kF + 8kh bytes with fp32 weights, 17h + 10P + 8kF + 6kh with a bf16 base (h hidden,
  P attention width, F expert width, k experts per token), plus the bf16 copy of every weight
  the layer multiplies by (autocast's cast, or LoRA's W + BA), which autograd keeps too; and per
  token 12 bytes per vocabulary entry for the logits, the loss and their gradients. Activation checkpointing keeps
  only each layer's input and recomputes one layer at a time. A 1F1B first stage holds pp
  micro-batches in flight.
* buffers: FSDP's gathered copies of two layers (the one running and the one prefetched) and the
  unsharded gradients of one; expert parallel's all-to-all send and receive buffers of one layer;
  LoRA's update BA, its gradient and the gradient of W + BA for one layer.

A layout fits when the total stays under 90% of the GPU's memory (the rest for the CUDA context,
NCCL and allocator fragmentation).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from .config import PRESETS, ConfigError, YuanConfig, preset

GiB = 2**30
USABLE = 0.9  # of a GPU's memory; the rest for the CUDA context, NCCL and fragmentation


@dataclass(frozen=True)
class Layout:
    dp: int
    ep: int
    pp: int
    fsdp: bool

    def __str__(self) -> str:
        return f"dp={self.dp},ep={self.ep},pp={self.pp} {'fsdp' if self.fsdp else 'ddp'}"


@dataclass
class Estimate:
    layout: str
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    total: float
    fits: bool


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a config: per layer (non-expert, expert), embedding, final norm."""

    layer_dense: int
    layer_experts: int
    embedding: int
    head: int  # 0 when tied to the embedding
    final_norm: int
    lora_dense: int  # adapter parameters per layer (0 without LoRA)
    lora_experts: int
    adapted_dense: int  # base weights per layer that LoRA adapts
    adapted_experts: int


def count_parameters(config: YuanConfig, lora=None) -> Counts:
    """From the model itself, built on the meta device (with its LoRA adapters when asked)."""
    from .checkpoint import empty_model
    from .training.lora import apply_lora, base_name, is_adapter_name

    model = empty_model(config)
    adapted = set()
    if lora is not None:
        apply_lora(model, lora)
        adapted = {base_name(n) for n, _ in model.named_parameters() if n.endswith(".original")}

    def total(prefix: str, experts: bool | None = None, adapters: bool = False, only_adapted: bool = False) -> int:
        n = 0
        for name, p in model.named_parameters():
            if not name.startswith(prefix) or is_adapter_name(name) != adapters:
                continue
            if experts is not None and (".experts." in name) != experts:
                continue
            if only_adapted and base_name(name) not in adapted:
                continue
            n += p.numel()
        return n

    return Counts(
        layer_dense=total("layers.0.", experts=False), layer_experts=total("layers.0.", experts=True),
        embedding=config.vocab_size * config.hidden_size,
        head=0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size,
        final_norm=config.hidden_size,
        lora_dense=total("layers.0.", experts=False, adapters=True),
        lora_experts=total("layers.0.", experts=True, adapters=True),
        adapted_dense=total("layers.0.", experts=False, only_adapted=True),
        adapted_experts=total("layers.0.", experts=True, only_adapted=True))


def activation_bytes_per_token(config: YuanConfig, bf16_base: bool) -> float:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    h, p, f, k = config.hidden_size, config.attention_projection_size, config.ffn_hidden_size, config.top_k
    if not config.is_moe:
        k = 1
    if bf16_base:
        return 17 * h + 10 * p + 8 * k * f + 6 * k * h
    return 41 * h + 10 * p + 8 * k * f + 8 * k * h


def estimate(config: YuanConfig, layout: Layout, seq_len: int, micro_batch: int = 1, lora=None,
             activation_checkpointing: bool = False, gpu_memory: float = 80.0, counts: Counts | None = None) -> Estimate:
    """Per-GPU bytes of one layout; `micro_batch` sequences per GPU per micro-batch."""
    c = counts or count_parameters(config, lora)
    layers = -(-config.num_layers // layout.pp)  # the first stages are the longest
    dense = layers * c.layer_dense + c.embedding + (c.head + c.final_norm if layout.pp == 1 else 0)
    experts = layers * c.layer_experts / layout.ep
    dense_share = layout.dp if layout.fsdp else 1
    expert_share = layout.dp // layout.ep if layout.fsdp else 1
    local = dense / dense_share + experts / expert_share
    if lora is None:
        weights = 4 * local
        trainable = local
    else:
        weights = 2 * local
        trainable = (layers * c.lora_dense) / dense_share + (layers * c.lora_experts / layout.ep) / expert_share
        weights += 4 * trainable
    gradients, optimizer = 4 * trainable, 8 * trainable

    tokens = micro_batch * seq_len
    in_flight = layout.pp  # 1F1B: the first stage holds pp micro-batches
    per_layer = tokens * activation_bytes_per_token(config, bf16_base=lora is not None)
    if lora is None:
        weight_copies = 2 * (c.layer_dense + c.layer_experts / layout.ep)
    else:
        weight_copies = 2 * (c.adapted_dense + c.adapted_experts / layout.ep)
    # fp32 log-softmax saved (4 bytes), the bf16 logits (2) and, entering the backward pass, their
    # gradient in fp32 and bf16 (6).
    logits = 12 * tokens * config.vocab_size
    if activation_checkpointing:
        layer_input = tokens * config.hidden_size * (2 if lora is not None else 4)
        activations = layers * layer_input * in_flight + per_layer + weight_copies + logits
    else:
        activations = layers * (per_layer + weight_copies) * in_flight + logits

    buffers = 0.0
    gather_bytes = 2 if lora is not None else 4
    layer_params = c.layer_dense + c.layer_experts / layout.ep
    if layout.fsdp and layout.dp > 1:
        buffers += 2 * gather_bytes * layer_params  # one layer running, the next one prefetched
        buffers += 4 * (c.lora_dense + c.lora_experts / layout.ep if lora is not None else layer_params)
    if lora is not None:
        # LoRA's working tensors for one layer: the update BA in fp32, its gradient in fp32 and the
        # gradient of W + BA in bf16.
        buffers += 10 * (c.adapted_dense + c.adapted_experts / layout.ep)
    if layout.ep > 1:
        # Dispatch and combine, each a send and a receive buffer of tokens * k rows of bf16.
        buffers += 4 * tokens * config.top_k * config.hidden_size * 2
    total = weights + gradients + optimizer + activations + buffers
    return Estimate(str(layout), weights, gradients, optimizer, activations, buffers, total,
                    total <= USABLE * gpu_memory * GiB)


def layouts(config: YuanConfig, gpus: int) -> list[Layout]:
    """Every layout `yuan train` accepts on `gpus` GPUs: pp divides the GPUs and is at most the
    layers, ep divides dp and the experts; DDP only without pipeline and with ep 1 or dp."""
    found = []
    for pp in range(1, gpus + 1):
        if gpus % pp or pp > config.num_layers:
            continue
        dp = gpus // pp
        for ep in range(1, dp + 1):
            if dp % ep or (ep > 1 and (not config.is_moe or config.num_experts % ep)):
                continue
            for fsdp in (True, False):
                if not fsdp and (pp > 1 or 1 < ep < dp):
                    continue
                found.append(Layout(dp, ep, pp, fsdp))
    return found


def plan(config: YuanConfig, gpus: int, gpu_memory: float, seq_len: int, micro_batch: int = 1, lora=None,
         activation_checkpointing: bool = False) -> list[Estimate]:
    counts = count_parameters(config, lora)
    return [estimate(config, layout, seq_len, micro_batch, lora, activation_checkpointing, gpu_memory, counts)
            for layout in layouts(config, gpus)]


def register(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of a training run in every parallel layout, and which fit")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="yuan2-m32")
    src.add_argument("--config", help="a config.json (this project's or the official format)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-batch (default 1)")
    p.add_argument("--lora-rank", type=int, help="plan LoRA of this rank instead of full training")
    p.add_argument("--lora-targets", default="attention,experts", help="LoRA targets (default attention,experts)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from .info import load_any_config
    from .training.lora import LoraSpec

    config = load_any_config(args.config) if args.config else preset(args.preset)
    for name in ("gpus", "gpu_memory", "seq", "micro_batch"):
        if not 0 < getattr(args, name) < math.inf:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive and finite, got {getattr(args, name)}")
    lora = LoraSpec.parse(args.lora_rank, None, args.lora_targets) if args.lora_rank is not None else None
    estimates = plan(config, args.gpus, args.gpu_memory, args.seq, args.micro_batch, lora,
                     args.activation_checkpointing)
    if args.json:
        print(json.dumps({"gpus": args.gpus, "gpu_memory_gib": args.gpu_memory, "seq": args.seq,
                          "micro_batch": args.micro_batch, "lora_rank": args.lora_rank,
                          "activation_checkpointing": args.activation_checkpointing, "usable_fraction": USABLE,
                          "layouts": [asdict(e) for e in estimates]}))
        return 0
    what = f"LoRA rank {args.lora_rank}" if lora else "full fine-tuning"
    print(f"{what}, {args.gpus} x {args.gpu_memory:g} GiB, {args.micro_batch} x {args.seq} tokens per GPU per "
          f"micro-batch{', activation checkpointing' if args.activation_checkpointing else ''} (GiB per GPU; "
          f"fits: under {USABLE:.0%} of the GPU)")
    print(f"{'layout':<24}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'buffers':>9}{'total':>9}  fits")
    for e in estimates:
        print(f"{e.layout:<24}" + "".join(f"{v / GiB:9.1f}" for v in (e.weights, e.gradients, e.optimizer,
                                                                   e.activations, e.buffers, e.total))
              + ("  yes" if e.fits else "  no"))
    return 0
