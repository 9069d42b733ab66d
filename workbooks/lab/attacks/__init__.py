"""Query-based attacks that see the classifier only through a ``Predictor``.

- ``onepixel``: the One Pixel Attack (differential evolution over (x, y, r, g, b)
  tuples), evaluating whole populations through one ``predict`` call.
- ``jsma``: the Jacobian-based Saliency Map Attack; gradients come from a local
  copy of the model (white-box knowledge), every "did it work yet" check and the
  final verdict go through the predictor (the sidecar, in the workbooks).

Images are uint8 HWC RGB arrays (32, 32, 3) on the 0-255 scale, like the ones a
client sends to the sidecar.
"""

from .base import CallablePredictor, CountingPredictor, Predictor, answer_labels, labels_of

__all__ = ["CallablePredictor", "CountingPredictor", "Predictor", "answer_labels", "labels_of"]
