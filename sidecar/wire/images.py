"""Turn wire images into validated numpy arrays, or raise InvalidInput/TooLarge.

Nothing here touches session state: validation happens before any judgment.

Encoded images (PNG, JPEG; nothing else) are checked from their HEADER before a
single pixel is decoded (``sidecar.wire.imageheader``): the declared height and width
must fit the model's per-image shape (``expect``) and the pixel limit
(``max_pixels``), and the declared colour layout must be one we convert (gray,
RGB, palette, with or without alpha; JPEG with 1, 3 or 4 components). Only then
are they decoded, to RGB (or one gray channel when the model takes one), and
``decode_async`` does that in a small thread pool (``DECODE_THREADS``), so a
large image never stalls the event loop and at most that many decoded images
exist at once. A decompression bomb (a small file declaring a huge image) is
refused from its header, having allocated nothing; one that declares a small
image but carries more data than that size (a PNG whose IDAT inflates to a
gigabyte) is refused by ``imageheader.check_work`` in the decode thread before
the decoder runs, having inflated no more than the declared size.

Nothing here knows a wire message: ``sidecar.wire.messages`` turns hashguard's
``Image`` messages into these calls, so the data plane can use this module.

Error paths raise ``... from None`` and drop their buffers first, so a refused
request leaves no traceback holding pixel memory.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ..errors import InvalidInput, TooLarge
from .imageheader import Header, check_work, read_header
from ..lazy import lazy

cv2 = lazy("cv2", globals())  # OpenCV loads with the first image (sidecar/lazy.py)

MAX_SIDE = 4096
MAX_PIXELS = 1 << 24  # default pixel limit of one image (--max-image-pixels): 16.7M, 4096x4096
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))

Shape = Sequence[int | None]  # per image (h, w, c); None or -1 = any

_pool: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="hashguard-decode")
    return _pool


def _check_pixels(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.float32:
        if not np.isfinite(arr).all():
            raise InvalidInput(f"{what}: float32 pixels must be finite (found NaN or inf)")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 255.0:
            raise InvalidInput(f"{what}: float32 pixels must lie in 0..255, got {lo:g}..{hi:g}")
    elif arr.dtype != np.uint8:
        raise InvalidInput(f"{what}: pixels must be uint8 or float32, got {arr.dtype}")
    return arr


def check_array(arr: np.ndarray, what: str = "image") -> np.ndarray:
    """An HxWxC (C = 1 or 3) image array of uint8 or finite float32 in 0..255."""
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise InvalidInput(f"{what}: expected shape [height, width, 1|3], got {list(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInput(f"{what}: image is empty (shape {list(arr.shape)})")
    return _check_pixels(arr, what)


def _fixed(dim: int | None) -> int | None:
    return dim if dim is not None and dim > 0 else None


def check_declared(h: int, w: int, c: int, what: str, expect: Shape | None = None,
                   max_pixels: int = MAX_PIXELS) -> None:
    """A declared image size, before anything is allocated for it. A size that cannot be
    the model's input is INVALID_ARGUMENT; one over the pixel limit RESOURCE_EXHAUSTED."""
    if h <= 0 or w <= 0:
        raise InvalidInput(f"{what}: image is empty (height={h}, width={w})")
    if c not in (1, 3):
        raise InvalidInput(f"{what}: channels must be 1 or 3, got {c}")
    if expect is not None:
        want = [_fixed(d) for d in expect]
        if len(want) != 3 or any(x is not None and x != g for x, g in zip(want, (h, w, c))):
            raise InvalidInput(f"{what}: the model expects images of shape {want}, got {[h, w, c]}")
    if h * w > max_pixels:
        raise TooLarge(f"{what}: {h}x{w} is {h * w} pixels; the limit is {max_pixels}")


def out_channels(expect: Shape | None) -> int:
    """Channels an encoded image is decoded to: the model's, else RGB."""
    if expect is not None and len(expect) == 3 and _fixed(expect[2]) == 1:
        return 1
    return 3


def check_encoded(data: bytes, what: str, expect: Shape | None = None, max_pixels: int = MAX_PIXELS) -> Header:
    """Read and check an encoded image's header; nothing is decoded."""
    if not data:
        raise InvalidInput(f"{what}: encoded image is empty")
    try:
        header = read_header(data)
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    check_declared(header.height, header.width, out_channels(expect), what, expect, max_pixels)
    return header


def imdecode(data: bytes, header: Header, what: str, channels: int) -> np.ndarray:
    flags = (cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        check_work(data, header)  # no more decoding work than the declared size
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    try:
        out = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error:
        out = None
    if out is None:
        raise InvalidInput(f"{what}: cannot decode the {header.format} image (truncated or corrupt)")
    if out.ndim == 2:
        out = out[:, :, None]
    else:
        cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=out)
    if out.shape[:2] != (header.height, header.width) or out.dtype != np.uint8:
        got = list(out.shape)
        del out
        raise InvalidInput(f"{what}: decoded {got}, but the header declared {header.height}x{header.width}")
    return out


def decode_encoded(data: bytes, what: str, expect: Shape | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    header = check_encoded(data, what, expect, max_pixels)
    return imdecode(data, header, what, out_channels(expect))


def fit_signature(images: list[np.ndarray], shape: tuple[int | None, ...], what: str = "image") -> np.ndarray:
    """Stack images as the model's float32 input batch; shapes must match the signature exactly."""
    want = tuple(shape)
    for i, img in enumerate(images):
        got = img.shape
        if len(want) != len(got) or any(w not in (None, -1) and w != g for w, g in zip(want, got)):
            raise InvalidInput(
                f"{what} {i}: the model expects images of shape {[w if w and w > 0 else None for w in want]}, got {list(got)}"
            ) from None
    return np.stack([img.astype(np.float32, copy=False) for img in images])
