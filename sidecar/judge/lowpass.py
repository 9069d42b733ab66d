"""Hardened mode's continuous similarity measure: distance of low-pass images.

``lowpass`` area-averages an image to 16x16 (per channel) and returns the
16*16*C vector on the 0-1 scale; ``distance`` is the L2 distance of two such
vectors. Area averaging makes every output value a convex combination of
input pixels, so:

* a mask with L-inf norm ``eps`` (0-1 scale) moves every coordinate by at most
  ``eps``: the distance moves by at most ``eps * 16 * sqrt(C)``
  (``mask_bound``), whatever the mask does to hash bits or pixel counts;
* one changed pixel of a 32x32 image moves one 2x2 block mean by at most 1/4
  per channel: at most ``sqrt(C) / (32/16)**2`` (``pixel_bound``).

Nothing here is secret: the bound is what makes the measure safe to publish.
``projection`` gives an orthonormal set of low-frequency DCT directions
(colour-opponent, lowest frequencies first) for the cross-session candidate
search; an orthonormal projection never increases a distance, so a radius
search in the projected space loses no true neighbour.

Pure and vectorised over a batch: ``images`` is an (N, H, W[, C]) array or a
sequence of same-shaped HWC/HW arrays, uint8 or float32 on the 0-255 scale.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from ..lazy import lazy

cv2 = lazy("cv2", globals())  # OpenCV loads with the first image (sidecar/lazy.py)

SIDE = 16
PROJECTED_DIMS = 64


def as_batch(images) -> np.ndarray:
    batch = images if isinstance(images, np.ndarray) else np.stack([np.asarray(i) for i in images])
    if batch.ndim == 3:  # a batch of HW images
        batch = batch[..., None]
    if batch.ndim != 4:
        raise ValueError(f"expected a batch of HxW or HxWxC images, got shape {batch.shape}")
    return batch


def area16(images) -> np.ndarray:
    """(N, 16, 16, C) float32 area means on the 0-255 scale (cv2 INTER_AREA)."""
    batch = as_batch(images)
    n, h, w, c = batch.shape
    if h % SIDE == 0 and w % SIDE == 0:
        bh, bw = h // SIDE, w // SIDE
        f = batch.astype(np.float32, copy=False)
        if (bh, bw) == (2, 2) and c <= 4:  # cv2's resizeAreaFast over the batch stacked as one tall image:
            # an output row averages two input rows of the same image (32 rows each), so this is
            # each image's own cv2.resize, bit for bit (tests/test_lowpass.py)
            tall = cv2.resize(f.reshape(n * h, w, c), (SIDE, n * SIDE), interpolation=cv2.INTER_AREA)
            return tall.reshape(n, SIDE, SIDE, c)
        return f.reshape(n, SIDE, bh, SIDE, bw, c).mean(axis=(2, 4), dtype=np.float32)
    out = np.empty((n, SIDE, SIDE, c), np.float32)
    for i in range(n):
        small = cv2.resize(batch[i].astype(np.float32), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        out[i] = small.reshape(SIDE, SIDE, c)
    return out


def lowpass(images, area: np.ndarray | None = None) -> np.ndarray:
    """(N, 16*16*C) float32 low-pass vectors on the 0-1 scale."""
    a = area16(images) if area is None else area
    return (a.reshape(len(a), -1) * np.float32(1 / 255)).astype(np.float32, copy=False)


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """L2 distance of low-pass vectors (broadcasts over leading axes)."""
    if a.shape[-1] != b.shape[-1]:
        return float("inf")  # different shapes or channel counts share nothing
    d = np.asarray(a, np.float32) - np.asarray(b, np.float32)
    return np.sqrt(np.einsum("...i,...i->...", d, d))


def mask_bound(eps: float, channels: int = 3, side: int = SIDE) -> float:
    """Largest distance a mask with L-inf ``eps`` (0-1 scale) can cause."""
    return float(eps * side * np.sqrt(channels))


def pixel_bound(k: int = 1, image_side: int = 32, channels: int = 3, side: int = SIDE) -> float:
    """Largest distance ``k`` changed pixels of an ``image_side`` image can cause."""
    return float(k * np.sqrt(channels) / (image_side / side) ** 2)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (rows are basis vectors), as cv2.dct uses."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


@lru_cache(maxsize=8)
def projection(channels: int = 3, dims: int = PROJECTED_DIMS) -> np.ndarray:
    """(dims, 256*channels) float32 with orthonormal rows: the lowest-frequency
    2-D DCT directions of a colour-opponent transform of the low-pass image."""
    c1 = dct_matrix(SIDE)
    basis2d = np.einsum("ui,vj->uvij", c1, c1).reshape(SIDE, SIDE, SIDE * SIDE)
    if channels == 3:
        colour = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], np.float64)
        colour /= np.linalg.norm(colour, axis=1, keepdims=True)
    else:
        colour = np.eye(channels)
    rows = []
    for u in range(SIDE):
        for v in range(SIDE):
            for ch in range(channels):
                # luminance first, then colour, at each frequency band
                rows.append((u + v + 2 * (ch > 0) * (u + v + 1), ch, u, v))
    rows.sort()
    out = []
    for _, ch, u, v in rows[:dims]:
        # vector over (y, x, channel) in the lowpass layout
        out.append(np.einsum("p,c->pc", basis2d[u, v], colour[ch]).reshape(-1))
    return np.asarray(out, np.float32)


def project(vectors: np.ndarray, dims: int = PROJECTED_DIMS) -> np.ndarray:
    channels = vectors.shape[-1] // (SIDE * SIDE)
    return np.ascontiguousarray(vectors @ projection(channels, dims).T, dtype=np.float32)


#: Coarser scales of the same vector, checked beside it in a session's own
#: anchors: (block side in 16x16 cells, threshold). Small shifts and noise, the
#: transforms an OARS-style attacker resamples with, barely move 8x8 and 4x4
#: means (1-px shift: median 0.56 at 8x8, 0.15 at 4x4), while distinct test
#: images stay apart (nearest neighbour 0.5% quantile 1.03 at 8x8, 0.36 at 4x4).
COARSE = ((2, 0.9), (4, 0.3))


def coarse_distances(diff: np.ndarray, channels: int = 3) -> list[np.ndarray]:
    """L2 norms of the block means of low-pass differences ``diff`` (k, 16*16*C),
    one array (k,) per scale of ``COARSE``. Block means are linear, so the norm of
    the difference's means is the distance of the images' coarser means."""
    k = diff.shape[0]
    grid = diff.reshape(k, SIDE, SIDE, channels)
    out = []
    for block, _ in COARSE:
        n = SIDE // block
        means = grid.reshape(k, n, block, n, block, channels).mean(axis=(2, 4))
        out.append(np.sqrt(np.einsum("ki,ki->k", means.reshape(k, -1), means.reshape(k, -1))))
    return out


def coarse_similar(diff: np.ndarray) -> np.ndarray:
    """(k,) bool: similar at any coarse scale. Vectors that are not a 16x16 grid of
    channels (another image layout) are never similar here."""
    hit = np.zeros(diff.shape[0], bool)
    if diff.shape[1] % (SIDE * SIDE):
        return hit
    for (_, tau), d in zip(COARSE, coarse_distances(diff, diff.shape[1] // (SIDE * SIDE))):
        hit |= d <= tau
    return hit
