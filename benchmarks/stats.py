from __future__ import annotations

import numpy as np


def summary_ms(seconds) -> dict:
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}
