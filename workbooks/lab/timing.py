"""Timing side channel: can an attacker tell cached answers from forwarded ones?

In one session per padding setting the attacker alternates a fresh test image
(which the judgment forwards to the model) and a one-pixel change of it (which
it answers from the cache), each as a unary ``Classify``, and times every call
on the client. Whether an answer was really cached is read from the sidecar's
Prometheus counters after each call (outside the timed span), not assumed.

Per padding setting: latency summaries of both groups, a two-sample
Kolmogorov-Smirnov test (scipy.stats.ks_2samp) and the best accuracy a
single-threshold classifier "latency < t => cached" reaches (balanced), which
is what an attacker could exploit.
"""

from __future__ import annotations

import numpy as np

from .client import SidecarClient
from .counters import Counters, one_request

GROUND_TRUTH = "prometheus counters (per-request deltas of hashguard_cache_answers_total / hashguard_forwards_total)"


def probe_images(x: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` requests: alternately a fresh image and a 1-pixel change of it.

    Returns (images, expected_cached flags, source test indices)."""
    pairs = (n + 1) // 2
    idx = rng.choice(len(x), size=pairs, replace=pairs > len(x))
    images, expected, src = [], [], []
    for i in idx:
        img = x[i]
        near = img.copy()
        r, c = rng.integers(0, img.shape[0]), rng.integers(0, img.shape[1])
        near[r, c] = 255 - near[r, c]
        images += [img, near]
        expected += [False, True]
        src += [int(i), int(i)]
    return np.stack(images)[:n], np.asarray(expected)[:n], np.asarray(src)[:n]


def measure(client: SidecarClient, counters: Counters, model: str, images: np.ndarray,
            progress: bool = True, desc: str = "timing") -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    n = len(images)
    lat, cached, labels = np.empty(n), np.zeros(n, bool), np.empty(n, np.int64)
    prev = counters.snapshot(model)
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        labels[i], _, lat[i] = client.classify(images[i])
        cached[i], prev = one_request(counters, model, prev)
    return {"latency_s": lat, "cached": cached, "label": labels}


def best_threshold_accuracy(cached_lat: np.ndarray, forwarded_lat: np.ndarray) -> float:
    """Best balanced accuracy of "latency <= t => cached" (or the reverse) over all t."""
    if len(cached_lat) == 0 or len(forwarded_lat) == 0:
        return float("nan")
    ts = np.unique(np.concatenate([cached_lat, forwarded_lat]))
    c = np.sort(cached_lat)
    f = np.sort(forwarded_lat)
    tpr = np.searchsorted(c, ts, side="right") / len(c)  # cached called cached
    tnr = 1 - np.searchsorted(f, ts, side="right") / len(f)  # forwarded called forwarded
    bal = (tpr + tnr) / 2
    return float(max(bal.max(), (1 - bal).max()))


def analyse(lat: np.ndarray, cached: np.ndarray) -> dict:
    from scipy.stats import ks_2samp

    c, f = lat[cached], lat[~cached]
    out = {"n_cached": int(len(c)), "n_forwarded": int(len(f))}
    for name, v in (("cached", c), ("forwarded", f)):
        out[f"{name}_median_ms"] = float(np.median(v) * 1e3) if len(v) else float("nan")
        out[f"{name}_mean_ms"] = float(np.mean(v) * 1e3) if len(v) else float("nan")
        out[f"{name}_p90_ms"] = float(np.percentile(v, 90) * 1e3) if len(v) else float("nan")
    if len(c) and len(f):
        ks = ks_2samp(c, f)
        out["ks_statistic"] = float(ks.statistic)
        out["ks_pvalue"] = float(ks.pvalue)
    else:
        out["ks_statistic"] = out["ks_pvalue"] = float("nan")
    out["threshold_attack_accuracy"] = best_threshold_accuracy(c, f)
    return out


def histogram(df, path=None, title: str = "Client-side latency, cached vs forwarded"):
    """One panel per padding setting; ``df`` has columns padding, latency_s, cached."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    paddings = list(dict.fromkeys(df["padding"]))
    fig, axes = plt.subplots(1, len(paddings), figsize=(4.2 * len(paddings), 3.2), squeeze=False)
    for ax, pad in zip(axes[0], paddings):
        d = df[df["padding"] == pad]
        ms = d["latency_s"].to_numpy() * 1e3
        hi = np.percentile(ms, 99) if len(ms) else 1
        bins = np.linspace(0, max(hi, 1e-3) * 1.05, 40)
        ax.hist(ms[d["cached"].to_numpy()], bins=bins, alpha=0.6, label="cached", color="#cc3311")
        ax.hist(ms[~d["cached"].to_numpy()], bins=bins, alpha=0.6, label="forwarded", color="#4477aa")
        ax.set_title(f"padding {pad}")
        ax.set_xlabel("latency (ms)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("requests")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
