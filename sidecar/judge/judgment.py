"""The judgment layer: decide, without I/O, whether a query reaches the model.

Paper mode is Algorithm 1 exactly: a session holds one anchor (the last image
forwarded and its result). A new image is forwarded only if BOTH its hash
Hamming distance and its differing-pixel count from the anchor exceed
``n_threshold``; otherwise the anchor's result answers it and the anchor stays.

Hardened mode keeps the last K anchors of a session and replaces the hash by
a continuous measure (``lowpass.py``): a query is forwarded only if BOTH its
low-pass distance from the anchor exceeds ``lowpass_tau`` (and its coarser
8x8 and 4x4 means are apart too, ``lowpass.COARSE``: that catches small shifts
and noise) AND its differing-pixel count exceeds ``n_threshold``. A mask with L-inf eps moves the low-pass
distance by at most eps*16*sqrt(3), so small dense masks stay "similar"
whatever they do to hash bits. ``lookup`` (crosssession.py) is consulted
before anything is forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, NamedTuple, Sequence, TypeVar

import numpy as np

from .invariant import query_features as invariant_features
from .lowpass import SIDE, area16, coarse_similar, distance, lowpass
from .phash import DCT, DCT_T, GRAY, HASH_BITS, hamming, phash_batch, pixel_diff, pixel_diffs
from ..lazy import lazy

cv2 = lazy("cv2", globals())  # OpenCV loads with the first image (sidecar/lazy.py)

R = TypeVar("R")

#: The paper's threshold: 10% of the 16x16 hash image.
PAPER_THRESHOLD = 0.10 * HASH_BITS


#: Hardened mode's low-pass distance below which two images are similar
#: (0-1 scale, 16x16 area means). Every mask with L-inf 16/255 stays below
#: mask_bound(16/255) = 1.74 (+0.43 per changed pixel); 0.1% of distinct
#: CIFAR-10 test images have a nearest neighbour closer than 2.43.
HARDENED_TAU = 2.4


@dataclass(frozen=True)
class Thresholds:
    n_threshold: float = PAPER_THRESHOLD
    pixel_tolerance: float = 0.0
    lowpass_tau: float | None = None  # None: paper mode (hash); else hardened (low-pass distance)


@dataclass(frozen=True, eq=False)
class Fingerprint:
    """An image and its perceptual hash, computed once per query."""

    image: np.ndarray
    hash: bytes
    lowpass: np.ndarray | None = None  # (16*16*C,) float32, hardened mode only
    invariant: np.ndarray | None = None  # (len(invariant.OFFSETS), DIMS) float32, hardened mode's budget only

    @classmethod
    def of(cls, image: np.ndarray, with_lowpass: bool = False) -> "Fingerprint":
        return fingerprints([image], with_lowpass)[0]


def fingerprints(images, with_lowpass: bool = False, with_invariant: bool = False) -> list[Fingerprint]:
    """Fingerprints of a batch, computed with array operations in one pass.

    Images of different shapes are fingerprinted one shape group at a time.
    ``with_invariant`` adds the transform-tolerant feature (``invariant.py``).
    """
    fps = _fingerprints(images, with_lowpass)
    if not with_invariant:
        return fps
    if len(fps) == 1:
        fp = fps[0]
        img = fp.image if fp.image.ndim == 3 else fp.image[..., None]
        return [Fingerprint(fp.image, fp.hash, fp.lowpass, invariant_features(img[None])[0])]
    out: list[Fingerprint] = []
    groups: dict[tuple, list[int]] = {}
    for i, fp in enumerate(fps):
        groups.setdefault(fp.image.shape, []).append(i)
    vecs: list[np.ndarray | None] = [None] * len(fps)
    for idx in groups.values():
        for i, v in zip(idx, invariant_features(np.stack([fps[i].image for i in idx]))):
            vecs[i] = v
    for fp, v in zip(fps, vecs):
        out.append(Fingerprint(fp.image, fp.hash, fp.lowpass, v))
    return out


def _fingerprints(images, with_lowpass: bool = False) -> list[Fingerprint]:
    imgs = [np.ascontiguousarray(i) for i in images]
    for img in imgs:
        img.setflags(write=False)
    if len(imgs) == 1 and imgs[0].shape == (32, 32, 3) and imgs[0].dtype in _FAST_DTYPES:
        return [_fingerprint_one(imgs[0], with_lowpass)]
    out: list[Fingerprint | None] = [None] * len(imgs)
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(imgs):
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
            raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {img.shape}")
        groups.setdefault(img.shape, []).append(i)
    for idx in groups.values():
        area = area16([imgs[i] for i in idx])
        hashes = phash_batch(None, area=area)
        vecs = lowpass(None, area=area) if with_lowpass else [None] * len(idx)
        for k, i in enumerate(idx):
            out[i] = Fingerprint(imgs[i], hashes[k].tobytes(), vecs[k])
    return out  # type: ignore[return-value]


_FAST_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
_INV255 = np.float32(1 / 255)
_INV_BITS = np.float32(1 / HASH_BITS)


def _fingerprint_one(img: np.ndarray, with_lowpass: bool) -> Fingerprint:
    """One 32x32x3 image with the batch path's arithmetic, minus its per-call overhead.

    cv2's INTER_AREA is the sum order ``area16`` copies (bit for bit); the grayscale
    and DCT are the same matrix products on one 16x16 image instead of a stack, and
    the mean is the same float32 pairwise sum divided by 256 (a power of two, exact).
    tests/test_lowpass.py checks single == batch == cv2 reference.
    """
    area = cv2.resize(img.astype(np.float32), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    coeffs = (DCT @ (area @ GRAY) @ DCT_T).reshape(HASH_BITS)
    bits = np.packbits(coeffs > np.add.reduce(coeffs) * _INV_BITS).tobytes()  # = coeffs.sum(), no wrapper
    return Fingerprint(img, bits, area.reshape(-1) * _INV255 if with_lowpass else None)


class Comparison(NamedTuple):  # a NamedTuple: made once per query, ~4x cheaper than a frozen dataclass
    n_hash: int
    n_pixel: int
    similar: bool
    lowpass: float | None = None  # hardened mode: low-pass distance


def compare(anchor: Fingerprint, query: Fingerprint, thresholds: Thresholds) -> Comparison:
    n_pixel = pixel_diff(anchor.image, query.image, thresholds.pixel_tolerance)
    n_hash = hamming(anchor.hash, query.hash)
    if thresholds.lowpass_tau is None:  # Algorithm 1
        different = n_hash > thresholds.n_threshold and n_pixel > thresholds.n_threshold
        return Comparison(n_hash, n_pixel, not different)
    a, q = lowpass_of(anchor), lowpass_of(query)
    d = float(distance(a, q))
    different = d > thresholds.lowpass_tau and n_pixel > thresholds.n_threshold and not _coarse(a, q)
    return Comparison(n_hash, n_pixel, not different, d)


def compare_many(anchor: Fingerprint, queries: Sequence[Fingerprint], thresholds: Thresholds) -> list[Comparison]:
    """``[compare(anchor, q, thresholds) for q in queries]`` in a few array operations
    over the whole batch (the same pixel test, Hamming count and float32 distance per
    row). Queries of another shape than the anchor go through ``compare``."""
    shape = anchor.image.shape
    same = [i for i, q in enumerate(queries) if q.image.shape == shape]
    out: list[Comparison | None] = [None] * len(queries)
    if len(same) > 1:
        stack = np.stack([queries[i].image for i in same])
        n_pixel = pixel_diffs(anchor.image, stack, thresholds.pixel_tolerance, image_ndim=anchor.image.ndim).tolist()
        ah = int.from_bytes(anchor.hash, "little")
        n_hash = [(ah ^ int.from_bytes(queries[i].hash, "little")).bit_count() for i in same]
        diff = None if thresholds.lowpass_tau is None else \
            lowpass_of(anchor).astype(np.float32) - np.stack([lowpass_of(queries[i]) for i in same]).astype(np.float32)
        for i, cmp in zip(same, _rows(n_hash, n_pixel, diff, thresholds)):
            out[i] = cmp
    for i, q in enumerate(queries):
        if out[i] is None:
            out[i] = compare(anchor, q, thresholds)
    return out  # type: ignore[return-value]


def _rows(n_hash: Sequence[int], n_pixel: Sequence[int], diff: np.ndarray | None,
          th: Thresholds) -> list[Comparison]:
    """``compare``'s decision for rows of figures already counted: Hamming and pixel
    counts and, in hardened mode, the low-pass difference vectors [k, d] (None: vectors
    of different lengths, never similar by distance)."""
    t = th.n_threshold
    if th.lowpass_tau is None:
        return [Comparison(h, p, not (h > t and p > t)) for h, p in zip(n_hash, n_pixel)]
    if diff is None:
        dist, coarse = [float("inf")] * len(n_hash), [False] * len(n_hash)
    else:
        dist, coarse = np.sqrt(np.einsum("ki,ki->k", diff, diff)).tolist(), coarse_similar(diff).tolist()
    return [Comparison(h, p, not (d > th.lowpass_tau and p > t and not c), d)
            for h, p, d, c in zip(n_hash, n_pixel, dist, coarse)]


def _coarse(a: np.ndarray, q: np.ndarray) -> bool:
    """Similar at a coarser scale of the low-pass vectors (lowpass.COARSE)."""
    if a.shape != q.shape:
        return False
    return bool(coarse_similar((np.asarray(a, np.float32) - np.asarray(q, np.float32))[None])[0])


def lowpass_of(fp: Fingerprint) -> np.ndarray:
    """The stored vector, or (e.g. an anchor decoded from a session store that
    keeps only image and hash) computed from the image."""
    return fp.lowpass if fp.lowpass is not None else lowpass(fp.image[None] if fp.image.ndim == 3 else fp.image[None, ..., None])[0]


@dataclass(frozen=True)
class Anchor(Generic[R]):
    fingerprint: Fingerprint
    result: R


@dataclass(frozen=True)
class Decision(Generic[R]):
    """``forward``: send to the model. Otherwise ``anchor`` answers."""

    forward: bool
    anchor: Anchor[R] | None = None
    comparison: Comparison | None = None


def judge(anchor: Anchor[R] | None, query: Fingerprint, thresholds: Thresholds) -> Decision[R]:
    """Algorithm 1 for one query against the session's anchor."""
    if anchor is None:
        return Decision(forward=True)
    cmp = compare(anchor.fingerprint, query, thresholds)
    if cmp.similar:
        return Decision(forward=False, anchor=anchor, comparison=cmp)
    return Decision(forward=True, comparison=cmp)


@dataclass(frozen=True)
class Pending:
    """Result of an image forwarded in the current plan, not known yet."""

    index: int


class PlanStep(NamedTuple):
    forward: bool
    anchor: Anchor  # the anchor answering this query (for a forward: the new one)
    comparison: Comparison | None = None
    source: str = "forward"  # forward | session (one of the session's anchors) | lookup


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlanStep, ...]
    forwarded: tuple[Fingerprint, ...]  # what goes to the model, in order
    anchors: tuple[Anchor, ...]  # the session's anchors afterwards (may hold Pending)


Lookup = Callable[[Fingerprint], "Anchor | None"]


def plan(
    anchors: Sequence[Anchor],
    queries: Sequence[Fingerprint],
    thresholds: Thresholds,
    history: int = 1,
    lookup: Lookup | None = None,
) -> Plan:
    """Judge an ordered batch of one session as if the queries came one by one.

    ``history=1`` without ``lookup`` is Algorithm 1: one anchor, replaced only
    when a query is forwarded. Larger ``history`` keeps the last K anchors and a
    query similar to ANY of them (most recent first) gets that anchor's answer;
    ``lookup`` is consulted before forwarding (the cross-session index); a
    lookup with a ``note`` method is told every anchor the plan forwards.

    Decisions depend only on which images became anchors, never on the model's
    answer, so every forwarded image can go to the model in one call; anchors
    forwarded inside this plan carry ``Pending`` until ``resolve``.
    """
    window = list(anchors)[-history:] if history > 0 else []
    steps: list[PlanStep] = []
    forwarded: list[Fingerprint] = []
    stack: _AnchorStack | None = None
    ahead = _LookAhead(queries, thresholds)
    for pos, fp in enumerate(queries):
        hit: Anchor | None = None
        first_cmp: Comparison | None = None
        if len(window) > 1:  # the K anchors at once, most recent first; same decisions as compare()
            if stack is None:
                stack = _AnchorStack(window[::-1], thresholds)
            hit, first_cmp = stack.match(fp)
        elif window:  # one anchor: compared with the next queries in one pass (see _LookAhead)
            first_cmp = ahead.comparison(window[0], pos)
            hit = window[0] if first_cmp.similar else None
        source = "session"
        if hit is None and lookup is not None:
            hit, source = lookup(fp), "lookup"
        if hit is not None:
            steps.append(PlanStep(False, hit, first_cmp, source))
            continue
        new = Anchor(fp, Pending(len(forwarded)))
        if lookup is not None and hasattr(lookup, "note"):
            lookup.note(new)  # later queries of this batch count it (and may be answered by it)
        forwarded.append(fp)
        window = (window + [new])[-history:]
        stack = None
        steps.append(PlanStep(True, new, first_cmp))
    return Plan(tuple(steps), tuple(forwarded), tuple(window))


class _LookAhead:
    """One anchor's comparisons with the queries after it, a growing chunk at a time.

    While the anchor stays (the query was answered from it), the next chunk is twice
    as long, so a batch of near-copies of one image (the attack's shape) is compared in
    a handful of ``compare_many`` passes; a forward makes a new anchor and the chunk
    starts again at one query, so a batch of distinct images costs what it did one by one.
    """

    def __init__(self, queries: Sequence[Fingerprint], thresholds: Thresholds) -> None:
        self.queries, self.th = queries, thresholds
        self.anchor: Anchor | None = None
        self.start = 0
        self.done: list = []
        self.size = 1

    def comparison(self, anchor: Anchor, pos: int) -> Comparison:
        if anchor is not self.anchor:
            self.anchor, self.start, self.done, self.size = anchor, pos, [], 1
        elif pos - self.start >= len(self.done):
            self.size *= 2
        if pos - self.start >= len(self.done):
            if self.size == 1:  # one query: no batch to build
                self.start, self.done = pos, [compare(anchor.fingerprint, self.queries[pos], self.th)]
            else:
                self.start, self.done = pos, compare_many(anchor.fingerprint, self.queries[pos:pos + self.size],
                                                          self.th)
        return self.done[pos - self.start]


class _AnchorStack:
    """A window's anchors (most recent first) stacked once, so one query is compared
    with all of them in a few array operations instead of K ``compare`` calls.

    Every figure is ``compare``'s own: the same pixel test, the same Hamming count and
    the same float32 distance per row (einsum over one row of the stack adds in the
    order ``distance`` does). Anchors of another shape than the query go through
    ``compare`` one by one.
    """

    def __init__(self, anchors: Sequence[Anchor], thresholds: Thresholds) -> None:
        self.anchors, self.th = list(anchors), thresholds
        self.shape = self.anchors[0].fingerprint.image.shape
        self.uniform = all(a.fingerprint.image.shape == self.shape for a in self.anchors)
        if self.uniform:
            imgs = [a.fingerprint.image for a in self.anchors]
            self.exact = thresholds.pixel_tolerance == 0 and all(i.dtype == np.uint8 for i in imgs)
            self.images = np.stack(imgs) if self.exact else np.stack(imgs).astype(np.float32)
            self.hashes = [int.from_bytes(a.fingerprint.hash, "little") for a in self.anchors]
            if thresholds.lowpass_tau is not None:
                self.vectors = np.stack([lowpass_of(a.fingerprint) for a in self.anchors]).astype(np.float32)

    def match(self, fp: Fingerprint) -> tuple[Anchor | None, Comparison | None]:
        q = fp.image
        if not self.uniform or q.shape != self.shape:
            first = None
            for a in self.anchors:
                cmp = compare(a.fingerprint, fp, self.th)
                first = first or cmp
                if cmp.similar:
                    return a, cmp
            return None, first
        th = self.th
        n_pixel = pixel_diffs(self.images, q, th.pixel_tolerance, image_ndim=q.ndim).tolist()
        qh = int.from_bytes(fp.hash, "little")
        n_hash = [(h ^ qh).bit_count() for h in self.hashes]
        diff = None
        if th.lowpass_tau is not None:
            qv = lowpass_of(fp)
            if qv.shape[-1] == self.vectors.shape[-1]:
                diff = self.vectors - np.asarray(qv, np.float32)
        rows = _rows(n_hash, n_pixel, diff, th)
        k = next((k for k, cmp in enumerate(rows) if cmp.similar), 0)
        return (self.anchors[k] if rows[k].similar else None), rows[k]


def resolve(p: Plan, results: Sequence[R]) -> tuple[list[R], tuple[Anchor[R], ...]]:
    """Fill in the model's results: the answer of every step and the new anchors."""
    if len(results) != len(p.forwarded):
        raise ValueError(f"plan forwarded {len(p.forwarded)} images, got {len(results)} results")

    def filled(a: Anchor) -> Anchor:
        return Anchor(a.fingerprint, results[a.result.index]) if isinstance(a.result, Pending) else a

    answers = [filled(s.anchor).result for s in p.steps]
    return answers, tuple(filled(a) for a in p.anchors)
