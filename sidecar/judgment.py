"""The judgment layer: decide, without I/O, whether a query reaches the model.

Paper mode is Algorithm 1 exactly: a session holds one anchor (the last image
forwarded and its result). A new image is forwarded only if BOTH its hash
Hamming distance and its differing-pixel count from the anchor exceed
``n_threshold``; otherwise the anchor's result answers it and the anchor stays.

Hardened mode (see ``hardened.py``) consults several anchors; it reuses
``compare`` and ``Fingerprint`` from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

from .phash import HASH_BITS, hamming, phash, pixel_diff

R = TypeVar("R")

#: The paper's threshold: 10% of the 16x16 hash image.
PAPER_THRESHOLD = 0.10 * HASH_BITS


@dataclass(frozen=True)
class Thresholds:
    n_threshold: float = PAPER_THRESHOLD
    pixel_tolerance: float = 0.0


@dataclass(frozen=True, eq=False)
class Fingerprint:
    """An image and its perceptual hash, computed once per query."""

    image: np.ndarray
    hash: bytes

    @classmethod
    def of(cls, image: np.ndarray) -> "Fingerprint":
        image = np.ascontiguousarray(image)
        image.setflags(write=False)
        return cls(image, phash(image))


@dataclass(frozen=True)
class Comparison:
    n_hash: int
    n_pixel: int
    similar: bool


def compare(anchor: Fingerprint, query: Fingerprint, thresholds: Thresholds) -> Comparison:
    n_hash = hamming(anchor.hash, query.hash)
    n_pixel = pixel_diff(anchor.image, query.image, thresholds.pixel_tolerance)
    different = n_hash > thresholds.n_threshold and n_pixel > thresholds.n_threshold
    return Comparison(n_hash, n_pixel, not different)


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


@dataclass(frozen=True)
class PlanStep:
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
    ``lookup`` is consulted before forwarding (the cross-session index).

    Decisions depend only on which images became anchors, never on the model's
    answer, so every forwarded image can go to the model in one call; anchors
    forwarded inside this plan carry ``Pending`` until ``resolve``.
    """
    window = list(anchors)[-history:] if history > 0 else []
    steps: list[PlanStep] = []
    forwarded: list[Fingerprint] = []
    for fp in queries:
        hit: Anchor | None = None
        first_cmp: Comparison | None = None
        for candidate in reversed(window):
            cmp = compare(candidate.fingerprint, fp, thresholds)
            first_cmp = first_cmp or cmp
            if cmp.similar:
                hit, first_cmp = candidate, cmp
                break
        source = "session"
        if hit is None and lookup is not None:
            hit, source = lookup(fp), "lookup"
        if hit is not None:
            steps.append(PlanStep(False, hit, first_cmp, source))
            continue
        new = Anchor(fp, Pending(len(forwarded)))
        forwarded.append(fp)
        window = (window + [new])[-history:]
        steps.append(PlanStep(True, new, first_cmp))
    return Plan(tuple(steps), tuple(forwarded), tuple(window))


def resolve(p: Plan, results: Sequence[R]) -> tuple[list[R], tuple[Anchor[R], ...]]:
    """Fill in the model's results: the answer of every step and the new anchors."""
    if len(results) != len(p.forwarded):
        raise ValueError(f"plan forwarded {len(p.forwarded)} images, got {len(results)} results")

    def filled(a: Anchor) -> Anchor:
        return Anchor(a.fingerprint, results[a.result.index]) if isinstance(a.result, Pending) else a

    answers = [filled(s.anchor).result for s in p.steps]
    return answers, tuple(filled(a) for a in p.anchors)
