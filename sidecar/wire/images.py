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

The data plane decodes through ``WireImages`` once the model's signature is
known: ``await WireImages(messages).decode(signature.input_shape, max_pixels)``.

Error paths raise ``... from None`` and drop their buffers first, so a refused
request leaves no traceback holding pixel memory.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ..api import classifier_pb2 as pb
from ..errors import InvalidInput, TooLarge
from .imageheader import Header, check_work, read_header
from ..lazy import lazy

cv2 = lazy("cv2", globals())  # OpenCV loads with the first image (sidecar/lazy.py)

MAX_SIDE = 4096
MAX_PIXELS = 1 << 24  # default pixel limit of one image (--max-image-pixels): 16.7M, 4096x4096
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))

Shape = Sequence[int | None]  # per image (h, w, c); None or -1 = any

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
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


def _imdecode(data: bytes, header: Header, what: str, channels: int) -> np.ndarray:
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
    return _imdecode(data, header, what, out_channels(expect))


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
    return await asyncio.get_running_loop().run_in_executor(_executor(), _imdecode, data, header, what,
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

    def __len__(self) -> int:
        return len(self.items)

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
