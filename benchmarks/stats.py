from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def summary_ms(seconds) -> dict:
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def emit(result: dict, out: str | None) -> None:
    """Print a benchmark's JSON and, when ``out`` is given, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
