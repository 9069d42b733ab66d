"""Hardened mode's memory across sessions, built so that no principal can
refuse, or decide, what another principal is told (issue 23).

Two things, per served model:

1. **Exact bytes** (shared by all sessions and principals): a query whose bytes
   were forwarded before gets the model's answer for exactly those bytes (for an
   image still in flight: it waits for that answer). This is the model's own
   answer, so sharing it tells nobody anything it would not have been told, and it
   closes "repeat the same query in a fresh session".
2. **A near-duplicate budget per principal** (``PrincipalHistory``): the
   transform-tolerant features (``judge/invariant.py``) of the images a principal
   (the authenticated principal; on open deployments the client address, so that
   all of one host's sessions are one principal) had forwarded recently. A query
   with ``budget`` or more of them within ``radius`` is not forwarded: it gets the
   answer of the NEAREST of them, that is, the principal's own earlier answer for
   its own near-duplicate. Nothing is refused, and nothing another principal sent
   takes part: an attacker's queries fill only its own budget.

Why this holds against blinding: a blinding attacker sends ``T(x + delta)`` with a
fresh label-preserving ``T`` per query. The feature drops what such ``T`` change
(brightness, contrast, gain, gamma, smooth fields, JPEG, small shifts and
rotations: see ``invariant.py``), so its queries around ``x`` stay within ``radius``
of each other and of ``x``: after ``budget`` forwards each further one is answered
from its own history. Session rotation changes nothing (the principal is the same);
Sybil principals multiply the budget by their count, which is why, on open
deployments, the principal is the client address and not the session.

Images on their way to the model are registered before the backend call
(``reserve``): they count for the budget and answer exact repeats (as futures)
at once, so concurrent sessions of one principal cannot race past it.

The exact-bytes store: hnswlib (HNSW graph) over an orthonormal 64-dim
low-frequency DCT projection of the low-pass vectors is kept for ``neighbours``
(benchmarks and diagnostics); the budget itself is an exact numpy scan of a
principal's own history.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import hnswlib
import numpy as np

from collections import OrderedDict

from ..judge.invariant import DIMS, RADIUS, nearest_distances, query_features
from ..judge.judgment import Anchor, Fingerprint, lowpass_of
from ..judge.lowpass import PROJECTED_DIMS, project

#: Feature distance (``invariant.distance``) within which an image a principal
#: forwarded before is a near-duplicate of its query.
DEFAULT_RADIUS = RADIUS
#: Real answers one principal gets for one neighbourhood; further near-duplicates get
#: its own nearest earlier answer. Measured (benchmarks/bench_hardened.py): with 2, a
#: plain Square attack's second query (x plus random +-8/255 stripes) reaches the model
#: and already fools it for 11 of 100 correctly classified images; with 1 it is answered
#: from x, and a stream of 846 distinct test images from one principal is still answered
#: by the model for 99.76% (2 images answered from a neighbour, 1 of them wrongly).
DEFAULT_BUDGET = 1
#: Recent forwarded images remembered per principal and model (features, float32:
#: 960 bytes each, so at most 240 KB per principal, allocated as its history grows).
DEFAULT_HISTORY = 256
#: Principals remembered (least recently used first out).
DEFAULT_PRINCIPALS = 10_000
QUANT_SLACK = 0.5 / 255 * np.sqrt(768)


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
        self.vectors = np.zeros((0, 0), np.uint8)  # (window, dim) once the first vector sets dim
        self.born = np.zeros(window, np.float64)
        self.live = np.zeros(window, bool)
        self.results: list[Any] = [None] * window
        self.digests: list[bytes | None] = [None] * window
        self.by_digest: dict[bytes, int] = {}  # digest -> seq
        self.order: deque[int] = deque()  # live seqs, oldest first
        self.seq = 0
        self.count = 0
        self.ann: Any = None  # hnswlib.Index once the first vector sets the dimension (untyped library)

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


def _invariant_of(fp: Fingerprint) -> np.ndarray:
    """(len(OFFSETS), DIMS): the query's shifted features; row 0 is what is stored."""
    if fp.invariant is not None:
        return fp.invariant
    img = fp.image if fp.image.ndim == 3 else fp.image[..., None]
    return query_features(img[None])[0]


class PrincipalHistory:
    """One principal's recent forwarded images for one model: features (float32, with
    their squared norms), answers (futures while in flight) and birth times, in a ring of
    ``window`` that grows as it fills."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.vectors = np.zeros((min(16, window), DIMS), np.float32)
        self.sq = np.zeros(len(self.vectors), np.float32)
        self.born = np.zeros(len(self.vectors), np.float64)
        self.live = np.zeros(len(self.vectors), bool)
        self.answered = np.zeros(len(self.vectors), bool)  # holds an answer (or a future of one)
        self.results: list[Any] = [None] * len(self.vectors)
        self.seq = 0

    def add(self, vec: np.ndarray, result: Any, now: float) -> int:
        slot = self.seq % self.window
        if slot >= len(self.vectors):  # grow (doubling, at most to the window)
            n = min(self.window, 2 * len(self.vectors))
            self.vectors = np.concatenate([self.vectors, np.zeros((n - len(self.vectors), DIMS), np.float32)])
            self.sq = np.concatenate([self.sq, np.zeros(n - len(self.sq), np.float32)])
            self.born = np.concatenate([self.born, np.zeros(n - len(self.born))])
            self.live = np.concatenate([self.live, np.zeros(n - len(self.live), bool)])
            self.answered = np.concatenate([self.answered, np.zeros(n - len(self.answered), bool)])
            self.results += [None] * (n - len(self.results))
        self.vectors[slot] = vec
        self.sq[slot] = float(np.dot(vec, vec))
        self.born[slot], self.live[slot], self.results[slot] = now, True, result
        self.answered[slot] = result is not None
        seq, self.seq = self.seq, self.seq + 1
        return seq

    def set_result(self, seq: int, result: Any) -> None:
        if self.seq - seq <= self.window and self.live[seq % self.window]:
            self.results[seq % self.window] = result
            self.answered[seq % self.window] = result is not None

    def remove(self, seq: int) -> None:
        if self.seq - seq <= self.window:
            self.live[seq % self.window] = False
            self.answered[seq % self.window] = False
            self.results[seq % self.window] = None

    def near(self, query: np.ndarray, radius: float, oldest: float) -> tuple[int, int | None, float]:
        """(live entries born after ``oldest`` within ``radius``, the slot of the nearest
        one that holds an answer here, its distance). Entries another replica forwarded
        count for the budget but hold no answer on this one."""
        n = min(self.seq, len(self.vectors))
        if n == 0:
            return 0, None, float("inf")
        # nearest of the query's shifted features, one BLAS product over the history
        d2 = nearest_distances(query, self.vectors[:n], self.sq[:n]) ** 2
        ok = self.live[:n] & (self.born[:n] >= oldest)
        inside = ok & (d2 <= radius * radius)
        near = int(np.count_nonzero(inside))
        if near == 0:
            return 0, None, float("inf")
        d2 = np.where(inside & self.answered[:n], d2, np.inf)
        k = int(np.argmin(d2))
        if not np.isfinite(d2[k]):
            return near, None, float("inf")
        return near, k, float(np.sqrt(max(float(d2[k]), 0.0)))


class CrossSessionIndex:
    def __init__(self, window: int, ttl_s: float, radius: float = DEFAULT_RADIUS, budget: int = DEFAULT_BUDGET,
                 clock: Callable[[], float] = time.monotonic, exact_below: int = 2048,
                 on_budget: Callable[[str], None] | None = None, history: int = DEFAULT_HISTORY,
                 max_principals: int = DEFAULT_PRINCIPALS) -> None:
        if budget < 1 or radius < 0 or history < 1 or max_principals < 1:
            raise ValueError("budget, history and max_principals must be >= 1 and radius >= 0")
        self.clock = clock
        self.window = window
        self.ttl_s = ttl_s
        self.radius = radius
        self.budget = budget
        self.exact_below = exact_below
        self.on_budget = on_budget
        self.history = history
        self.max_principals = max_principals
        self._by_model: dict[str, ModelIndex] = {}
        self._principals: OrderedDict[tuple[str, str], PrincipalHistory] = OrderedDict()
        self._inflight: dict[int, tuple[str, list[int], PrincipalHistory | None, list[int]]] = {}
        self.budget_answers = 0  # queries answered from their principal's own history

    def _model(self, model: str) -> ModelIndex:
        ix = self._by_model.get(model)
        if ix is None:
            ix = self._by_model[model] = ModelIndex(self.window, self.ttl_s, self.clock, self.exact_below)
        return ix

    def _history(self, model: str, principal: str) -> PrincipalHistory:
        key = (model, principal)
        h = self._principals.get(key)
        if h is None:
            h = self._principals[key] = PrincipalHistory(self.history)
            while len(self._principals) > self.max_principals:
                self._principals.popitem(last=False)
        else:
            self._principals.move_to_end(key)
        return h

    def _oldest(self) -> float:
        return self.clock() - self.ttl_s if self.ttl_s > 0 else -float("inf")

    def lookup(self, model: str, principal: str = ""):
        """A finder for ``plan``: the exact-bytes answer (an ``asyncio.Future`` while in
        flight), the principal's own nearest earlier answer once ``budget`` of its
        recent forwards lie within ``radius``, or None to forward.

        ``plan`` tells the finder (``note``) what it decided to forward, so later
        queries of the same batch count those too, and may be answered by them.
        """
        ix = self._model(model)
        ix.expire()
        hist = self._history(model, principal)
        oldest = self._oldest()
        planned: list[tuple[np.ndarray, Anchor]] = []

        def find(fp: Fingerprint) -> Anchor | None:
            hit = ix.exact(digest(fp.image))
            if hit is not None:
                return Anchor(fp, hit)
            q = _invariant_of(fp)
            near, slot, best = hist.near(q, self.radius, oldest)
            answer = hist.results[slot] if slot is not None else None
            if planned:
                dist = nearest_distances(q, np.stack([v for v, _ in planned]))
                for d, (_, a) in zip(dist.tolist(), planned):
                    if d <= self.radius:
                        near += 1
                        if d < best:
                            best, answer = d, a.result
            if near >= self.budget and answer is not None:
                self.budget_answers += 1
                if self.on_budget is not None:
                    self.on_budget(model)
                return Anchor(fp, answer)
            return None

        def note(anchor: Anchor) -> None:
            planned.append((_invariant_of(anchor.fingerprint)[0], anchor))

        find.note = note  # type: ignore[attr-defined]
        return find

    def reserve(self, model: str, fps: Sequence[Fingerprint], principal: str = "") -> list[asyncio.Future]:
        """Images about to be forwarded: indexed now, their answers to follow."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in fps]
        ix = self._model(model)
        seqs = [ix.add(lowpass_of(fp), digest(fp.image), fut) for fp, fut in zip(fps, futures)]
        hist = self._history(model, principal)
        now = self.clock()
        hseqs = [hist.add(_invariant_of(fp)[0], fut, now) for fp, fut in zip(fps, futures)]
        self._inflight[id(futures)] = (model, seqs, hist, hseqs)
        return futures

    def add(self, model: str, anchors: Iterable[Anchor], principal: str | None = None) -> None:
        """Entries with known answers (or None: a replica's entry whose answer stays
        there), for exact bytes and, with ``principal``, that principal's budget."""
        ix = self._model(model)
        hist = self._history(model, principal) if principal is not None else None
        now = self.clock()
        for a in anchors:
            ix.add(lowpass_of(a.fingerprint), digest(a.fingerprint.image), a.result)
            if hist is not None:
                hist.add(_invariant_of(a.fingerprint)[0], a.result, now)

    def complete(self, model: str, fps: Sequence[Fingerprint], futures: list[asyncio.Future], results: Sequence) -> None:
        """The backend answered: entries hold the answers; waiters are released."""
        _, seqs, hist, hseqs = self._inflight.pop(id(futures), (model, [], None, []))
        ix = self._model(model)
        for seq, result in zip(seqs, results):
            ix.set_result(seq, result)
        if hist is not None:
            for seq, result in zip(hseqs, results):
                hist.set_result(seq, result)
        for fut, result in zip(futures, results):
            fut.set_result(result)

    def abandon(self, model: str, futures: list[asyncio.Future], exc: BaseException) -> None:
        """The backend failed: entries are removed; waiters fail the same way."""
        _, seqs, hist, hseqs = self._inflight.pop(id(futures), (model, [], None, []))
        self._model(model).remove(seqs)
        if hist is not None:
            for seq in hseqs:
                hist.remove(seq)
        for fut in futures:
            fut.set_exception(exc)
            fut.add_done_callback(lambda f: f.exception())  # retrieved even without waiters

    def __len__(self) -> int:
        return sum(len(i) for i in self._by_model.values())
