"""One worker thread owns the model and decodes the queued requests in one running batch.

Continuous batching (the default): between two decode steps, waiting requests join the running
batch (prefilled in a forward of their own) up to `max_batch_size`, so a request that arrives while
others decode starts at the next step instead of waiting for the whole batch to end. Static
batching (`continuous=False`, for comparison) admits new requests only when the batch is empty.
Waiting requests are admitted round-robin over the callers that sent them, so one caller's hundred
prompts do not hold back another's single one.

Each request is admitted on its own terms: a request that fails to start gets its error and the
others in its group are started one by one. A request whose client went away is marked cancelled
and leaves the batch at the next step. `max_queued_tokens` bounds the work accepted (prompt plus
max_new_tokens of every unfinished request); past it `submit` raises ServerBusy.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..inference.engine import Request, RunningBatch, TextEvent
from .metrics import Metrics

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """Decoding failed inside the worker; the message says why."""


class ServerBusy(RuntimeError):
    """The queue holds as much work as the server accepts; try again later."""


@dataclass
class _Job:
    request: Request
    index: int  # the caller's index for this request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # shared by the jobs of one caller
    cost: int  # tokens it may hold: its prompt plus max_new_tokens
    submitted: float  # time.monotonic() when queued
    first_event: float | None = None


class Scheduler:
    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait_s: float = 0.01,
                 continuous: bool = True, max_queued_tokens: int | None = None, metrics: Metrics | None = None,
                 prefix_cache=None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.continuous = continuous
        self.max_queued_tokens = max_queued_tokens
        self._queue: queue.Queue[list[_Job] | None] = queue.Queue()
        self._pending: deque[deque[_Job]] = deque()  # worker thread only: the groups waiting to start
        self._lock = threading.Lock()
        self.queued_tokens = 0  # the cost of every unfinished request
        self.waiting = 0  # requests queued but not started
        self.running = 0  # requests in the running batch
        self._thread: threading.Thread | None = None
        self.finished: Counter[str] = Counter()  # requests finished so far, by finish reason
        self.batch_sizes: Counter[int] = Counter()  # decode steps run so far, by number of requests in them
        self.metrics = metrics or Metrics()
        self.prefix_cache = prefix_cache  # inference.prefix_cache.PrefixCache, shared by every batch
        m = self.metrics
        m.gauge("requests_waiting", "requests queued and not yet started", lambda: self.waiting)
        m.gauge("requests_running", "requests in the running batch", lambda: self.running)
        m.gauge("queued_tokens", "prompt plus max_tokens of every unfinished request", lambda: self.queued_tokens)
        m.counter("requests_finished_total", "requests finished, by finish reason")
        m.counter("prompt_tokens_total", "prompt tokens of the requests started")
        m.counter("generation_tokens_total", "tokens generated")
        m.histogram("time_to_first_token_seconds", "from queueing a request to its first output")
        m.histogram("time_per_output_token_seconds", "a request's time per token after its first")
        m.histogram("request_duration_seconds", "from queueing a request to its last output")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="yuan-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, requests: list[Request]) -> AsyncIterator[tuple[int, TextEvent]]:
        """Queue the requests, or raise ServerBusy when they do not fit in the work the server accepts.
        The returned iterator yields (index in `requests`, event) until each has finished; leaving it
        early (a client that disconnects) cancels whatever is still running."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        now = time.monotonic()
        jobs = [_Job(r, i, loop, events, len(r.prompt_ids) + r.params.max_new_tokens, now)
                for i, r in enumerate(requests)]
        cost = sum(j.cost for j in jobs)
        with self._lock:
            if self.max_queued_tokens is not None and self.queued_tokens + cost > self.max_queued_tokens:
                raise ServerBusy(f"the server is busy ({self.queued_tokens} of {self.max_queued_tokens} tokens of "
                                 f"work queued); retry later")
            self.queued_tokens += cost
            self.waiting += len(jobs)
        self._queue.put(jobs)
        return self._events(requests, events)

    @staticmethod
    async def _events(requests: list[Request], events: asyncio.Queue) -> AsyncIterator[tuple[int, TextEvent]]:
        running = len(requests)
        try:
            while running:
                item = await events.get()
                if isinstance(item, Exception):
                    raise item
                for index, event in item:
                    running -= event.finished
                    yield index, event
        finally:
            for r in requests:
                r.cancelled = True

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        batch = RunningBatch(self.model, self.tokenizer, self.prefix_cache)
        running: dict[int, _Job] = {}  # by sequence number in the batch
        while True:
            if not self._collect(block=not running and not self._pending):
                return
            if self.continuous or not running:
                self._admit(batch, running)
            self.running = len(running)
            if not running:
                continue
            self.batch_sizes[len(running)] += 1
            try:
                events = batch.step()
            except Exception as exc:  # a failed step must not take the server down with it
                log.exception("generation failed")
                for job in running.values():
                    self._fail(job, exc)
                running.clear()
                batch = RunningBatch(self.model, self.tokenizer, self.prefix_cache)
                continue
            # One delivery per caller per step: each wakes the caller's event loop, which the
            # generation thread then competes with for the GIL.
            by_caller: dict[int, tuple[_Job, list]] = {}
            for event in events:
                job = self._on_event(running, event)
                by_caller.setdefault(id(job.events), (job, []))[1].append((job.index, event))
            for job, items in by_caller.values():
                self._deliver(job, items)

    def _collect(self, block: bool) -> bool:
        """Move newly queued groups to the pending ones; when idle (`block`) wait for the first and
        for others arriving within batch_wait_s of it. False when asked to stop."""
        deadline = None
        while True:
            try:
                if not block:
                    item = self._queue.get_nowait()
                elif deadline is None:
                    item = self._queue.get()
                    deadline = time.monotonic() + self.batch_wait_s
                else:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
            except queue.Empty:
                return True
            if item is None:
                return False
            self._pending.append(deque(item))

    def _admit(self, batch: RunningBatch, running: dict[int, _Job]) -> None:
        """Start waiting requests, round-robin over their callers, while the batch has room."""
        chosen = []
        while len(running) + len(chosen) < self.max_batch_size and self._pending:
            group = self._pending.popleft()
            job = group.popleft()
            if group:
                self._pending.append(group)
            with self._lock:
                self.waiting -= 1
            if job.request.cancelled:  # its client left while it waited
                self._release(job)
            else:
                chosen.append(job)
        if not chosen:
            return
        try:
            running.update(zip(batch.add([j.request for j in chosen]), chosen))
        except Exception:
            # Find the culprit: start each on its own; only those that fail get the error.
            for job in chosen:
                try:
                    running.update(zip(batch.add([job.request]), [job]))
                except Exception as exc:
                    log.warning("request failed to start: %s", exc)
                    self._fail(job, exc)
        for job in chosen:
            if job.request.finish_reason is None:
                self.metrics.inc("prompt_tokens_total", len(job.request.prompt_ids))

    def _on_event(self, running: dict[int, _Job], event: TextEvent) -> _Job:
        """Account for one event; returns its job."""
        job = running[event.index]
        now = time.monotonic()
        if job.first_event is None:
            job.first_event = now
            self.metrics.observe("time_to_first_token_seconds", now - job.submitted)
        if event.finished:
            del running[event.index]
            request = job.request
            self.finished[request.finish_reason] += 1
            self.metrics.inc("requests_finished_total", reason=request.finish_reason)
            self.metrics.inc("generation_tokens_total", len(request.output_ids))
            self.metrics.observe("request_duration_seconds", now - job.submitted)
            if len(request.output_ids) > 1:
                self.metrics.observe("time_per_output_token_seconds",
                                     (now - job.first_event) / (len(request.output_ids) - 1))
            self._release(job)
        return job

    def _fail(self, job: _Job, exc: Exception) -> None:
        job.request.finish_reason = "error"
        self.finished["error"] += 1
        self.metrics.inc("requests_finished_total", reason="error")
        self._release(job)
        self._deliver(job, GenerationError(f"generation failed: {exc}"))

    def _release(self, job: _Job) -> None:
        with self._lock:
            self.queued_tokens -= job.cost

    @staticmethod
    def _deliver(job: _Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone; nobody is listening
            job.request.cancelled = True
