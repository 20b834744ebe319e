"""One worker thread owns the model; requests queue up and are decoded in batches.

Requests that arrive while a batch runs wait for the next one; those that arrive together (within
`batch_wait_s` of the first) share a batch, up to `max_batch_size`. A request whose client went away
is marked cancelled and leaves its batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..inference.engine import Request, TextEvent, run_requests

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """Decoding failed inside the worker; the message says why."""


@dataclass
class _Job:
    request: Request
    index: int  # the caller's index for this request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # shared by the jobs of one caller


class Scheduler:
    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait_s: float = 0.01):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.finished: Counter[str] = Counter()  # requests finished so far, by finish reason
        self.batch_sizes: Counter[int] = Counter()  # batches run so far, by number of requests

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="yuan-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    async def submit(self, requests: list[Request]) -> AsyncIterator[tuple[int, TextEvent]]:
        """Queue the requests; yields (index in `requests`, event) until each has finished. Leaving
        the loop early (a client that disconnects) cancels whatever is still running."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(requests):
            self._queue.put(_Job(r, i, loop, events))
        running = len(requests)
        try:
            while running:
                item = await events.get()
                if isinstance(item, Exception):
                    raise item
                index, event = item
                running -= event.finished
                yield index, event
        finally:
            for r in requests:
                r.cancelled = True

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            jobs = [j for j in jobs if not j.request.cancelled]
            if jobs:
                self.batch_sizes[len(jobs)] += 1
                self._run(jobs)

    def _next_batch(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _run(self, jobs: list[_Job]) -> None:
        try:
            for event in run_requests(self.model, self.tokenizer, [j.request for j in jobs]):
                job = jobs[event.index]
                if event.finished:
                    self.finished[job.request.finish_reason] += 1
                self._deliver(job, (job.index, event))
        except Exception as exc:  # a failed batch must not take the server down with it
            log.exception("generation failed")
            for job in jobs:
                if job.request.finish_reason is None:
                    self._deliver(job, GenerationError(f"generation failed: {exc}"))

    @staticmethod
    def _deliver(job: _Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone; nobody is listening
            job.request.cancelled = True
