"""`yuan generate`, `yuan chat` and `yuan serve`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..device import add_device_options
from .sampling import SamplingParams


def _add_model_args(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder (native or official) with its tokenizer")
    add_device_options(p, "weight dtype (default: as stored); bfloat16 halves the memory")
    p.add_argument("--activations", choices=["int8", "float"], default="int8",
                   help="quantized weights on the CPU: multiply int8-quantized activations (int8, the default, "
                        "as llama.cpp) or exact fp32 ones (float)")
    p.add_argument("--quantize", choices=["int8"],
                   help="int8 weight-only quantization (bf16 activations): the fastest CPU decoding; "
                        "on CUDA it saves memory but dequantizes every matmul")


def _add_sampling_args(p, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the answer at this text")


def _add_prefix_cache_arg(p) -> None:
    p.add_argument("--prefix-cache-gb", type=float, default=1.0,
                   help="keep the decoding state of recent conversations within this many GB, so that a "
                        "prompt that repeats one (a chat's next turn, a shared system prompt) prefills only "
                        "the rest (least recently used out first; 0 turns it off; default 1)")


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    _add_model_args(g)
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--chat", action="store_true", help="treat the prompt as a chat question (adds <sep>)")
    _add_sampling_args(g, max_new_tokens=128)
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal (/reset clears the history, /exit quits)")
    _add_model_args(c)
    _add_sampling_args(c, max_new_tokens=512)
    _add_prefix_cache_arg(c)
    c.set_defaults(func=run_chat)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(s)
    _add_prefix_cache_arg(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="the model id clients ask for (default: the checkpoint folder name)")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-tokens-cap", type=int, help="largest max_tokens a request may ask (default: context)")
    s.add_argument("--api-key", default=os.environ.get("YUAN_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every request but /health (default: the "
                        "YUAN_API_KEY environment variable; none: no key)")
    s.add_argument("--max-prompts", type=int, default=64, help="prompts one completion request may hold (default 64)")
    s.add_argument("--max-queued-tokens", type=int,
                   help="work accepted at once, in prompt plus max_tokens tokens; beyond it requests get 429 "
                        "(default: four full batches of the model's context)")
    s.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous: requests join the running batch at the next step (default); static: "
                        "a batch runs to its end before the next starts")
    s.set_defaults(func=run_serve)


def load(args):
    """The model and its tokenizer, checked against each other, on args.device in args.dtype."""
    from ..checkpoint import from_pretrained
    from ..quant import read_quant_config
    from ..quant.modules import set_activations
    from ..tokenizer import load_tokenizer

    if args.quantize and Path(args.checkpoint, "config.json").is_file() and read_quant_config(Path(args.checkpoint)):
        raise ValueError(f"{args.checkpoint} is already quantized; drop --quantize")
    if args.quantize == "int8" and args.dtype not in (None, "bfloat16"):
        raise ValueError(f"--quantize int8 computes in bfloat16 (int8 weights, bf16 activations), so it cannot "
                         f"run in {args.dtype}; drop --dtype or pass --dtype bfloat16")
    # int8 quantizes bf16 weights: loading them in bf16 right away halves the peak memory.
    dtype = "bfloat16" if args.quantize == "int8" else args.dtype
    model = from_pretrained(args.checkpoint, dtype=dtype, device=args.device, activations=args.activations)
    tokenizer = load_tokenizer(args.checkpoint)
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer in {args.checkpoint} has {tokenizer.vocab_size} tokens but the model "
                         f"only {config.vocab_size}; the checkpoint holds the wrong tokenizer")
    if tokenizer.eod_id != config.eod_token_id:
        raise ValueError(f"the tokenizer's <eod> is id {tokenizer.eod_id} but the model's is "
                         f"{config.eod_token_id}; the checkpoint holds the wrong tokenizer")
    if args.quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model)
        set_activations(model, args.activations)
    return model, tokenizer


def _params(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop))


def run_generate(args) -> int:
    from .engine import stream

    params = _params(args)
    model, tokenizer = load(args)
    for piece in stream(model, tokenizer, args.prompt, params, chat=args.chat):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_chat(args) -> int:
    from .engine import Request, encode_prompt, run_requests
    from .prefix_cache import PrefixCache

    params = _params(args)
    prefix_cache = PrefixCache.from_gb(args.prefix_cache_gb)  # checked before the model loads
    model, tokenizer = load(args)
    if prefix_cache is not None:
        prefix_cache.stop_token_ids = (tokenizer.eod_id,)
    context = model.config.max_position_embeddings
    print("chat with the model; /reset clears the history, /exit quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        alone = len(encode_prompt(tokenizer, [{"role": "user", "content": line}], chat=True))
        if alone >= context:  # refuse it, keeping the conversation so far
            print(f"(that message is {alone} tokens; the model's context is {context})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = encode_prompt(tokenizer, history, chat=True)
        while len(ids) >= context and len(history) > 1:
            history = history[2:]  # forget the oldest question and its answer
            ids = encode_prompt(tokenizer, history, chat=True)
        request = Request(ids, params, chat=True)
        sys.stdout.write("yuan> ")
        try:
            for event in run_requests(model, tokenizer, [request], prefix_cache):
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the chat
            request.finish_reason = "cancelled"
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": request.text})


def check_serve_args(args) -> None:
    """The server's numbers, checked before the model loads."""
    from .prefix_cache import PrefixCache

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    for name in ("max_batch_size", "max_tokens_cap", "max_prompts", "max_queued_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    PrefixCache.from_gb(args.prefix_cache_gb)  # refuses a negative or infinite budget
    if args.api_key == "":
        raise ValueError("--api-key (or YUAN_API_KEY) is empty; give a key, or unset it to serve without one")


def run_serve(args) -> int:
    import uvicorn

    from ..serving import create_app

    check_serve_args(args)
    model, tokenizer = load(args)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(model, tokenizer, name, max_tokens_cap=args.max_tokens_cap,
                     max_batch_size=args.max_batch_size, api_key=args.api_key, max_prompts=args.max_prompts,
                     max_queued_tokens=args.max_queued_tokens, continuous=args.batching == "continuous",
                     prefix_cache_gb=args.prefix_cache_gb)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
