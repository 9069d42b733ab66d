"""hashguard sidecar: perceptual-hash judgment and time padding in front of TF Serving.

The pure pieces are importable without TensorFlow::

    from sidecar import Fingerprint, Thresholds, compare, judge, phash, hamming, pixel_diff

The server lives in ``sidecar.server`` (``SidecarServer``) and runs as
``hashguard-sidecar`` / ``python -m sidecar``.
"""

import os as _os
import sys as _sys

#: Thread variables of the BLAS builds numpy may load. The sidecar's matrix products are
#: tiny (16x16); a multi-threaded BLAS on a shared 2-core host made them ~25x slower.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _pin_blas_if_server() -> None:
    """One BLAS thread when this process IS the sidecar (``hashguard-sidecar`` or
    ``python -m sidecar``, whose package import runs with argv[0] == "-m"), set before
    numpy loads its BLAS. A value already in the environment wins; library users who
    import ``sidecar`` into their own program are left alone."""
    argv0 = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    if "numpy" not in _sys.modules and argv0 in ("hashguard-sidecar", "-m"):
        for var in BLAS_THREAD_VARS:
            _os.environ.setdefault(var, "1")


_pin_blas_if_server()

from .config import Settings  # noqa: E402
from .judge.judgment import (  # noqa: E402
    PAPER_THRESHOLD, Anchor, Comparison, Decision, Fingerprint, Thresholds, compare, judge, plan, resolve)
from .judge.phash import hamming, phash, pixel_diff  # noqa: E402

__all__ = [
    "PAPER_THRESHOLD", "Anchor", "Comparison", "Decision", "Fingerprint", "Settings", "Thresholds",
    "compare", "hamming", "judge", "phash", "pixel_diff", "plan", "resolve",
]
