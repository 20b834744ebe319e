"""The server's counters, gauges and latency histograms, rendered in the Prometheus text format
(version 0.0.4) for `GET /metrics`. Updated from the event loop and the generation thread alike,
so every change holds a lock."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

# Seconds: from a few milliseconds (one decode step of a small model) to minutes (a long answer).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(pairs: tuple) -> str:
    """Label values are the server's own words (routes, status codes, finish reasons): no escaping."""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else ""


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # observations <= each bound (filled in cumulatively on output)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters (by label values), histograms and gauges read at render time."""

    def __init__(self, prefix: str = "yuan"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)
        self._counters[name] = Counter()

    def histogram(self, name: str, help: str) -> None:
        self._help[name] = ("histogram", help)
        self._histograms[name] = Histogram()

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def inc(self, name: str, amount: float = 1, **labels) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += amount

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                full = f"{self.prefix}_{name}"
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    values = self._counters[name] or {(): 0}
                    lines += [f"{full}{_labels(k)} {v}" for k, v in sorted(values.items())]
                elif kind == "histogram":
                    lines += self._histograms[name].lines(full)
                else:
                    lines.append(f"{full} {self._gauges[name]()}")
        return "\n".join(lines) + "\n"
