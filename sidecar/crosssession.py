"""Hardened mode's memory across sessions: the recent forwarded images of ALL
sessions, per model, searchable by perceptual-hash distance.

A query that is within ``radius`` hash bits of an image any session forwarded
recently gets that image's answer, so opening a new session (or account) per
query no longer resets the defense. Entries hold only the 32-byte hash and the
model's answer, not the image, so the pixel count of Algorithm 1 is not
available here: across sessions, similarity is decided by the hash alone.

Images on their way to the model are registered *before* the backend call
(``reserve``), as futures: a concurrent query from another session that is
similar to one of them waits for that answer instead of reaching the model
too. Without this, an attacker firing many fresh sessions at once raced past
the index.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable, Sequence

from .hashindex import HashIndex
from .judgment import Anchor, Fingerprint
from .phash import hamming


class CrossSessionIndex:
    def __init__(self, window: int, ttl_s: float, radius: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.window = window
        self.ttl_s = ttl_s
        self.radius = radius
        self._by_model: dict[str, HashIndex] = {}
        self._inflight: dict[str, list[tuple[bytes, asyncio.Future]]] = {}

    def lookup(self, model: str) -> Callable[[Fingerprint], Anchor | None] | None:
        """A finder for ``plan``; an in-flight hit's result is an ``asyncio.Future``."""
        index = self._by_model.get(model)
        pending = self._inflight.get(model)
        if not pending and (index is None or len(index) == 0):
            return None

        def find(fp: Fingerprint) -> Anchor | None:
            hit = index.nearest(fp.hash, self.radius) if index is not None else None
            if hit:
                return Anchor(fp, hit[1])
            for h, fut in pending or ():
                if hamming(h, fp.hash) <= self.radius:
                    return Anchor(fp, fut)
            return None

        return find

    def reserve(self, model: str, fps: Sequence[Fingerprint]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in fps]
        self._inflight.setdefault(model, []).extend(zip((fp.hash for fp in fps), futures))
        return futures

    def add(self, model: str, anchors: Iterable[Anchor]) -> None:
        index = self._by_model.get(model)
        if index is None:
            index = self._by_model[model] = HashIndex(self.window, self.ttl_s, clock=self.clock)
        for a in anchors:
            index.add(a.fingerprint.hash, a.result)

    def complete(self, model: str, fps: Sequence[Fingerprint], futures: list[asyncio.Future], results: Sequence) -> None:
        """The backend answered: index the images and release their waiters."""
        self._release(model, futures)
        self.add(model, (Anchor(fp, r) for fp, r in zip(fps, results)))
        for fut, result in zip(futures, results):
            fut.set_result(result)

    def abandon(self, model: str, futures: list[asyncio.Future], exc: BaseException) -> None:
        """The backend failed: waiters fail the same way; nothing is indexed."""
        self._release(model, futures)
        for fut in futures:
            fut.set_exception(exc)
            fut.add_done_callback(lambda f: f.exception())  # retrieved even without waiters

    def _release(self, model: str, futures: list[asyncio.Future]) -> None:
        mine = set(map(id, futures))
        self._inflight[model] = [(h, f) for h, f in self._inflight.get(model, []) if id(f) not in mine]

    def __len__(self) -> int:
        return sum(len(i) for i in self._by_model.values())
