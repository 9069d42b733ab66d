"""hashguard's ``Image`` messages (raw pixels or PNG/JPEG bytes) <-> numpy, with the
checks of ``sidecar.wire.images``: declared sizes first, decoding off the event loop.

``WireImages`` is how the gRPC and REST transports hand encoded or raw images to the
data plane (it implements ``sidecar.plane.images.Images``); ``encode_raw`` and
``encode_png`` are client helpers.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np

from ..api import classifier_pb2 as pb
from ..backend.base import Signature
from ..errors import InvalidInput, TooLarge
from ..lazy import lazy
from .images import (
    MAX_PIXELS,
    MAX_SIDE,
    Shape,
    check_array,
    check_declared,
    check_encoded,
    decode_encoded,
    executor,
    imdecode,
    out_channels,
)

cv2 = lazy("cv2", globals())  # OpenCV loads with the first image (sidecar/lazy.py)


def decode_raw(raw: pb.RawImage, what: str, expect: Shape | None = None,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    h, w, c = raw.height, raw.width, raw.channels
    check_declared(h, w, c, what, expect, max_pixels)
    if h > MAX_SIDE or w > MAX_SIDE:
        raise TooLarge(f"{what}: {h}x{w} exceeds the {MAX_SIDE}-pixel side limit")
    if raw.dtype not in (pb.DTYPE_UINT8, pb.DTYPE_FLOAT32):
        raise InvalidInput(f"{what}: unknown pixel dtype {raw.dtype} (use DTYPE_UINT8 or DTYPE_FLOAT32)")
    dtype = np.dtype(np.float32) if raw.dtype == pb.DTYPE_FLOAT32 else np.dtype(np.uint8)
    expected = h * w * c * dtype.itemsize
    if len(raw.pixels) != expected:
        raise InvalidInput(f"{what}: {h}x{w}x{c} {dtype.name} needs {expected} bytes, got {len(raw.pixels)}")
    arr = np.frombuffer(raw.pixels, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    return check_array(arr.reshape(h, w, c), what)


def _check_kind(image: pb.Image, what: str) -> str:
    kind = image.WhichOneof("data")
    if kind not in ("raw", "encoded"):
        raise InvalidInput(f"{what}: no image given (set raw or encoded)")
    return kind


def decode(image: pb.Image, what: str = "image", expect: Shape | None = None,
           max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Synchronous decode (tests, tools). Servers use ``decode_async``."""
    if _check_kind(image, what) == "raw":
        return decode_raw(image.raw, what, expect, max_pixels)
    return decode_encoded(image.encoded, what, expect, max_pixels)


async def decode_async(image: pb.Image, what: str = "image", expect: Shape | None = None,
                       max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one wire image without blocking the event loop.

    Raw pixels and every header check run inline (cheap, bounded by the message
    size); only the PNG/JPEG decode of an image that passed its header check goes
    to the decode thread pool (``DECODE_THREADS`` threads)."""
    if _check_kind(image, what) == "raw":
        return decode_raw(image.raw, what, expect, max_pixels)
    data = image.encoded
    header = check_encoded(data, what, expect, max_pixels)
    return await asyncio.get_running_loop().run_in_executor(executor(), imdecode, data, header, what,
                                                            out_channels(expect))


async def decode_batch_async(images: Sequence[pb.Image], expect: Shape | None = None,
                             max_pixels: int = MAX_PIXELS, what: str = "image") -> list[np.ndarray]:
    """Every image's header is checked before any is decoded, so one bomb in a batch
    costs nothing; then they are decoded in order (the first error wins)."""
    for i, img in enumerate(images):
        if _check_kind(img, f"{what} {i}") == "encoded":
            check_encoded(img.encoded, f"{what} {i}", expect, max_pixels)
    return [await decode_async(img, f"{what} {i}", expect, max_pixels) for i, img in enumerate(images)]


class WireImages:
    """Images as a transport received them (``pb.Image`` messages, or encoded bytes),
    decoded only once the model's per-image shape is known, so a declared size that
    cannot be the model's input is refused from the header. The data plane calls
    ``await images.decode(signature.input_shape, max_pixels)``."""

    def __init__(self, items: Sequence[pb.Image | bytes], single: bool = False) -> None:
        self.items = [pb.Image(encoded=x) if isinstance(x, (bytes, bytearray)) else x for x in items]
        self.single = single  # one image: errors say "image", not "image 0"

    checked = True  # arrays() checks every image against the signature's shape

    def __len__(self) -> int:
        return len(self.items)

    def count(self) -> int | None:
        return len(self.items)

    async def arrays(self, sig: Signature, max_pixels: int) -> list[np.ndarray]:
        return await self.decode(sig.input_shape, max_pixels)

    async def decode(self, expect: Shape | None = None, max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
        if self.single and len(self.items) == 1:
            return [await decode_async(self.items[0], "image", expect, max_pixels)]
        return await decode_batch_async(self.items, expect, max_pixels)


def encode_raw(image: np.ndarray) -> pb.Image:
    """Client helper: an HWC uint8/float32 array as a RawImage message."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    dtype = pb.DTYPE_FLOAT32 if arr.dtype == np.float32 else pb.DTYPE_UINT8
    arr = arr.astype("<f4" if dtype == pb.DTYPE_FLOAT32 else np.uint8, copy=False)
    h, w, c = arr.shape
    return pb.Image(raw=pb.RawImage(pixels=arr.tobytes(), height=h, width=w, channels=c, dtype=dtype))


def encode_png(image: np.ndarray) -> pb.Image:
    """Client helper: an HWC uint8 RGB (or 1-channel) array as a PNG-encoded Image message."""
    arr = np.asarray(image, dtype=np.uint8)
    bgr = arr if arr.ndim == 2 or arr.shape[2] == 1 else cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return pb.Image(encoded=buf.tobytes())
