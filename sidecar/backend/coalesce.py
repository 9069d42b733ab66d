"""Backend calls in flight per served model are limited; forwards that arrive meanwhile
wait and go to the model together, as one batch.

``CoalescingBackend`` wraps any ``Backend``. While fewer than ``inflight`` Predict calls
of a served model (``ModelKey``) are running, a forward goes out at once, alone: a lone
client waits for nothing. Beyond that, forwards queue; when a call returns, everything
queued (up to ``max_batch`` images) goes out as ONE call and each caller gets its own
rows back. Under concurrent load this is the dynamic batching TF Serving and Triton
do: the model server's per-call cost (and the sidecar's gRPC client cost) is paid once
per batch instead of once per image.

Judgment is not touched: every image was judged, in its own session, before it got
here, and each caller receives only the rows of its own images (a classifier in
inference mode answers a row independently of its neighbours). A failed call fails
every caller in it with the same error; a caller that went away before its batch left
is dropped from it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Backend, Connectivity, ModelKey, ModelRef, Served
from ..errors import BackendUnavailable


@dataclass
class _Lane:
    """One served model's calls: how many run, and the forwards waiting for one."""

    running: int = 0
    waiting: list[tuple[np.ndarray, asyncio.Future]] = field(default_factory=list)


class CoalescingBackend:
    def __init__(self, inner: Backend, inflight: int, max_batch: int) -> None:
        if inflight < 1 or max_batch < 1:
            raise ValueError("inflight and max_batch must be >= 1")
        self.inner, self.inflight, self.max_batch = inner, inflight, max_batch
        self._lanes: dict[ModelKey, _Lane] = {}
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self.batches = 0  # calls that carried more than one caller's images (for tests and benchmarks)

    @property
    def timeout_s(self) -> float:
        return self.inner.timeout_s

    @property
    def channel(self) -> Connectivity:
        return self.inner.channel

    async def resolve(self, ref: ModelRef) -> Served:
        return await self.inner.resolve(ref)

    async def passthrough(self, method: str, request: Any) -> Any:
        return await self.inner.passthrough(method, request)

    def forget(self, ref: ModelRef | None = None) -> None:
        self.inner.forget(ref)

    async def close(self) -> None:
        await self.inner.close()

    def cached(self, ref):
        """The inner backend's cached resolution, if it keeps one (no coroutine on the hot path)."""
        cached = getattr(self.inner, "cached", None)
        return cached(ref) if cached is not None else None

    async def predict(self, key: ModelKey, batch: np.ndarray) -> tuple[np.ndarray, int]:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.running < self.inflight and not lane.waiting:
            lane.running += 1
            try:
                return await self.inner.predict(key, batch)
            finally:
                lane.running -= 1
                self._dispatch(key, lane)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        lane.waiting.append((batch, fut))
        self._dispatch(key, lane)
        return await fut

    def _dispatch(self, key: ModelKey, lane: _Lane) -> None:
        while lane.waiting and lane.running < self.inflight:
            group: list[tuple[np.ndarray, asyncio.Future]] = []
            n = 0
            while lane.waiting and (not group or n + len(lane.waiting[0][0]) <= self.max_batch):
                batch, fut = lane.waiting.pop(0)
                if not fut.done():  # a caller that went away is not sent
                    group.append((batch, fut))
                    n += len(batch)
            if not group:
                continue
            lane.running += 1
            task = asyncio.get_running_loop().create_task(self._run(key, lane, group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not lane.waiting and not lane.running:
            self._lanes.pop(key, None)

    async def _run(self, key: ModelKey, lane: _Lane, group: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            if len(group) > 1:
                self.batches += 1
            joined = group[0][0] if len(group) == 1 else np.concatenate([b for b, _ in group])
            try:
                scores, version = await self.inner.predict(key, joined)
            except BaseException as exc:  # every caller of the batch gets the backend's error
                err = exc if isinstance(exc, Exception) else BackendUnavailable("the backend call was cancelled")
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(err)
                if not isinstance(exc, Exception):
                    raise
                return
            start = 0
            for batch, fut in group:
                if not fut.done():
                    fut.set_result((scores[start:start + len(batch)], version))
                start += len(batch)
        finally:
            lane.running -= 1
            self._dispatch(key, lane)
