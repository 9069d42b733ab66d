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

``phash_batch`` computes the hash of a whole batch with array operations: the
2x2 area mean (the same float32 sum and 0.25 as cv2's INTER_AREA for 32->16),
a grayscale dot product and the separable 2-D DCT as two 16x16 matrix products.
It is what ``phash`` uses; ``phash_cv2`` is the reference (cv2.resize,
cv2.cvtColor, cv2.dct). Float caveat: cv2's grayscale differs from the dot
product by up to 3e-5 (its SIMD rounding) and cv2.dct is a fast transform, so
a coefficient within ~1e-4 of the mean could fall on the other side; the bits
were equal on all 846 CIFAR-10 test images and 2000 random images
(tests/test_lowpass.py asserts it).
"""

from __future__ import annotations

import numpy as np

from .lowpass import area16, dct_matrix
from ..lazy import lazy

cv2 = lazy("cv2", globals())  # OpenCV loads with the first image (sidecar/lazy.py)

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


def phash_cv2(image: np.ndarray) -> bytes:
    """The reference implementation: cv2 resize, cvtColor and dct."""
    coeffs = cv2.dct(grayscale_16(image))
    bits = coeffs > coeffs.mean()
    return np.packbits(bits.reshape(-1)).tobytes()


GRAY = np.array([0.299, 0.587, 0.114], np.float32)
DCT = dct_matrix(HASH_SIDE).astype(np.float32)
DCT_T = np.ascontiguousarray(DCT.T)
DCT2 = np.kron(dct_matrix(HASH_SIDE), dct_matrix(HASH_SIDE)).T.astype(np.float32)  # vec(C G C^T) = vec(G) @ kron(C, C)^T


def gray16(area: np.ndarray) -> np.ndarray:
    """(N, 16, 16) grayscale of (N, 16, 16, C) area means."""
    c = area.shape[-1]
    if c == 3:
        return area @ GRAY
    if c == 1:
        return area[..., 0]
    raise ValueError(f"expected 1 or 3 channels, got {c}")


def phash_batch(images, area: np.ndarray | None = None) -> np.ndarray:
    """(N, 32) uint8: the packed 256-bit hash of every image of a batch."""
    a = area16(images) if area is None else area
    coeffs = (DCT @ gray16(a) @ DCT_T).reshape(len(a), HASH_BITS)  # separable 2-D DCT: C G C^T
    bits = coeffs > coeffs.mean(axis=1, keepdims=True)
    return np.packbits(bits, axis=1)


def phash(image: np.ndarray) -> bytes:
    img = np.asarray(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {img.shape}")
    return phash_batch(img[None]).tobytes()


def hamming(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).bit_count()


def pixel_diff(a: np.ndarray, b: np.ndarray, tolerance: float = 0) -> int:
    """Pixel positions where any channel differs by more than ``tolerance``.

    Images of different shapes share no pixel: every position counts.
    """
    if a.shape != b.shape:
        return max(a.shape[0] * a.shape[1], b.shape[0] * b.shape[1])
    return int(pixel_diffs(a, b, tolerance, image_ndim=a.ndim))


def pixel_diffs(a: np.ndarray, b: np.ndarray, tolerance: float = 0, image_ndim: int = 3) -> np.ndarray:
    """``pixel_diff`` over broadcast stacks of same-shaped images: ``a`` and ``b`` are
    [..., H, W, C] (``image_ndim=3``) or [..., H, W] (2); the counts are [...]. One
    anchor against a batch, or K anchors against one query, in a few array
    operations (or-ing the channel planes is ~6x faster than ``any(axis=-1)``)."""
    if a.dtype == np.uint8 and b.dtype == np.uint8 and tolerance == 0:
        diff = a != b
    else:
        diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)) > tolerance
    lead = diff.shape[:diff.ndim - image_ndim]
    if image_ndim == 3:  # [..., pixels, channels] as bytes: or-ing columns is the fast "any channel"
        diff = diff.view(np.uint8).reshape(*lead, -1, diff.shape[-1])
        planes = diff[..., 0]
        for c in range(1, diff.shape[-1]):
            planes = planes | diff[..., c]
        diff = planes
    # count_nonzero with an axis takes a slow path: one image is counted without one
    return np.count_nonzero(diff.reshape(*lead, -1), axis=-1) if lead else np.asarray(np.count_nonzero(diff))
