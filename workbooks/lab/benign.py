"""Benign cost: what the defense costs honest users.

The clean test set is streamed, image by image (unary ``Classify``), through ONE
session of the defended sidecar and one of the undefended sidecar. Measured:
accuracy both ways, the fraction of answers that came from the cache, and how
many cached answers were wrong (and how many of those the model itself would
have got right, i.e. errors the defense introduced).

Ground truth for "cached or forwarded" is not visible to clients by design. It
comes from the sidecar's Prometheus counters: ``hashguard_cache_answers_total``
and ``hashguard_forwards_total`` for the model, scraped before and after every
request (nothing else talks to these sidecars during the run); the per-request
deltas must add up to one per image, which is checked.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .client import SidecarClient
from .counters import Counters, one_request

GROUND_TRUTH = "prometheus counters (per-request deltas of hashguard_cache_answers_total / hashguard_forwards_total)"


def stream(client: SidecarClient, counters: Counters | None, x: np.ndarray, model: str,
           progress: bool = True) -> dict[str, np.ndarray]:
    """Classify ``x`` one by one in ``client``'s session; per image: label, cached flag, latency."""
    from tqdm.auto import tqdm

    n = len(x)
    labels, cached, latency = np.empty(n, np.int64), np.zeros(n, bool), np.empty(n)
    prev = counters.snapshot(model) if counters else None
    for i in tqdm(range(n), desc=f"benign {model}", disable=not progress, leave=False):
        labels[i], _, latency[i] = client.classify(x[i])
        if counters is not None:
            cached[i], prev = one_request(counters, model, prev)
    return {"labels": labels, "cached": cached, "latency": latency}


def run(lab, model: str, x: np.ndarray, y: np.ndarray, *, progress: bool = True,
        defended: str = "paper", undefended: str = "off") -> tuple[dict, dict]:
    """Stream ``x`` through both sidecars; returns (summary, per-image arrays)."""
    t0 = time.perf_counter()
    with lab.client(defended, model, f"benign-{model}-on-{time.time_ns()}") as p_on:
        on = stream(p_on, lab.counters(defended), x, model, progress)
    with lab.client(undefended, model, f"benign-{model}-off-{time.time_ns()}") as p_off:
        off = stream(p_off, lab.counters(undefended), x, model, progress)
    y = np.asarray(y)
    right_on = on["labels"] == y
    right_off = off["labels"] == y
    c = on["cached"]
    summary = {
        "model": model,
        "n_images": int(len(x)),
        "accuracy_without_defense": float(right_off.mean()),
        "accuracy_with_defense": float(right_on.mean()),
        "accuracy_drop": float(right_off.mean() - right_on.mean()),
        "cached_fraction": float(c.mean()),
        "cached_answers": int(c.sum()),
        "cached_wrong": int((c & ~right_on).sum()),
        "cached_wrong_model_right": int((c & ~right_on & right_off).sum()),
        "cached_right_model_wrong": int((c & right_on & ~right_off).sum()),
        "undefended_cached_answers": int(off["cached"].sum()),
        "answers_differ": int((on["labels"] != off["labels"]).sum()),
        "median_latency_ms_with_defense": float(np.median(on["latency"]) * 1e3),
        "median_latency_ms_without_defense": float(np.median(off["latency"]) * 1e3),
        "ground_truth": GROUND_TRUTH,
        "seconds": time.perf_counter() - t0,
    }
    per_image = {"label_with_defense": on["labels"], "label_without_defense": off["labels"],
                 "cached": c, "latency_with_defense_s": on["latency"], "latency_without_defense_s": off["latency"]}
    return summary, per_image


def per_image_frame(model: str, indices: Sequence[int], y: np.ndarray, per_image: dict):
    import pandas as pd

    df = pd.DataFrame({"model": model, "image_index": np.asarray(indices), "true_label": np.asarray(y)})
    for k, v in per_image.items():
        df[k] = v
    return df
