"""Hardened mode's cross-session index, shared by replicas through Redis.

Each replica keeps its own ``CrossSessionIndex`` (fast local lookups) and keeps
it current from the others over one Redis stream:

* when a replica is about to forward images (``CrossSessionHook.forward``:
  the moment its own index reserves them), it ``XADD``s them to the stream
  ``P xs`` (``MAXLEN ~ maxlen``), tagged with its replica id and the model;
* every replica ``XREAD``s the stream (blocking) and adds the OTHER replicas'
  images to its local index as entries without an answer: they count for the
  near-duplicate budget, so a session-rotation attack spread over replicas
  meets one budget, as on one process. Exact-bytes answers stay per replica (a
  repeat of bytes forwarded elsewhere is forwarded again and gets the model's
  own answer for those bytes: nothing new for the attacker, one model call);
* a replica that starts (or reconnects) reads the stream from ``ttl_s`` ago, so
  it begins with the recent images of the others.

Lag: the time from a replica's XADD to another's index update, measured per
entry from the stream id (Redis's clock at XADD) to the reader's wall clock, in
``hashguard_index_replication_lag_seconds`` (entries published before this
replica started are catch-up and not counted). An attacker gains only inside the
lag: copies sent to different replicas at the same moment each see the index
without the others. The budget on one replica still holds for its own share.

Publishing never fails a call: when Redis cannot be reached, entries wait in a
bounded queue (then are dropped and counted) and the reader reconnects; the
session store fails those calls closed anyway. Entries carry the image bytes
(the receiver computes the low-pass vector and the digest as the sender did).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from typing import Any, Callable, Sequence

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .crosssession import CrossSessionIndex
from .dataplane import CrossSessionHook
from .judgment import Anchor, Fingerprint

log = logging.getLogger("hashguard.index_replication")

_ALLOWED = frozenset("biuf")


def encode_images(images: Sequence[np.ndarray]) -> bytes:
    """u16 n, then per image: u8 len, dtype.str, u8 ndim, ndim*u32 dims, raw bytes."""
    out = [struct.pack("<H", len(images))]
    for img in images:
        tag = img.dtype.str.encode("ascii")
        out.append(struct.pack("<B", len(tag)) + tag + struct.pack(f"<B{img.ndim}I", img.ndim, *img.shape))
        out.append(np.ascontiguousarray(img).tobytes())
    return b"".join(out)


def decode_images(data: bytes, max_images: int = 4096) -> list[np.ndarray]:
    """Inverse of ``encode_images``; ``ValueError`` on anything inconsistent."""
    try:
        return _decode_images(memoryview(data), max_images)
    except (TypeError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"not an image list: {exc}") from None


def _decode_images(mv: memoryview, max_images: int) -> list[np.ndarray]:
    (n,), pos = struct.unpack_from("<H", mv, 0), 2
    if n > max_images:
        raise ValueError(f"{n} images in one entry")
    out = []
    for _ in range(n):
        (tl,) = struct.unpack_from("<B", mv, pos)
        dt = np.dtype(bytes(mv[pos + 1:pos + 1 + tl]).decode("ascii"))
        pos += 1 + tl
        if dt.kind not in _ALLOWED or dt.fields is not None:
            raise ValueError(f"dtype {dt} not allowed")
        (ndim,) = struct.unpack_from("<B", mv, pos)
        if ndim > 4:
            raise ValueError(f"rank {ndim}")
        shape = struct.unpack_from(f"<{ndim}I", mv, pos + 1)
        pos += 1 + 4 * ndim
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if pos + size > len(mv):
            raise ValueError("truncated")
        arr = np.frombuffer(mv[pos:pos + size], dtype=dt).reshape(shape)
        arr.setflags(write=False)
        out.append(arr)
        pos += size
    if pos != len(mv):
        raise ValueError("trailing bytes")
    return out


class IndexReplication:
    """Publishes this replica's forwarded images, applies the other replicas'."""

    def __init__(self, index: CrossSessionIndex, client: aioredis.Redis, prefix: str = "hashguard:",
                 maxlen: int = 100_000, ttl_s: float = 3600.0, queue_max: int = 10_000,
                 observe_lag: Callable[[float], None] | None = None, block_ms: int = 1000) -> None:
        self.index, self.client = index, client
        self.key = prefix + "xs"
        self.maxlen, self.ttl_s, self.block_ms = maxlen, ttl_s, block_ms
        self.replica = secrets.token_hex(8)
        self.queue: asyncio.Queue | None = None
        self.queue_max = queue_max
        self.observe_lag = observe_lag or (lambda s: None)
        self.published = self.applied = self.dropped = self.bad = 0
        self.pending = 0  # queued or being written
        self.live_from_ms = 0  # entries older than the reader's start are catch-up, not lag
        self._tasks: list[asyncio.Task] = []

    @classmethod
    def from_url(cls, index: CrossSessionIndex, url: str, **kw) -> "IndexReplication":
        client = aioredis.from_url(url, decode_responses=False, socket_timeout=5.0, socket_connect_timeout=2.0)
        return cls(index, client, **kw)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self.queue = asyncio.Queue(self.queue_max)
        self._tasks = [asyncio.create_task(self._writer(), name="index-replication-writer"),
                       asyncio.create_task(self._reader(), name="index-replication-reader")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.client.aclose()

    # -- publishing ----------------------------------------------------------------
    def publish(self, model_id: str, fps: Sequence[Fingerprint]) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait((model_id, encode_images([fp.image for fp in fps])))
            self.pending += 1
        except asyncio.QueueFull:
            self.dropped += 1

    async def _writer(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < 256:
                batch.append(self.queue.get_nowait())
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for model_id, payload in batch:
                        pipe.xadd(self.key, {b"o": self.replica, b"m": model_id.encode(), b"i": payload},
                                  maxlen=self.maxlen, approximate=True)
                    await pipe.execute()
                self.published += len(batch)
                self.pending -= len(batch)
            except RedisError as exc:
                self.dropped += len(batch)
                self.pending -= len(batch)
                log.warning("index replication: publish failed", extra={"error": str(exc), "entries": len(batch)})
                await asyncio.sleep(0.5)

    # -- applying ----------------------------------------------------------------
    def apply(self, entry_id: bytes, fields: dict, now: float | None = None) -> bool:
        """One stream entry into the local index; False for own or unreadable entries."""
        if fields.get(b"o", b"").decode() == self.replica:
            return False
        try:
            model_id = fields[b"m"].decode()
            images = decode_images(fields[b"i"])
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            self.bad += 1
            log.warning("index replication: unreadable entry", extra={"id": entry_id.decode(), "error": str(exc)})
            return False
        self.index.add(model_id, [Anchor(Fingerprint(img, b""), None) for img in images])
        self.applied += 1  # entries, like published
        ms = int(entry_id.split(b"-")[0])
        if ms >= self.live_from_ms:
            self.observe_lag(max(0.0, (now if now is not None else time.time()) - ms / 1000))
        return True

    def _start_id(self) -> bytes:
        since = 0 if self.ttl_s <= 0 else int((time.time() - self.ttl_s) * 1000)
        return f"{max(0, since)}-0".encode()

    async def _reader(self) -> None:
        last = self._start_id()
        self.live_from_ms = int(time.time() * 1000)
        down = False
        while True:
            try:
                got = await self.client.xread({self.key: last}, count=512, block=self.block_ms)
            except RedisError as exc:
                if not down:  # once per outage, not every retry
                    log.warning("index replication: cannot read, retrying", extra={"error": str(exc)})
                down = True
                await asyncio.sleep(0.5)
                continue
            if down:
                log.info("index replication: reading again", extra={"after_id": last.decode()})
                down = False
            for _key, entries in got or ():
                for entry_id, fields in entries:
                    self.apply(entry_id, fields)
                    last = entry_id


class ReplicatingHook(CrossSessionHook):
    """``CrossSessionHook`` that also announces forwarded images to the other replicas."""

    def __init__(self, index: CrossSessionIndex, replication: IndexReplication) -> None:
        super().__init__(index)
        self.replication = replication

    async def forward(self, model_id: str, fps: Sequence[Fingerprint], send: Callable[[], Any]):
        self.replication.publish(model_id, fps)  # as the local index reserves them: before the backend call
        return await super().forward(model_id, fps, send)


def replication_for(settings, plane, metrics) -> IndexReplication | None:
    """For a hardened ``DataPlane`` on a Redis session store (and ``--index-replication``
    on): share its cross-session index over Redis. The server starts and stops it."""
    if plane.index is None or settings.session_store == "memory" or not settings.index_replication:
        return None
    replication = IndexReplication.from_url(plane.index, settings.session_store, ttl_s=settings.index_ttl_s,
                                            maxlen=settings.index_window,
                                            observe_lag=metrics.index_replication_lag.observe)
    plane.crossing = ReplicatingHook(plane.index, replication)
    return replication
