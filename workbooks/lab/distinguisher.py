"""Attacker-side hit/miss distinguisher (the first step of an OARS-style attack).

Protocol: the attacker sends a clean image x, then a 1-pixel copy x'. Sent in
the same session of a ``paper``-mode sidecar, x' is answered from x's anchor (a
hit); sent in a fresh session of the same sidecar, x' reaches the model (a miss):
the same process, code path, output policy and noise key, so the two differ only
by the cache. (An ``off``-mode sidecar with the same policy and key gives misses
too.) From what it sees, the two answers and the latency of the second call, a
classifier predicts hit or miss.
Accuracy 0.5 is a coin flip: the defense leaves no observable trace.

Features
- content: L1 and max-abs difference of the two shown score vectors, whether they
  are byte-identical, whether the top label is the same;
- timing: latency of the second call (ms).
Classifiers: the exact-equality rule ("identical answers => cached") and a
logistic regression (5-fold cross-validation); the better one is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .client import SidecarClient, new_session_id


@dataclass(frozen=True)
class Observation:
    first: np.ndarray
    second: np.ndarray
    latency_s: float
    hit: bool


def one_pixel_copy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    y, x = rng.integers(0, img.shape[0]), rng.integers(0, img.shape[1])
    out[y, x] = 255 - out[y, x]
    return out


def observe(address: str, model: str, images: np.ndarray, hit: bool, seed: int = 0) -> list[Observation]:
    """Pairs (x, 1-pixel x') through one sidecar. ``hit``: x' in x's session (a
    paper-mode sidecar answers it from the anchor); otherwise x' goes in a fresh
    session (forwarded: a miss)."""
    rng = np.random.default_rng(seed)
    out = []
    with SidecarClient(address, model, new_session_id("dist")) as p:
        for img in images:
            _, first, _ = p.classify(img)
            second_p = p if hit else p.with_session()
            _, second, dt = second_p.classify(one_pixel_copy(img, rng))
            out.append(Observation(first, second, dt, hit))
    return out


def features(obs: list[Observation], use: tuple[str, ...] = ("content", "timing")) -> np.ndarray:
    cols = []
    if "content" in use:
        d = np.stack([np.abs(o.second - o.first) for o in obs])
        cols += [d.sum(1), d.max(1),
                 np.array([o.first.tobytes() == o.second.tobytes() for o in obs], float),
                 np.array([np.argmax(o.first) == np.argmax(o.second) for o in obs], float)]
    if "timing" in use:
        cols.append(np.array([o.latency_s * 1e3 for o in obs]))
    return np.stack(cols, axis=1)


def accuracy(obs: list[Observation], use: tuple[str, ...] = ("content", "timing"), seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array([o.hit for o in obs], int)
    X = features(obs, use)
    rule = float(np.mean(np.array([o.first.tobytes() == o.second.tobytes() for o in obs]) == y))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = cross_val_score(model, X, y, cv=5, scoring="accuracy")
    logreg = float(np.mean(cv))
    return {"n": int(len(y)), "features": list(use), "rule_accuracy": rule, "logreg_accuracy": logreg,
            "accuracy": max(rule, logreg)}
