"""Run model calls off the event loop, batching concurrent requests.

:class:`DynamicBatcher` serves one (model, version, signature): requests queue up,
a single worker task takes as many as fit in ``max_batch_size`` rows,
concatenates them along dim 0, runs the model once in the thread pool and splits
the outputs back. While a batch runs, new requests queue, so load forms batches
by itself and an idle server adds no latency (``timeout_s > 0`` additionally
waits that long for more rows). :class:`InferenceRunner` owns the thread pool and
one batcher per servable signature.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .config import BatchingConfig

log = logging.getLogger("serving")

Arrays = dict[str, np.ndarray]
InferenceFn = Callable[[Mapping[str, np.ndarray]], Arrays]


def run_batch(fn: InferenceFn, requests: Sequence[Mapping[str, np.ndarray]], rows: Sequence[int]) -> list[Arrays]:
    """Concatenate requests along dim 0, call ``fn`` once, split outputs back (pure, sync)."""
    if len(requests) == 1:
        return [fn(requests[0])]
    merged = {k: np.concatenate([r[k] for r in requests], axis=0) for k in requests[0]}
    out = fn(merged)
    total = int(sum(rows))
    for k, v in out.items():
        if v.ndim == 0 or v.shape[0] != total:
            raise RuntimeError(f"output '{k}' has shape {list(v.shape)}; cannot split a batch of {total} rows")
    cuts = np.cumsum(rows)[:-1]
    parts = {k: np.split(v, cuts, axis=0) for k, v in out.items()}
    return [{k: parts[k][i] for k in out} for i in range(len(requests))]


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    max_requests_per_batch: int = 0


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    def __init__(self, fn: InferenceFn, executor: Executor, max_batch_size: int = 256,
                 timeout_s: float = 0.0, name: str = ""):
        self._fn = fn
        self._executor = executor
        self._max = max(1, max_batch_size)
        self._timeout = max(0.0, timeout_s)
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.stats = BatchStats()

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int) -> Arrays:
        """Queue one request (``rows`` = its dim 0) and wait for its share of a batch."""
        if self._closed:
            raise RuntimeError(f"batcher {self._name} is closed")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._worker(), name=f"batcher {self._name}")
        fut = loop.create_future()
        self._queue.append(_Pending(inputs, rows, fut, loop.time()))
        self._queued_rows += rows
        assert self._wakeup is not None
        self._wakeup.set()
        return await fut

    async def close(self, drain: bool = False) -> None:
        """Stop the worker: after the queued requests ran (``drain``) or at once."""
        self._closed = True
        if self._task is not None:
            if drain and self._wakeup is not None:
                self._wakeup.set()
            else:
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(RuntimeError(f"batcher {self._name} closed"))

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # cancelled by its caller (deadline, disconnect)
                self._queue.popleft()
                self._queued_rows -= p.rows
                continue
            if batch and rows + p.rows > self._max:
                break
            self._queue.popleft()
            self._queued_rows -= p.rows
            batch.append(p)
            rows += p.rows
        return batch

    async def _wait_for_more(self, first: _Pending) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        deadline = first.enqueued + self._timeout
        while self._queued_rows < self._max:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await asyncio.sleep(0)  # requests handed over in this same loop turn join the batch
            if self._timeout > 0:
                await self._wait_for_more(self._queue[0])
            batch = self._take()
            if not batch:
                continue
            rows = [p.rows for p in batch]
            try:
                results = await loop.run_in_executor(
                    self._executor, run_batch, self._fn, [p.inputs for p in batch], rows)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.cancel()
                raise
            except Exception as exc:  # one model error fails every request of that batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            s = self.stats
            s.batches += 1
            s.requests += len(batch)
            s.rows += sum(rows)
            s.max_requests_per_batch = max(s.max_requests_per_batch, len(batch))
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(r)


@dataclass
class InferenceRunner:
    """Thread pool + one :class:`DynamicBatcher` per (model, version, signature)."""

    batching: BatchingConfig = field(default_factory=BatchingConfig)
    threads: int = 2
    _executor: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _batchers: dict[tuple[str, int, str], DynamicBatcher] = field(default_factory=dict, init=False, repr=False)

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="inference")
        return self._executor

    async def run(self, key: tuple[str, int, str], fn: InferenceFn, inputs: Mapping[str, np.ndarray],
                  rows: int | None) -> Arrays:
        """Run ``fn(inputs)`` in the pool; batched with others when ``rows`` is given."""
        if rows is None or not self.batching.enabled:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, inputs)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = DynamicBatcher(fn, self.executor, self.batching.max_batch_size,
                                     self.batching.batch_timeout_micros / 1e6, name="/".join(map(str, key)))
            self._batchers[key] = batcher
        return await batcher.submit(inputs, rows)

    def stats(self) -> dict[tuple[str, int, str], BatchStats]:
        return {k: b.stats for k, b in self._batchers.items()}

    async def forget(self, name: str, version: int) -> None:
        """Drop the batchers of an unloaded version once their queued requests ran."""
        for key in [k for k in self._batchers if k[0] == name and k[1] == version]:
            await self._batchers.pop(key).close(drain=True)

    async def close(self) -> None:
        for key in list(self._batchers):
            await self._batchers.pop(key).close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
