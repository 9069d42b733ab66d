"""hashguard sidecar: perceptual-hash judgment and time padding in front of TF Serving.

The pure pieces are importable without TensorFlow::

    from sidecar import Fingerprint, Thresholds, compare, judge, phash, hamming, pixel_diff

The server lives in ``sidecar.server`` (``SidecarServer``) and runs as
``hashguard-sidecar`` / ``python -m sidecar``.
"""

from .config import Settings
from .judgment import PAPER_THRESHOLD, Anchor, Comparison, Decision, Fingerprint, Thresholds, compare, judge, plan, resolve
from .phash import hamming, phash, pixel_diff

__all__ = [
    "PAPER_THRESHOLD", "Anchor", "Comparison", "Decision", "Fingerprint", "Settings", "Thresholds",
    "compare", "hamming", "judge", "phash", "pixel_diff", "plan", "resolve",
]
