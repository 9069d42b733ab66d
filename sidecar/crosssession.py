"""Hardened mode's memory across sessions: the recent forwarded images of ALL
sessions, per model, searchable by perceptual-hash distance.

A query that is within ``radius`` hash bits of an image any session forwarded
recently gets that image's answer, so opening a new session (or account) per
query no longer resets the defense. Entries hold only the 32-byte hash and the
model's answer, not the image, so the pixel count of Algorithm 1 is not
available here: across sessions, similarity is decided by the hash alone.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from .hashindex import HashIndex
from .judgment import Anchor, Fingerprint


class CrossSessionIndex:
    def __init__(self, window: int, ttl_s: float, radius: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.window = window
        self.ttl_s = ttl_s
        self.radius = radius
        self._by_model: dict[str, HashIndex] = {}

    def lookup(self, model: str) -> Callable[[Fingerprint], Anchor | None] | None:
        index = self._by_model.get(model)
        if index is None or len(index) == 0:
            return None

        def find(fp: Fingerprint) -> Anchor | None:
            hit = index.nearest(fp.hash, self.radius)
            return Anchor(fp, hit[1]) if hit else None

        return find

    def add(self, model: str, anchors: Iterable[Anchor]) -> None:
        index = self._by_model.get(model)
        if index is None:
            index = self._by_model[model] = HashIndex(self.window, self.ttl_s, clock=self.clock)
        for a in anchors:
            index.add(a.fingerprint.hash, a.result)

    def __len__(self) -> int:
        return sum(len(i) for i in self._by_model.values())
