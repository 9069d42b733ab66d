"""ART estimators whose predictions come from the sidecar's gRPC API.

* ``black_box(predict)``: ART's ``BlackBoxClassifierNeuralNetwork`` over any
  ``predict(images 0-255 float (n, 32, 32, 3)) -> scores`` (a ``SidecarClient``'s,
  or a routing strategy's from ``lab.routing``). Its ``predict`` sends the whole
  array as one call, whatever ``batch_size`` an attack asks for, so a DE population
  is one ``ClassifyBatch`` judged in order in the attacker's session. Black-box
  attacks (PixelAttack, SquareAttack, HopSkipJump, SimBA) see nothing else.
* ``SidecarGradients(predict, saved_model_dir)``: ART's ``TensorFlowV2Classifier``
  on the attacker's local copy of the exported model for ``class_gradient``, with
  ``predict`` replaced by the sidecar's answers: the paper's white-box JSMA setting,
  where every "did it work yet" check still goes through the defense.
* ``local(saved_model_dir)``: the local copy with its own predictions (no sidecar):
  the reference for parity tests.

Images are on the 0-255 scale (``clip_values=(0, 255)``), like the wire format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from art.estimators.classification import BlackBoxClassifierNeuralNetwork, TensorFlowV2Classifier

SHAPE = (32, 32, 3)
CLIP = (0.0, 255.0)


class QueryBudgetExhausted(RuntimeError):
    """The attack asked more than its budget of images: it is stopped there.

    Some of ART's loops never end against a stateful defense: HopSkipJump halves
    its step ``while not success`` and, when a cached answer says its own boundary
    point is not adversarial, halves forever. A budget turns that into an attack
    that gave up."""


class _WholeBatch(BlackBoxClassifierNeuralNetwork):
    max_queries: int | None = None
    queries: int = 0

    def predict(self, x: np.ndarray, batch_size: int = 128, **kwargs) -> np.ndarray:  # noqa: ARG002
        self.queries += len(x)
        if self.max_queries is not None and self.queries > self.max_queries:
            raise QueryBudgetExhausted(f"{self.queries} images asked; the budget is {self.max_queries}")
        return np.asarray(self._predict_fn(np.asarray(x, np.float32)), np.float32)


def black_box(predict: Callable[[np.ndarray], np.ndarray], nb_classes: int = 10,
              max_queries: int | None = None) -> BlackBoxClassifierNeuralNetwork:
    est = _WholeBatch(predict, SHAPE, nb_classes, clip_values=CLIP, channels_first=False)
    est.max_queries = max_queries
    return est


def load_scores_fn(saved_model_dir: str | Path):
    """``fn(float32 images 0-255) -> softmax scores`` of an exported SavedModel (serving_default)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir))
    sig = loaded.signatures["serving_default"]

    def fn(x, training=False):  # noqa: ARG001 - ART passes training=
        return sig(image=tf.cast(x, tf.float32))["scores"]

    fn._keep = loaded  # the signature needs its object alive
    return fn


class SidecarGradients(TensorFlowV2Classifier):
    """Class gradients from the local model, predictions from ``predict`` (the sidecar)."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], saved_model_dir: str | Path,
                 nb_classes: int = 10) -> None:
        super().__init__(load_scores_fn(saved_model_dir), nb_classes=nb_classes, input_shape=SHAPE, clip_values=CLIP)
        self._remote = predict

    def predict(self, x: np.ndarray, batch_size: int = 128, training_mode: bool = False, **kwargs) -> np.ndarray:  # noqa: ARG002
        return np.asarray(self._remote(np.asarray(x, np.float32)), np.float32)


def local(saved_model_dir: str | Path, nb_classes: int = 10) -> TensorFlowV2Classifier:
    return TensorFlowV2Classifier(load_scores_fn(saved_model_dir), nb_classes=nb_classes, input_shape=SHAPE,
                                  clip_values=CLIP)


def art_version() -> str:
    import art

    return f"adversarial-robustness-toolbox {art.__version__}"
