"""Hardened mode's memory across sessions, built so that it cannot be poisoned.

What one principal sent never decides what another principal is told. The
index therefore never answers a query with an answer the model gave for
DIFFERENT bytes. It does two things only:

1. **Exact bytes** (shared by all sessions): a query whose bytes were forwarded
   before gets the model's answer for exactly those bytes (for an image still
   in flight: it waits for that answer). This is the model's own answer, so it
   is safe to share, and it closes "repeat the same query in a fresh session".
2. **Near-duplicate budget**: the low-pass vectors (``lowpass.py``) of recent
   forwarded images of ALL sessions, per served model. A query with ``budget``
   or more indexed images within ``radius`` is REFUSED
   (``NearDuplicateBudget`` -> RESOURCE_EXHAUSTED); with fewer, it is forwarded
   and gets its own real answer. Victims of a poisoning attacker are at worst
   refused, never told the attacker's label.

Why this closes session rotation and blinding without a secret: every query
within L-inf ``eps`` of one image x lies within ``mask_bound(eps)`` of x's
low-pass vector, and two such queries within ``2 * mask_bound(eps)``. Among
the queries forwarded around x, each had fewer than ``budget`` forwarded
neighbours within ``radius``, so at least 1/budget of them are mutually
farther apart than ``radius``; a Plotkin-type bound (sum of squared pairwise
distances in a cube of side 2*eps) limits those to fewer than
``1 / (1 - 2 * eps**2 * 768 / radius**2)`` (3.05 for eps = 16/255, radius
3.0). So at most about budget * 3 queries per image reach the model, however
the attacker picks masks or sessions.

Search: candidates come from hnswlib (HNSW graph) over an orthonormal 64-dim
low-frequency DCT projection of the vectors (a projection that never
increases distances), then every candidate is verified on the stored full
vector (uint8, so distances carry at most 0.5/255*sqrt(768) = 0.054 of
quantisation error; the verification radius adds that slack, so no true
neighbour is lost to it). Below ``exact_below`` entries the search is an exact
numpy scan instead.

Images on their way to the model are registered before the backend call
(``reserve``): they count for the budget and answer exact repeats (as futures)
at once, so concurrent fresh sessions cannot race past the index.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import hnswlib
import numpy as np

from ..errors import TooLarge
from ..judge.judgment import Anchor, Fingerprint, lowpass_of
from ..judge.lowpass import PROJECTED_DIMS, project

#: Low-pass distance within which an indexed image is a near-duplicate (0-1
#: scale): above 2 * mask_bound(eps) for eps ~ 13.8/255, and the Plotkin bound
#: above keeps masks up to 16/255 to fewer than 3.05 mutually-far ones.
DEFAULT_RADIUS = 3.0
#: Real answers a neighbourhood gets across sessions before further distinct
#: near-duplicates are refused. Measured (benchmarks/bench_adaptive.py,
#: budget_tradeoff): 2 -> 24.8% of a popular-image stream refused, 1% of
#: rotated 1-pixel copies reach the model; 3 -> 15.6% / 2%; 5 -> 2.9% / 4%;
#: 8 -> 0% / 7%.
DEFAULT_BUDGET = 5
QUANT_SLACK = 0.5 / 255 * np.sqrt(768)


class NearDuplicateBudget(TooLarge):
    """Too many distinct near-duplicates of one image were forwarded (RESOURCE_EXHAUSTED)."""


def digest(image: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.dtype.str}{image.shape}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.digest()


class ModelIndex:
    """One served model's entries: a ring of ``window`` slots, with a TTL."""

    def __init__(self, window: int, ttl_s: float, clock: Callable[[], float], exact_below: int = 2048,
                 ef: int = 64, m: int = 16) -> None:
        self.window, self.ttl_s, self.clock, self.exact_below = window, ttl_s, clock, exact_below
        self.ef, self.m = ef, m
        self.dim: int | None = None
        self.vectors: np.ndarray | None = None  # (window, dim) uint8
        self.born = np.zeros(window, np.float64)
        self.live = np.zeros(window, bool)
        self.results: list[Any] = [None] * window
        self.digests: list[bytes | None] = [None] * window
        self.by_digest: dict[bytes, int] = {}  # digest -> seq
        self.order: deque[int] = deque()  # live seqs, oldest first
        self.seq = 0
        self.count = 0
        self.ann: hnswlib.Index | None = None

    def __len__(self) -> int:
        return self.count

    # -- storage ------------------------------------------------------------
    def _init(self, dim: int) -> None:
        self.dim = dim
        self.vectors = np.zeros((self.window, dim), np.uint8)
        self.ann = hnswlib.Index(space="l2", dim=PROJECTED_DIMS)
        self.ann.init_index(max_elements=self.window, ef_construction=100, M=self.m, allow_replace_deleted=True)
        self.ann.set_ef(self.ef)
        self.ann.set_num_threads(1)

    def _drop(self, seq: int) -> None:
        slot = seq % self.window
        if not self.live[slot]:
            return
        self.live[slot] = False
        self.count -= 1
        self.ann.mark_deleted(seq)
        d = self.digests[slot]
        if d is not None and self.by_digest.get(d) == seq:
            del self.by_digest[d]
        self.results[slot] = self.digests[slot] = None

    def expire(self) -> None:
        if self.ttl_s <= 0:
            return
        limit = self.clock() - self.ttl_s
        while self.order and (not self.live[self.order[0] % self.window] or self.born[self.order[0] % self.window] < limit):
            self._drop(self.order.popleft())

    def add(self, vector: np.ndarray, dig: bytes, result: Any) -> int:
        if self.dim is None:
            self._init(vector.shape[0])
        if vector.shape[0] != self.dim:
            raise ValueError(f"index of {self.dim}-dim vectors got {vector.shape[0]}")
        seq, self.seq = self.seq, self.seq + 1
        if seq >= self.window:
            self._drop(seq - self.window)
            while self.order and self.order[0] <= seq - self.window:
                self.order.popleft()
        slot = seq % self.window
        self.vectors[slot] = np.clip(np.rint(vector * 255), 0, 255)
        self.born[slot], self.live[slot] = self.clock(), True
        self.count += 1
        self.results[slot], self.digests[slot] = result, dig
        self.by_digest[dig] = seq
        self.order.append(seq)
        self.ann.add_items(project(vector[None]), [seq], replace_deleted=seq >= self.window)
        return seq

    def remove(self, seqs: Iterable[int]) -> None:
        for s in seqs:
            self._drop(s)

    def set_result(self, seq: int, result: Any) -> None:
        slot = seq % self.window
        if self.live[slot] and self.seq - seq <= self.window:
            self.results[slot] = result

    # -- queries --------------------------------------------------------------
    def exact(self, dig: bytes) -> Any | None:
        seq = self.by_digest.get(dig)
        if seq is None or not self.live[seq % self.window]:
            return None
        return self.results[seq % self.window]

    def neighbours(self, vector: np.ndarray, radius: float, at_least: int) -> int:
        """How many live entries lie within ``radius`` (at most ``at_least`` are
        counted when the ANN path is used)."""
        n = self.count
        if n == 0 or self.dim is None or vector.shape[0] != self.dim:
            return 0
        r = radius + QUANT_SLACK
        if n < self.exact_below:
            slots = np.flatnonzero(self.live)
            diff = self.vectors[slots].astype(np.float32) * np.float32(1 / 255) - vector
            return int(np.count_nonzero(np.einsum("ij,ij->i", diff, diff) <= r * r))
        k = min(max(4 * at_least, 16), n)
        try:
            labels, dists = self.ann.knn_query(project(vector[None]), k=k)
        except RuntimeError:  # fewer reachable live elements than k
            labels, dists = self.ann.knn_query(project(vector[None]), k=max(1, k // 4))
        labels, dists = labels[0], dists[0]
        cand = labels[dists <= r * r]  # projected distance <= true distance
        if len(cand) == 0:
            return 0
        slots = (cand % self.window).astype(np.int64)
        ok = self.live[slots]
        diff = self.vectors[slots[ok]].astype(np.float32) * np.float32(1 / 255) - vector
        return int(np.count_nonzero(np.einsum("ij,ij->i", diff, diff) <= r * r))


class CrossSessionIndex:
    def __init__(self, window: int, ttl_s: float, radius: float = DEFAULT_RADIUS, budget: int = DEFAULT_BUDGET,
                 clock: Callable[[], float] = time.monotonic, exact_below: int = 2048,
                 on_refusal: Callable[[str], None] | None = None) -> None:
        if budget < 1 or radius < 0:
            raise ValueError("budget must be >= 1 and radius >= 0")
        self.clock = clock
        self.window = window
        self.ttl_s = ttl_s
        self.radius = radius
        self.budget = budget
        self.exact_below = exact_below
        self.on_refusal = on_refusal
        self._by_model: dict[str, ModelIndex] = {}
        self._inflight: dict[int, tuple[str, list[int]]] = {}  # id(futures) -> (model, seqs)
        self.refusals = 0

    def _model(self, model: str) -> ModelIndex:
        ix = self._by_model.get(model)
        if ix is None:
            ix = self._by_model[model] = ModelIndex(self.window, self.ttl_s, self.clock, self.exact_below)
        return ix

    def lookup(self, model: str) -> Callable[[Fingerprint], Anchor | None]:
        """A finder for ``plan``: the exact-bytes answer (an ``asyncio.Future``
        while in flight), None to forward, or ``NearDuplicateBudget`` raised.

        The finder remembers the queries it let through: later queries of the
        same plan count them as neighbours too (one batch cannot pass a budget
        that one-by-one calls could not).
        """
        ix = self._model(model)
        ix.expire()
        planned: list[tuple[bytes, np.ndarray]] = []

        def find(fp: Fingerprint) -> Anchor | None:
            dig = digest(fp.image)
            hit = ix.exact(dig)
            if hit is not None:
                return Anchor(fp, hit)
            vec = lowpass_of(fp)
            near = ix.neighbours(vec, self.radius, self.budget)
            if near < self.budget and planned:
                r2 = (self.radius + QUANT_SLACK) ** 2
                near += sum(1 for _, v in planned if v.shape == vec.shape and float(((v - vec) ** 2).sum()) <= r2)
            if near >= self.budget:
                self._refuse(model, near, "sessions")
            planned.append((dig, vec))
            return None

        return find

    def recheck(self, model: str, fps: Sequence[Fingerprint]) -> None:
        """Raise ``NearDuplicateBudget`` if a reserved batch ``fps`` is now over the budget:
        each image counts the live entries near it except itself and the batch's later
        images (what ``lookup`` counted at plan time, plus whatever arrived since)."""
        ix = self._model(model)
        vecs = [lowpass_of(fp) for fp in fps]
        r2 = (self.radius + QUANT_SLACK) ** 2
        for i, vec in enumerate(vecs):
            own = sum(1 for v in vecs[i:] if v.shape == vec.shape and float(((v - vec) ** 2).sum()) <= r2)
            near = ix.neighbours(vec, self.radius, self.budget + len(vecs)) - own
            if near >= self.budget:
                self._refuse(model, near, "sessions and replicas")

    def _refuse(self, model: str, near: int, across: str) -> None:
        self.refusals += 1
        if self.on_refusal is not None:
            self.on_refusal(model)
        raise NearDuplicateBudget(f"too many near-duplicate queries of one image across {across} ({near} recent "
                                  f"images within low-pass distance {self.radius}; the budget is {self.budget})")

    def reserve(self, model: str, fps: Sequence[Fingerprint]) -> list[asyncio.Future]:
        """Images about to be forwarded: indexed now, their answers to follow."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in fps]
        ix = self._model(model)
        seqs = [ix.add(lowpass_of(fp), digest(fp.image), fut) for fp, fut in zip(fps, futures)]
        self._inflight[id(futures)] = (model, seqs)
        return futures

    def add(self, model: str, anchors: Iterable[Anchor]) -> None:
        ix = self._model(model)
        for a in anchors:
            ix.add(lowpass_of(a.fingerprint), digest(a.fingerprint.image), a.result)

    def complete(self, model: str, fps: Sequence[Fingerprint], futures: list[asyncio.Future], results: Sequence) -> None:
        """The backend answered: entries hold the answers; waiters are released."""
        _, seqs = self._inflight.pop(id(futures), (model, []))
        ix = self._model(model)
        for seq, result in zip(seqs, results):
            ix.set_result(seq, result)
        for fut, result in zip(futures, results):
            fut.set_result(result)

    def abandon(self, model: str, futures: list[asyncio.Future], exc: BaseException) -> None:
        """The backend failed: entries are removed; waiters fail the same way."""
        _, seqs = self._inflight.pop(id(futures), (model, []))
        self._model(model).remove(seqs)
        for fut in futures:
            fut.set_exception(exc)
            fut.add_done_callback(lambda f: f.exception())  # retrieved even without waiters

    def __len__(self) -> int:
        return sum(len(i) for i in self._by_model.values())
