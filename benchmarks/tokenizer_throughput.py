"""Encoding throughput of the tokenizers on bilingual text (zh-alpaca + tinyshakespeare).

Baseline: raw SentencePiece `encode` on the same records, in the same process; YuanTokenizer adds
the special-token split on top of it. BPETokenizer (byte-level, trained here on the first records)
is timed on the same text.

    .venv/bin/python benchmarks/tokenizer_throughput.py [--mb 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from yuanmoe.tokenizer import BPETokenizer, YuanTokenizer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def bilingual_records(megabytes: float) -> list[str]:
    zh = json.loads((SHARED / "corpus" / "zh-alpaca-part-00.json").read_text())
    zh_texts = ["\n".join(v for v in (r["instruction"], r["input"], r["output"]) if v) for r in zh]
    en_texts = (SHARED / "corpus" / "tinyshakespeare.txt").read_text().split("\n\n")
    budget, out = megabytes * 1e6, []
    for pair in zip(zh_texts, en_texts * (len(zh_texts) // len(en_texts) + 1)):
        for t in pair:
            out.append(t)
            budget -= len(t.encode())
        if budget <= 0:
            break
    return out


def timed(fn, texts) -> tuple[float, int]:
    start = time.perf_counter()
    ids = fn(texts)
    return time.perf_counter() - start, sum(map(len, ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of UTF-8 text to encode")
    args = parser.parse_args()
    texts = bilingual_records(args.mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    yuan = YuanTokenizer.from_pretrained(SHARED / "yuan" / "tokenizer")
    bpe = BPETokenizer.train(texts[:4000], vocab_size=8192)
    print(f"{len(texts)} records, {mb:.2f} MB of UTF-8 text")
    base_s, base_n = timed(lambda ts: [yuan.sp.encode(t) for t in ts], texts)
    print(f"{'sentencepiece encode (baseline)':36s} {mb / base_s:7.2f} MB/s {base_n / base_s / 1e6:6.2f} M tok/s")
    for name, fn in [("YuanTokenizer.encode per record", lambda ts: [yuan.encode(t) for t in ts]),
                     ("YuanTokenizer.encode_batch", yuan.encode_batch),
                     ("BPETokenizer.encode per record", lambda ts: [bpe.encode(t) for t in ts]),
                     ("BPETokenizer.encode_batch", bpe.encode_batch)]:
        sec, n = timed(fn, texts)
        print(f"{name:36s} {mb / sec:7.2f} MB/s {n / sec / 1e6:6.2f} M tok/s  {base_s / sec:5.2f}x baseline")


if __name__ == "__main__":
    main()
