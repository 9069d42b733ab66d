"""Turn wire images into validated numpy arrays, or raise InvalidInput/TooLarge.

Nothing here touches session state: validation happens before any judgment.
"""

from __future__ import annotations

import cv2
import numpy as np

from .api import classifier_pb2 as pb
from .errors import InvalidInput, TooLarge

MAX_SIDE = 4096


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


def decode_raw(raw: pb.RawImage, what: str) -> np.ndarray:
    h, w, c = raw.height, raw.width, raw.channels
    if h == 0 or w == 0:
        raise InvalidInput(f"{what}: image is empty (height={h}, width={w})")
    if c not in (1, 3):
        raise InvalidInput(f"{what}: channels must be 1 or 3, got {c}")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise TooLarge(f"{what}: {h}x{w} exceeds the {MAX_SIDE}-pixel side limit")
    dtype = np.float32 if raw.dtype == pb.DTYPE_FLOAT32 else np.uint8
    expected = h * w * c * np.dtype(dtype).itemsize
    if len(raw.pixels) != expected:
        raise InvalidInput(
            f"{what}: {h}x{w}x{c} {np.dtype(dtype).name} needs {expected} bytes, got {len(raw.pixels)}"
        )
    arr = np.frombuffer(raw.pixels, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)
    return check_array(arr.reshape(h, w, c), what)


def decode_encoded(data: bytes, what: str) -> np.ndarray:
    if not data:
        raise InvalidInput(f"{what}: encoded image is empty")
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidInput(f"{what}: bytes are not a PNG or JPEG image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode(image: pb.Image, what: str = "image") -> np.ndarray:
    kind = image.WhichOneof("data")
    if kind == "raw":
        return decode_raw(image.raw, what)
    if kind == "encoded":
        return decode_encoded(image.encoded, what)
    raise InvalidInput(f"{what}: no image given (set raw or encoded)")


def encode_raw(image: np.ndarray) -> pb.Image:
    """Client helper: an HWC uint8/float32 array as a RawImage message."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    dtype = pb.DTYPE_FLOAT32 if arr.dtype == np.float32 else pb.DTYPE_UINT8
    arr = arr.astype("<f4" if dtype == pb.DTYPE_FLOAT32 else np.uint8, copy=False)
    h, w, c = arr.shape
    return pb.Image(raw=pb.RawImage(pixels=arr.tobytes(), height=h, width=w, channels=c, dtype=dtype))


def fit_signature(images: list[np.ndarray], shape: tuple[int | None, ...], what: str = "image") -> np.ndarray:
    """Stack images as the model's float32 input batch; shapes must match the signature exactly."""
    want = tuple(shape)
    for i, img in enumerate(images):
        got = img.shape
        if len(want) != len(got) or any(w not in (None, -1) and w != g for w, g in zip(want, got)):
            raise InvalidInput(
                f"{what} {i}: the model expects images of shape {[w if w and w > 0 else None for w in want]}, got {list(got)}"
            )
    return np.stack([img.astype(np.float32, copy=False) for img in images])
