"""Load on `yuan serve`: static against continuous batching, in one run, on the same checkpoint.

For each batching mode a fresh `yuan serve` process is started on localhost and the same load is
played against it: --clients concurrent clients, each sending --requests streamed completions with
random pauses between them (staggered arrivals), each asking a random max_tokens (so answers of very
different lengths share batches), and a --disconnect share of them hanging up after a few chunks.

Answers (sampled, each request with its own seed) are checked against the answers of the same
requests sent one at a time before the load: one closer to another request's answer than to its own
counts as mixed up, one that departs from its own later as drifted (see `summarize`). Printed per mode: throughput (generated
tokens per second of the load, disconnected requests' chunks included), p50/p99 time to first token,
p50/p99 time per output token after the first, HTTP errors, mixed-up and drifted answers, and the server's RSS
before and after; then continuous over static. Both servers stay up and the load runs --repeats
times against each in turn; each mode reports its best round (the least disturbed on a shared
machine), and the errors, mixed-up and drifted answers of all rounds.

The model is a random tiny preset with a BPE tokenizer (random weights talk nonsense, but seeded
nonsense is deterministic); the server runs with one torch thread (OMP_NUM_THREADS=1).

Usage: python benchmarks/serve_load.py [--clients 24] [--requests 4] [--max-batch-size 8]
       [--pause 0.5] [--disconnect 0.2] [--repeats 3] [--seed 0] [--model tiny|small]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from yuanmoe import YuanForCausalLM, preset, save_pretrained
from yuanmoe.tokenizer import BPETokenizer

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "tinyshakespeare.txt"
MODEL = "bench"


def make_checkpoint(folder: Path, size: str) -> tuple[Path, list[str]]:
    text = CORPUS.read_text()[:200_000]
    tokenizer = BPETokenizer.train(text.split("\n\n"), vocab_size=1024)
    torch.manual_seed(0)
    config = preset(size, vocab_size=tokenizer.vocab_size, eod_token_id=tokenizer.eod_id,
                    sep_token_id=tokenizer.sep_id, pad_token_id=tokenizer.pad_id, initializer_range=0.3)
    path = save_pretrained(YuanForCausalLM(config).eval(), folder / "ckpt", tokenizer=tokenizer)
    prompts = [p.strip()[:80] for p in text.split("\n\n")[:64] if p.strip()]
    return path, prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, checkpoint: Path, batching: str, max_batch_size: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "yuanmoe.cli", "serve", str(checkpoint), "--port", str(self.port),
             "--model-name", MODEL, "--batching", batching, "--max-batch-size", str(max_batch_size),
             "--device", "cpu", "--max-queued-tokens", "1000000"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"yuan serve --batching {batching} did not start")
            time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def completion(client: httpx.AsyncClient, prompt: str, max_tokens: int, hang_up_after: int | None) -> dict:
    """One streamed completion: its text, chunk arrival times, status, and whether we hung up."""
    # Sampled with a seed of its own: the row's generator draws the same numbers in any batch, so the
    # answer is fixed whatever shares its batch (greedy answers of random weights meet near-ties that
    # the rounding of other batch shapes flips, which would hide what this check is for).
    seed = sum(prompt.encode()) * 1000 + max_tokens
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = {"status": None, "text": "", "times": [], "tokens": 0, "hung_up": False}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        result["status"] = response.status_code
        if response.status_code != 200:
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                result["status"] = 500
                return result
            if data.get("usage"):
                result["tokens"] = data["usage"]["completion_tokens"]
            for choice in data["choices"]:
                if choice["text"]:
                    result["text"] += choice["text"]
                    result["times"].append(time.perf_counter() - start)
            if hang_up_after is not None and len(result["times"]) >= hang_up_after:
                result["hung_up"] = True
                result["tokens"] = len(result["times"])
                return result
    return result


async def play(url: str, plan: list[list[tuple]]) -> tuple[list[dict], float]:
    """Each client sends its requests in turn, pausing before each; returns results and wall time."""
    limits = httpx.Limits(max_connections=len(plan) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def client_run(requests):
            out = []
            for pause, prompt, max_tokens, hang_up_after in requests:
                await asyncio.sleep(pause)
                out.append({"prompt": prompt, "max_tokens": max_tokens,
                            **await completion(client, prompt, max_tokens, hang_up_after)})
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(client_run(r) for r in plan))
        return [r for rs in results for r in rs], time.perf_counter() - start


async def references(url: str, jobs: set[tuple[str, int]]) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return {job: (await completion(client, *job, None))["text"] for job in sorted(jobs)}


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(results: list[dict], wall: float, expected: dict) -> dict:
    """A round's figures. An answer that differs from its reference is "mixed up" when it shares a
    longer start with another request's reference than with its own, else "drifted": the MoE routes
    each token to its top-2 experts, and a near-tie between two experts' scores can flip with the
    rounding of another batch shape, after which the answer goes its own way (the tiny model's few
    routings rarely meet one; the small model's do)."""
    done = [r for r in results if r["status"] == 200]
    mixed_up = drifted = 0
    for r in done:
        own = expected[(r["prompt"], r["max_tokens"])]
        if r["hung_up"] or r["text"] == own:
            continue
        if max(common_prefix(r["text"], text) for text in expected.values()) > common_prefix(r["text"], own):
            mixed_up += 1
        else:
            drifted += 1
    return {"throughput": sum(r["tokens"] for r in done) / wall, "wall": wall, "mixed_up": mixed_up,
            "drifted": drifted, "ttft": [r["times"][0] for r in done if r["times"]],
            "tpot": [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in done if len(r["times"]) > 1],
            "errors_5xx": sum(1 for r in results if (r["status"] or 500) >= 500),
            "errors_4xx": sum(1 for r in results if r["status"] and 400 <= r["status"] < 500),
            "hung_up": sum(r["hung_up"] for r in done)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--pause", type=float, default=0.5, help="longest pause before each request, seconds")
    p.add_argument("--disconnect", type=float, default=0.2, help="share of requests that hang up early")
    p.add_argument("--repeats", type=int, default=3, help="rounds per mode, in turn; each mode keeps its best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["tiny", "small"], default="tiny")
    args = p.parse_args()

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, prompts = make_checkpoint(Path(tmp), args.model)
        plan = [[(rng.uniform(0, args.pause), rng.choice(prompts), rng.choice([8, 16, 32, 64, 128]),
                  rng.randint(1, 4) if rng.random() < args.disconnect else None)
                 for _ in range(args.requests)] for _ in range(args.clients)]
        jobs = {(prompt, max_tokens) for client in plan for _, prompt, max_tokens, _ in client}
        print(f"{args.clients} clients x {args.requests} streamed requests, pauses 0-{args.pause} s, max_tokens 8-128, "
              f"{args.disconnect:.0%} hang up early; {args.model} model, max batch {args.max_batch_size}, "
              f"1 torch thread")
        servers = {batching: Server(checkpoint, batching, args.max_batch_size) for batching in ("static", "continuous")}
        try:
            # One at a time, no load: the answers every mode must give.
            expected = asyncio.run(references(servers["static"].url, jobs))
            rss_before = {name: rss_mb(server.process.pid) for name, server in servers.items()}
            rounds = {name: [] for name in servers}
            for _ in range(args.repeats):  # in turn, so both modes see the same disturbances
                for name, server in servers.items():
                    results, wall = asyncio.run(play(server.url, plan))
                    rounds[name].append(summarize(results, wall, expected))
            rss_after = {name: rss_mb(server.process.pid) for name, server in servers.items()}
            cancelled = {name: next((line.split()[-1] for line in httpx.get(server.url + "/metrics").text.splitlines()
                                     if line.startswith('yuan_requests_finished_total{reason="cancelled"}')), "0")
                         for name, server in servers.items()}
        finally:
            for server in servers.values():
                server.close()

    rows = {name: max(results, key=lambda r: r["throughput"]) for name, results in rounds.items()}
    print(f"{'batching':<11} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
          f"{'5xx':>4} {'4xx':>4} {'mixed':>5} {'drift':>5} {'hung up':>7} {'wall s':>7} {'RSS MB before->after':>21}")
    for name, r in rows.items():
        print(f"{name:<11} {r['throughput']:>7.1f} {percentile(r['ttft'], 50) * 1e3:>7.0f}ms "
              f"{percentile(r['ttft'], 99) * 1e3:>7.0f}ms {percentile(r['tpot'], 50) * 1e3:>7.1f}ms "
              f"{percentile(r['tpot'], 99) * 1e3:>7.1f}ms {r['errors_5xx']:>4} {r['errors_4xx']:>4} {r['mixed_up']:>5} {r['drifted']:>5} "
              f"{r['hung_up']:>7} {r['wall']:>7.1f} {rss_before[name]:>10.0f} -> "
              f"{rss_after[name]:.0f}")
    for name, results in rounds.items():
        speeds = ", ".join(f"{r['throughput']:.0f}" for r in results)
        print(f"{name} rounds: tok/s {speeds}; 5xx "
              f"{sum(r['errors_5xx'] for r in results)}, mixed up {sum(r['mixed_up'] for r in results)}, drifted {sum(r['drifted'] for r in results)}, hung up "
              f"{sum(r['hung_up'] for r in results)} and cancelled by the server {cancelled[name]}, in all")
    s, c = rows["static"], rows["continuous"]
    print(f"continuous / static: throughput {c['throughput'] / s['throughput']:.2f}x (target >= 1.5x), "
          f"p99 TTFT {percentile(c['ttft'], 99) / percentile(s['ttft'], 99):.2f}x (target < 1)")


if __name__ == "__main__":
    main()
