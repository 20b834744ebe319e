"""Time to first token of a chat's later turns, and throughput under a shared system prompt, with
and without the prefix cache, in one process.

A conversation in the official format (`q1<n>a1<n>q2<sep>`): each turn's prompt is the history so far
and a new question; the answer is decoded (greedy, --answer tokens, stop tokens ignored) and
becomes part of the next prompt. Each turn's TTFT (the prefill and the first token) is measured
with the cache, where the turn starts from the last turn's state, and without, on the same
prompt. Then --requests prompts sharing a --system prompt of that many tokens, each with its own
question, are served one after another, with and without the cache: tokens per second of the whole.

    .venv/bin/python benchmarks/prefix_cache.py [--preset small | --checkpoint DIR] [--turns 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from yuanmoe.inference.generate import BatchDecoder
from yuanmoe.inference.prefix_cache import PrefixCache
from yuanmoe.inference.sampling import SamplingParams


def serve(model, prompt: list[int], answer: int, cache: PrefixCache | None) -> tuple[float, list[int]]:
    """TTFT of one prompt (seconds) and its answer tokens."""
    params = SamplingParams(max_new_tokens=answer, temperature=0.0)
    start = time.perf_counter()
    decoder = BatchDecoder(model, [prompt], params, stop_token_ids=(-1,), prefix_cache=cache,
                           prefix=cache.lookup(prompt) if cache is not None else None)
    decoder.step()
    ttft = time.perf_counter() - start
    while not decoder.done:
        decoder.step()
    return ttft, decoder.generated[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of a random --preset model")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--question", type=int, default=48, help="tokens of each question")
    parser.add_argument("--answer", type=int, default=48, help="tokens of each answer")
    parser.add_argument("--system", type=int, default=512, help="tokens of the shared system prompt")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gb", type=float, default=1.0, help="the cache's budget")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        if args.checkpoint:
            from yuanmoe import from_pretrained

            model = from_pretrained(args.checkpoint)
        else:
            from yuanmoe import YuanForCausalLM, preset

            model = YuanForCausalLM(preset(args.preset)).eval()
    config = model.config
    specials = {config.eod_token_id, config.sep_token_id, config.pad_token_id}
    ordinary = [i for i in range(3, config.vocab_size) if i not in specials][:4096]
    newline = ordinary[0]  # stands for <n>
    gen = torch.Generator().manual_seed(0)

    def text(n: int) -> list[int]:
        return [ordinary[i] for i in torch.randint(1, len(ordinary), (n,), generator=gen).tolist()]

    print(f"model: {args.checkpoint or args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters), {args.threads} thread(s)")
    serve(model, text(args.question), 2, None)  # warm-up: the process's first forwards are slower
    cache = PrefixCache(int(args.gb * 1e9), (config.eod_token_id,))
    history: list[int] = []
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'TTFT cached':>12} {'TTFT plain':>11} {'ratio':>6}")
    for turn in range(1, args.turns + 1):
        prompt = history + ([newline] if history else []) + text(args.question) + [config.sep_token_id]
        reused_before = cache.tokens_reused
        cached, answer = serve(model, prompt, args.answer, cache)
        plain, same = serve(model, prompt, args.answer, None)
        assert answer == same, "the cache changed the answer"
        print(f"{turn:>4} {len(prompt):>7} {cache.tokens_reused - reused_before:>7} {cached * 1e3:>10.1f}ms "
              f"{plain * 1e3:>9.1f}ms {cached / plain:>6.2f}")
        history = prompt[:-1] + [newline] + answer  # the official format: the turns joined by <n>
    print(f"cache: {cache.stats()}")

    system = text(args.system)
    prompts = [system + text(args.question) + [config.sep_token_id] for _ in range(args.requests)]
    for label, shared in (("no cache", None), ("prefix cache", PrefixCache(int(args.gb * 1e9)))):
        start = time.perf_counter()
        for prompt in prompts:
            serve(model, prompt, args.answer, shared)
        seconds = time.perf_counter() - start
        tokens = sum(len(p) for p in prompts) + args.requests * args.answer
        print(f"shared {args.system}-token system prompt, {args.requests} requests, {label}: {seconds:.2f} s, "
              f"{tokens / seconds:.0f} tokens/s")


if __name__ == "__main__":
    main()
