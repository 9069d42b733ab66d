"""JSMA (Papernot et al. 2016) with the query loop going through a predictor.

The saliency step is ART's ``SaliencyMapMethod`` (adversarial-robustness-toolbox
1.20), re-implemented so that every iteration's candidate can be sent to a remote
predictor:

- each iteration picks the two features (pixel channels) in the search space
  with the largest gradient of the TARGET class output (ART's pair rule; we take
  the gradient of log score[target], which orders features identically and does
  not underflow) and increases both by ``theta``;
- a feature leaves the search space when it reaches 255 (it may be increased
  again until then);
- the attack stops when the predictor answers the target, when more than a
  fraction ``gamma`` of all 3072 features has been modified, when the search
  space is empty, or after ``max_iter`` iterations (a cap for quick runs; None
  for no cap, which is ART's behaviour).

Mapping of the paper's theta: the paper (via AdvBox) gives theta as the
perturbation per modified feature relative to the input range. Here
``theta`` is ART's theta on the [0, 1] scale: each step adds
``round(255 * theta)`` intensity levels to the chosen features of the uint8
image (0.1 -> 26, 0.2 -> 51, 0.3 -> 76, 0.4 -> 102). ``gamma`` (ART's maximum
fraction of modified features) is not a paper parameter; the workbooks fix it
per profile and record it with every result.

Queries: iteration 0 asks the predictor about the clean image (as ART and AdvBox
both do before perturbing), then one query per iteration for the new candidate,
all in the predictor's session. The last answer is the verdict. Gradients come
from ``gradients``, the attacker's local copy of the model (white-box knowledge);
the predictor's answers only decide when to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .base import Predictor, answer_labels, as_batch


class Gradients(Protocol):
    def target_gradient(self, image: np.ndarray, target: int) -> np.ndarray:
        """d log score[target] / d image for one float32 image (h, w, c) on 0-255."""
        ...


class TFGradients:
    """Gradients of a local TensorFlow/Keras model that takes raw 0-255 images.

    ``model`` is a Keras model, any callable returning scores, or the path of an
    exported SavedModel version directory (``models/<name>/<version>``), whose
    ``serving_default`` signature (input ``image``, output ``scores``) is used.
    """

    def __init__(self, model) -> None:
        import tensorflow as tf

        if isinstance(model, (str, Path)):
            loaded = tf.saved_model.load(str(model))
            sig = loaded.signatures["serving_default"]
            self._keep = loaded

            def fn(x):
                return sig(image=x)["scores"]
        else:
            fn = model
        self._fn = fn

        @tf.function(reduce_retracing=True)
        def grad(x, t):
            with tf.GradientTape() as tape:
                tape.watch(x)
                scores = fn(x)
                obj = tf.math.log(tf.gather(scores, t, axis=1) + 1e-30)
            return tape.gradient(obj, x), scores

        self._grad = grad
        self._tf = tf

    def target_gradient(self, image: np.ndarray, target: int) -> np.ndarray:
        x = self._tf.constant(np.asarray(image, np.float32)[None])
        g, _ = self._grad(x, self._tf.constant(int(target)))
        return g.numpy()[0]

    def scores(self, images: np.ndarray) -> np.ndarray:
        x = self._tf.constant(as_batch(images).astype(np.float32))
        return np.asarray(self._fn(x))


@dataclass
class JSMAResult:
    success: bool
    label: int  # the predictor's answer for ``image`` (the last query)
    true_label: int
    target: int
    theta: float
    gamma: float
    iterations: int
    queries: int
    features_changed: int  # distinct channels modified
    pixels_changed: int  # distinct pixel positions modified
    stop: str  # "target", "gamma", "search_space", "max_iter"
    image: np.ndarray = field(repr=False)
    labels: list[int] = field(default_factory=list, repr=False)  # answer per query


def step_levels(theta: float) -> int:
    """Intensity levels added per step for ART theta on the [0, 1] scale."""
    return int(round(255 * theta))


def attack(predictor: Predictor, gradients: Gradients, image: np.ndarray, true_label: int,
           target: int, *, theta: float = 0.1, gamma: float = 0.1,
           max_iter: int | None = None) -> JSMAResult:
    if not 0 < gamma <= 1:
        raise ValueError("gamma must be in (0, 1]")
    if theta <= 0:
        raise ValueError("only positive theta (increasing features) is implemented")
    if target == true_label:
        raise ValueError("target equals the true label")
    x = as_batch(image)[0].astype(np.int32)
    shape = x.shape
    n_feat = x.size
    step = step_levels(theta)
    search = (x < 255).reshape(-1)
    used = np.zeros(n_feat, dtype=bool)

    def ask(img: np.ndarray) -> int:
        scores = np.asarray(predictor.predict(img.astype(np.uint8)[None]))
        return int(answer_labels(predictor, scores)[0])

    labels = [ask(x)]
    iterations = 0
    stop = "target"
    while labels[-1] != target:
        if used.sum() / n_feat > gamma:
            stop = "gamma"
            break
        if not search.any():
            stop = "search_space"
            break
        if max_iter is not None and iterations >= max_iter:
            stop = "max_iter"
            break
        g = gradients.target_gradient(x.astype(np.float32), target).reshape(-1).astype(np.float64)
        g[~search] = -np.inf
        k = min(2, int(search.sum()))
        idx = np.argpartition(g, -k)[-k:]
        flat = x.reshape(-1)
        flat[idx] = np.minimum(255, flat[idx] + step)
        used[idx] = True
        search[flat >= 255] = False
        iterations += 1
        labels.append(ask(x))
    changed = used.reshape(shape)
    return JSMAResult(
        success=labels[-1] == target, label=labels[-1], true_label=int(true_label), target=int(target),
        theta=float(theta), gamma=float(gamma), iterations=iterations, queries=len(labels),
        features_changed=int(used.sum()), pixels_changed=int(changed.any(axis=-1).sum()),
        stop=stop, image=x.astype(np.uint8), labels=labels,
    )
