"""Hardened mode's cross-session index, shared by replicas through Redis.

Each replica keeps its own ``CrossSessionIndex`` (fast local lookups) and keeps
it current from the others over one Redis stream ``P xs`` (``MAXLEN ~ maxlen``).

Admission (``ReplicatingHook.admit``). Images a replica has planned to forward
are first reserved in its own index, then, before the backend call, announced: one
MULTI appends them to the stream (tagged with the replica, the model and the
principal) and reads every entry after the last one this replica applied. The other
replicas' entries are added to the local index as entries without an answer: they
count for their principal's near-duplicate budget on every replica. Nothing is
refused (issue 23): an over-budget query is answered from the principal's nearest
earlier answer that the judging replica holds, so a replica that holds none yet
forwards it. A principal spreading near-duplicates over R replicas one after the
other gets about R - 1 more real answers per neighbourhood than on one process; a
burst at the same instant (every replica plans before it sees the others' entries)
gets at most R budgets (tests/test_index_replication.py). Exact-bytes answers stay per replica (a repeat
of bytes forwarded elsewhere is forwarded again and gets the model's own answer
for those bytes: nothing new for the attacker, one model call).

Fail-closed: a replica that cannot announce answers UNAVAILABLE and forwards
nothing. An announced call that then fails at the backend stays in the other
replicas' indexes for the window: the shared budget errs towards answering from
history, never towards forwarding.

A replica that starts applies the last ``ttl_s`` of entries before it serves; then
a background reader ``XREAD``s the stream (blocking) so that idle replicas'
indexes stay current for ``plan``'s first look. ``hashguard_index_replication_lag_seconds``
measures the reader's delay per entry, from the stream id (Redis's clock at XADD)
to the reader's wall clock (entries before this replica started are catch-up,
not lag); admission does not depend on it. Entries carry the image bytes (the
receiver computes the low-pass vector and the digest as the sender did).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .arrays import ArrayReader, pack_array
from .crosssession import CrossSessionIndex
from ..plane.dataplane import CrossSessionHook
from ..errors import BackendUnavailable
from ..judge.judgment import Anchor, Fingerprint

log = logging.getLogger("hashguard.index_replication")

def encode_images(images: Sequence[np.ndarray]) -> bytes:
    """u16 n, then each image in the state stores' array codec (``sidecar.state.arrays``)."""
    out = [struct.pack("<H", len(images))]
    for img in images:
        pack_array(out, img)
    return b"".join(out)


def decode_images(data: bytes, max_images: int = 4096) -> list[np.ndarray]:
    """Inverse of ``encode_images`` (read-only views of ``data``); ``ValueError`` on anything inconsistent."""
    r = ArrayReader(data)
    try:
        (n,) = r.unpack("<H")
    except struct.error as exc:
        raise ValueError(f"not an image list: {exc}") from None
    if n > max_images:
        raise ValueError(f"{n} images in one entry")
    out = [r.array(copy=False) for _ in range(n)]
    r.done()
    return out


class IndexReplication:
    """Announces this replica's forwards in stream order; applies the other replicas'."""

    def __init__(self, index: CrossSessionIndex, client: aioredis.Redis, prefix: str = "hashguard:",
                 maxlen: int = 100_000, ttl_s: float = 3600.0,
                 observe_lag: Callable[[float], None] | None = None, block_ms: int = 1000,
                 page: int = 1000) -> None:
        self.index = index
        self.client: Any = client  # replies are bytes (decode_responses off); the stubs say bytes | str
        self.key = prefix + "xs"
        self.maxlen, self.ttl_s, self.block_ms = maxlen, ttl_s, block_ms
        self.replica = secrets.token_hex(8)
        self.observe_lag = observe_lag or (lambda s: None)
        self.published = self.applied = self.dropped = self.bad = 0
        self.page = page
        self.live_from_ms = 0  # entries older than the reader's start are catch-up, not lag
        self._tasks: list[asyncio.Task] = []
        self.last = self._start_id()  # the newest stream id applied, shared by the reader and catch_up

    @classmethod
    def from_url(cls, index: CrossSessionIndex, url: str, **kw) -> IndexReplication:
        client = aioredis.from_url(url, decode_responses=False, socket_timeout=5.0, socket_connect_timeout=2.0)
        return cls(index, client, **kw)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Apply the last ``ttl_s`` of the others' entries before serving (so the first
        forward does not page through them while holding its session), then follow the
        stream in the background. Redis down here is not fatal: the reader retries, and
        admission fails closed until Redis is back."""
        self.last = self._start_id()
        self.live_from_ms = int(time.time() * 1000)
        try:
            tail = await self.client.xrevrange(self.key, count=1)
            while tail and _order(self.last) < _order(tail[0][0]):
                if not self._apply_all(await self.client.xrange(self.key, min=self.last, max=tail[0][0],
                                                                count=self.page)):
                    break
        except RedisError as exc:
            log.warning("index replication: cannot catch up at start, the reader will retry",
                        extra={"error": str(exc)})
        self._tasks = [asyncio.create_task(self._reader(), name="index-replication-reader")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # a client stuck in a blocking read must not hold up shutdown
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        await self.client.aclose()

    # -- ordered admission ------------------------------------------------------------
    async def announce(self, model_id: str, fps: Sequence[Fingerprint], principal: str = "") -> None:
        """Append images about to be forwarded to the stream and apply every other
        replica's entry ordered before them, in one MULTI (XADD, then XRANGE from the
        last applied id: nothing can fall between the two). Redis down fails the call
        closed (UNAVAILABLE): an unannounced forward would escape the shared budget."""
        payload = {b"o": self.replica, b"m": model_id.encode(), b"p": principal.encode(),
                   b"i": encode_images([fp.image for fp in fps])}
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(self.key, payload, maxlen=self.maxlen, approximate=True)
                pipe.xrange(self.key, min=self.last, max="+", count=self.page)
                own, entries = await pipe.execute()
            own = own if isinstance(own, bytes) else str(own).encode()
            self.published += 1
            self._apply_all(entries)
            while _order(self.last) < _order(own):  # more than one page behind
                entries = await self.client.xrange(self.key, min=self.last, max=own, count=self.page)
                if not self._apply_all(entries):
                    break  # trimmed away meanwhile
        except RedisError as exc:
            self.dropped += 1
            raise BackendUnavailable(f"shared cross-session index unavailable: {exc}") from None

    def _apply_all(self, entries) -> bool:
        """Entries in stream order; those at or before ``last`` (the reader's or an
        earlier page's) are skipped. True if any moved ``last`` on."""
        moved = False
        for entry_id, fields in entries:
            if _order(entry_id) > _order(self.last):
                self.last = entry_id
                self.apply(entry_id, fields)
                moved = True
        return moved

    # -- applying ----------------------------------------------------------------
    def apply(self, entry_id: bytes, fields: dict, now: float | None = None) -> bool:
        """One stream entry into the local index; False for own or unreadable entries."""
        if fields.get(b"o", b"").decode() == self.replica:
            return False
        try:
            model_id = fields[b"m"].decode()
            principal = fields.get(b"p", b"").decode()
            images = decode_images(fields[b"i"])
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            self.bad += 1
            log.warning("index replication: unreadable entry", extra={"id": entry_id.decode(), "error": str(exc)})
            return False
        self.index.add(model_id, [Anchor(Fingerprint(img, b""), None) for img in images], principal)
        self.applied += 1  # entries, like published
        ms = int(entry_id.split(b"-")[0])
        if ms >= self.live_from_ms:
            self.observe_lag(max(0.0, (now if now is not None else time.time()) - ms / 1000))
        return True

    def _start_id(self) -> bytes:
        since = 0 if self.ttl_s <= 0 else int((time.time() - self.ttl_s) * 1000)
        return f"{max(0, since)}-0".encode()

    async def _reader(self) -> None:
        down = False
        while True:
            try:
                got = await self.client.xread({self.key: self.last}, count=512, block=self.block_ms)
            except RedisError as exc:
                if not down:  # once per outage, not every retry
                    log.warning("index replication: cannot read, retrying", extra={"error": str(exc)})
                down = True
                await asyncio.sleep(0.5)
                continue
            if down:
                log.info("index replication: reading again", extra={"after_id": self.last.decode()})
                down = False
            for _key, entries in got or ():
                self._apply_all(entries)  # announce may have applied some already


class ReplicatingHook(CrossSessionHook):
    """``CrossSessionHook`` whose per-principal budgets are shared by replicas: before
    reserved images are sent, they are appended to the stream with their principal, and
    the other replicas' entries up to that id are applied (they count for that
    principal's budget on every replica). Nothing is refused: an over-budget query is
    answered from the principal's nearest earlier answer held on the replica that judges
    it, so a replica that holds none of them yet forwards it (at most one per replica
    and neighbourhood beyond the budget)."""

    def __init__(self, index: CrossSessionIndex, replication: IndexReplication) -> None:
        super().__init__(index)
        self.replication = replication

    async def admit(self, model_id: str, fps: Sequence[Fingerprint], principal: str = "") -> None:
        await self.replication.announce(model_id, fps, principal)


def _order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


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
