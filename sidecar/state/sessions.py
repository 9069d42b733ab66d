"""Per-session state stores.

The judgment layer needs, per session, the anchors and exclusive access while
one request of that session is judged, forwarded and committed (so concurrent
requests of one session cannot race the anchor). A store therefore offers one
operation: ``async with store.hold(session_id) as slot:`` read ``slot.anchors``,
and assign ``slot.anchors`` to commit. Leaving the block with an exception
commits nothing.

``MemorySessionStore`` bounds memory: at most ``max_sessions`` (least recently
used evicted first) and idle sessions expire after ``ttl_s``. Every hold costs
O(1) in the number of sessions held (an ``OrderedDict`` in LRU order, a sweep of
a few entries from its old end), so a client that makes up many session ids
slows nobody else down.

Stores also offer ``async ping() -> bool`` (reachable?) for the health watcher and
``async aclose()`` for the server's stop.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Callable, Protocol

from ..judge.judgment import Anchor

SWEEP_BUDGET = 8  # entries a request's sweep looks at, at most


@dataclass
class Slot:
    anchors: tuple[Anchor, ...] = ()


class SessionStore(Protocol):
    def hold(self, session_id: str) -> AbstractAsyncContextManager[Slot]: ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...

    def __len__(self) -> int: ...


@dataclass(slots=True)
class _Entry:
    anchors: tuple[Anchor, ...] = ()
    touched: float = 0.0
    lock: asyncio.Lock | None = None  # only while held: an idle session costs no lock
    holders: int = 0


class MemorySessionStore:
    def __init__(
        self,
        max_sessions: int = 100_000,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_evict = on_evict or (lambda reason: None)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, session_id: str) -> tuple[Anchor, ...]:
        """The committed anchors (for tests and introspection); no side effects."""
        entry = self._entries.get(session_id)
        if entry is None or self._expired(entry, self._clock()):
            return ()
        return entry.anchors

    def _expired(self, entry: _Entry, now: float) -> bool:
        return self.ttl_s > 0 and now - entry.touched > self.ttl_s

    def _sweep(self, now: float) -> None:
        """Idle expiry from the LRU end, then the size bound: O(1) per call.

        Looks at no more than ``SWEEP_BUDGET`` entries from the least recent end
        (never the whole key list). Each call removes up to that many expired
        entries while a request adds at most one, so expired sessions cannot pile
        up; ``peek``/``hold`` check expiry per entry anyway. An entry in use is
        moved to the recent end (it is being used) and stays."""
        entries = self._entries
        for _ in range(SWEEP_BUDGET):
            if not entries:
                break
            key, entry = next(iter(entries.items()))
            if not self._expired(entry, now):
                break
            if entry.holders:
                entries.move_to_end(key)
                continue
            del entries[key]
            self._on_evict("ttl")
        for _ in range(SWEEP_BUDGET):
            if len(entries) <= self.max_sessions:
                break
            key, entry = next(iter(entries.items()))
            if entry.holders:
                entries.move_to_end(key)
                continue
            del entries[key]
            self._on_evict("lru")

    async def ping(self) -> bool:
        """Health: an in-process store is always reachable."""
        return True

    async def aclose(self) -> None:
        """Nothing to release: the sessions live in this process."""

    def hold(self, session_id: str) -> "_Hold":
        """``async with store.hold(session_id) as slot``: the session's anchors, exclusively.
        A plain async context manager object: on every judged call, so no generator."""
        return _Hold(self, session_id)


class _Hold:
    __slots__ = ("store", "session_id", "entry", "slot")
    entry: _Entry  # both set by __aenter__
    slot: Slot

    def __init__(self, store: MemorySessionStore, session_id: str) -> None:
        self.store, self.session_id = store, session_id

    async def __aenter__(self) -> Slot:
        store, session_id = self.store, self.session_id
        entries = store._entries
        now = store._clock()
        entry = entries.get(session_id)
        if entry is not None and store._expired(entry, now) and entry.holders == 0:
            del entries[session_id]
            store._on_evict("ttl")
            entry = None
        if entry is None:
            entry = _Entry(touched=now)
            entries[session_id] = entry
        entries.move_to_end(session_id)
        entry.holders += 1
        if entry.lock is None:
            entry.lock = asyncio.Lock()
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave(entry)
            raise
        self.entry = entry
        self.slot = Slot(entry.anchors)
        return self.slot

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        entry = self.entry
        try:
            if exc_type is None:  # leaving the block with an exception commits nothing
                entry.anchors = self.slot.anchors
                entry.touched = self.store._clock()
        finally:
            lock = entry.lock
            assert lock is not None  # held: only the last holder's _leave drops it
            lock.release()
            self._leave(entry)
        return False

    def _leave(self, entry: _Entry) -> None:
        store, session_id = self.store, self.session_id
        entry.holders -= 1
        if entry.holders == 0:
            entry.lock = None
        if not entry.anchors and entry.holders == 0 and store._entries.get(session_id) is entry:
            # Nothing committed: a failed first request leaves no trace.
            del store._entries[session_id]
        store._sweep(store._clock())
