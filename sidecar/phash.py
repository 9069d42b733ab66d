"""The paper's similarity measures, as pure functions over numpy images.

- ``phash``: 256-bit DCT perceptual hash. The image is resized to 16x16 with
  area interpolation, converted to grayscale, transformed with a 2-D DCT, and
  each of the 16x16 = 256 lowest-frequency coefficients becomes one bit: 1 where
  it is greater than their mean, else 0. Returned packed as 32 bytes.
- ``hamming``: number of differing bits of two hashes (N_hash).
- ``pixel_diff``: number of pixel positions, at the image's own resolution
  (32x32 = 1024 for CIFAR-10), where any channel differs by more than
  ``tolerance`` (N_pixel).

Images are HWC (or HW) arrays of uint8 or float32 on the 0-255 scale.
"""

from __future__ import annotations

import cv2
import numpy as np

HASH_SIDE = 16
HASH_BITS = HASH_SIDE * HASH_SIDE
HASH_BYTES = HASH_BITS // 8


def grayscale_16(image: np.ndarray) -> np.ndarray:
    """Resize to 16x16 (area interpolation), then grayscale; float32."""
    img = np.asarray(image, dtype=np.float32)
    small = cv2.resize(img, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    if small.ndim == 3 and small.shape[2] == 3:
        return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    if small.ndim == 3 and small.shape[2] == 1:
        return small[:, :, 0]
    if small.ndim == 2:
        return small
    raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {image.shape}")


def phash(image: np.ndarray) -> bytes:
    coeffs = cv2.dct(grayscale_16(image))
    bits = coeffs > coeffs.mean()
    return np.packbits(bits.reshape(-1)).tobytes()


def hamming(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).bit_count()


def pixel_diff(a: np.ndarray, b: np.ndarray, tolerance: float = 0) -> int:
    """Pixel positions where any channel differs by more than ``tolerance``.

    Images of different shapes share no pixel: every position counts.
    """
    if a.shape != b.shape:
        return max(a.shape[0] * a.shape[1], b.shape[0] * b.shape[1])
    if a.dtype == np.uint8 and b.dtype == np.uint8 and tolerance == 0:
        diff = a != b
    else:
        diff = np.abs(a.astype(np.float32) - b.astype(np.float32)) > tolerance
    if diff.ndim == 3:
        diff = diff.any(axis=2)
    return int(np.count_nonzero(diff))
