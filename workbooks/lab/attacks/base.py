"""The one interface attacks use to see a classifier."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """Black-box access: uint8 images (n, 32, 32, 3) -> scores (n, num_classes).

    Images of one call are judged in order (for the sidecar: within the
    predictor's session, as if sent one by one). A defended service may answer
    with a cached score vector, and may perturb shown scores; a predictor that
    knows the service's own labels exposes them as ``last_labels`` (for the rows
    of its latest ``predict``), and attacks take success verdicts from those
    (``answer_labels``), using the scores only as a fitness signal.
    """

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def labels_of(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores).argmax(axis=-1)


def answer_labels(predictor, scores: np.ndarray) -> np.ndarray:
    """The labels the service answered for the rows of ``scores`` (its latest predict)."""
    labels = getattr(predictor, "last_labels", None)
    if labels is not None and len(labels) == len(scores):
        return np.asarray(labels, dtype=np.int64)
    return labels_of(scores)


def as_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected images (n, h, w, c), got shape {images.shape}")
    return images


class CallablePredictor:
    """A local predictor around ``fn(float32 images 0-255) -> scores``.

    ``fn`` may be a Keras model, a SavedModel signature wrapper or any callable;
    used offline and in tests (no sidecar involved).
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], batch_size: int = 512) -> None:
        self._fn = fn
        self.batch_size = batch_size
        self.query_count = 0
        self.call_count = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = as_batch(images)
        self.call_count += 1
        self.query_count += len(images)
        out = [np.asarray(self._fn(images[i:i + self.batch_size].astype(np.float32)))
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class CountingPredictor:
    """Wraps any predictor and counts images (``query_count``) and calls."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.query_count = 0
        self.call_count = 0

    @property
    def last_labels(self):
        return getattr(self.inner, "last_labels", None)

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = as_batch(images)
        self.call_count += 1
        self.query_count += len(images)
        return self.inner.predict(images)
