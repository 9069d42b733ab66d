"""Output policies: what a response reveals, and how cached answers stay
indistinguishable by content from fresh ones.

Policies
- ``scores``: the full score vector (rounded to ``precision`` decimals when > 0);
- ``topk``: the ``k`` best labels with their rounded scores;
- ``label``: the top-1 label only.

Keyed perturbation (``noise`` > 0). Without it a cached answer replays the
anchor's score vector bit for bit, so an attacker who sends x and then a 1-pixel
copy x' learns "cached" from byte-identical answers, with no clock needed. With
it, every answer, cached or fresh, gets log-space Gaussian noise whose random
stream is derived from HMAC(key, exact query bytes):
- the same query always gets the same answer: repeating a query, or spreading
  it over sessions or replicas sharing the key, gives no more information than
  asking once (nothing to average away);
- two different queries get independent noise, so the answer to x' differs from
  the answer to x whether or not x' reached the model. The attacker can still
  tell the two apart only where the model's own reaction to the perturbation
  is larger than the noise (measured by the distinguisher in `make bench`).
The label is never changed by the noise: it stays the argmax of the underlying
answer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import numpy as np

POLICIES = ("scores", "topk", "label")


@dataclass(frozen=True)
class OutputPolicy:
    kind: str = "scores"
    k: int = 3
    precision: int = 0  # decimals; 0 = unrounded
    noise: float = 0.0  # std of keyed log-space noise; 0 = exact scores
    key: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"output policy must be one of {POLICIES}, got {self.kind!r}")
        if self.k < 1 or self.precision < 0 or self.noise < 0:
            raise ValueError("k must be >= 1; precision and noise must be >= 0")
        if self.noise > 0 and not self.key:
            object.__setattr__(self, "key", os.urandom(32))


@dataclass(frozen=True)
class Answer:
    label: int
    scores: np.ndarray  # what the policy shows: full vector, or zeros except top-k / empty for label
    top_k: tuple[tuple[int, float], ...]


_TWO_PI = 2 * np.pi
_U53 = 2.0 ** -53
_SHIFT = np.uint64(11)
_max, _sum = np.maximum.reduce, np.add.reduce


def keyed_noise(key: bytes, query: bytes, n: int) -> np.ndarray:
    """``n`` standard normal draws that only the key holder can predict: HMAC-SHA256 of
    the query bytes seeds SHAKE-256, whose output gives uniforms for Box-Muller (a
    fresh numpy Generator per answer cost three times more)."""
    seed = hmac.digest(key, query, hashlib.sha256)
    words = np.frombuffer(hashlib.shake_256(seed).digest(16 * n), np.uint64)
    u = ((words >> _SHIFT).astype(np.float64) + 0.5) * _U53  # in (0, 1): log never sees 0
    return np.sqrt(-2.0 * np.log(u[:n])) * np.cos(_TWO_PI * u[n:])


def perturb_scores(scores: np.ndarray, label: int, noise: np.ndarray, sigma: float) -> np.ndarray:
    logp = np.log(np.minimum(np.maximum(scores.astype(np.float64), 1e-12), 1.0)) + sigma * noise
    out = np.exp(logp - _max(logp))  # the ufunc reductions .max()/.sum() call, without their Python wrappers
    out /= _sum(out)
    top = int(out.argmax())
    if top != label:  # keep the decision; only the confidence profile is blurred
        out[[top, label]] = out[[label, top]]
    return out.astype(np.float32)


def apply(policy: OutputPolicy, scores: np.ndarray, query: bytes) -> Answer:
    label = int(scores.argmax())
    if policy.noise > 0:  # perturb_scores and round make new arrays: no float32 copy first
        shown = scores if scores.dtype == np.float32 else scores.astype(np.float32)
        shown = perturb_scores(shown, label, keyed_noise(policy.key, query, len(shown)), policy.noise)
    else:
        shown = scores.astype(np.float32)
    if policy.precision:
        shown = shown.round(policy.precision)  # what np.round calls; float32 stays float32
    if policy.kind == "label":
        return Answer(label, np.zeros(0, np.float32), ())
    if policy.kind == "topk":
        order = [label] + [int(i) for i in np.argsort(-shown, kind="stable") if i != label]
        top = tuple((i, float(shown[i])) for i in order[: policy.k])
        return Answer(label, np.zeros(0, np.float32), top)
    return Answer(label, shown, ())


def dense(answer: Answer, num_classes: int) -> np.ndarray:
    """A full-length vector for APIs that need one (the PredictionService proxy):
    the scores, or zeros except the shown top-k, or one-hot for ``label``."""
    if len(answer.scores):
        return answer.scores
    out = np.zeros(num_classes, np.float32)
    if answer.top_k:
        for i, s in answer.top_k:
            out[i] = s
    else:
        out[answer.label] = 1.0
    return out
