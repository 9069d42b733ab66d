"""The one input type of the data plane: a call's images, as each transport received them.

A transport hands the data plane an ``Images``: it says how many images it holds before
anything is expanded (``count``) and turns them into validated HWC arrays once the
model's signature is known (``arrays``). Implementations:

- ``Arrays``: images already decoded to numpy (REST nested lists, in-process callers);
- ``TensorBatch``: a tensor whose declared shape is checked before its content is
  expanded (``sidecar.transport.grpc_prediction.ProtoTensor`` is such a tensor);
- ``sidecar.wire.messages.WireImages``: hashguard's ``Image`` messages and PNG/JPEG bytes,
  checked from their headers and decoded off the event loop.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np

from ..backend.base import Signature
from ..errors import InvalidInput
from ..wire.images import MAX_SIDE, check_array


class Images(Protocol):
    #: ``arrays`` checked every image against the signature's shape already
    checked: bool

    def count(self) -> int | None:
        """Images declared (None: not a batch of images at all; ``arrays`` says why)."""

    async def arrays(self, sig: Signature, max_pixels: int) -> list[np.ndarray]:
        """Validated HWC uint8/float32 images (InvalidInput/TooLarge otherwise)."""


class Tensor(Protocol):
    """A batch whose declared shape is known before its content is expanded."""

    shape: tuple[int, ...]

    def array(self, max_elements: int) -> np.ndarray: ...


def _batch(arr: np.ndarray, sig: Signature) -> list[np.ndarray]:
    if arr.dtype not in (np.uint8, np.float32):
        raise InvalidInput(f"input {sig.input_name!r} must be uint8 or float32, got {arr.dtype}")
    return [check_array(img, f"image {i}") for i, img in enumerate(arr)]


def _check_shape(shape: tuple[int, ...], sig: Signature) -> None:
    if len(shape) != 4:
        raise InvalidInput(f"input {sig.input_name!r} must be a batch of images [n, h, w, c], got shape {list(shape)}")
    want = sig.input_shape
    for got, w in zip(shape[1:], want):
        if got < 0 or (w is not None and got != w) or got > MAX_SIDE:
            raise InvalidInput(f"input {sig.input_name!r}: the model expects images of shape "
                               f"{list(want)}, got {list(shape[1:])}")


class Arrays:
    """Decoded images: a sequence of HWC arrays, or one [n, h, w, c] batch."""

    checked = False

    def __init__(self, images: Sequence[np.ndarray] | np.ndarray) -> None:
        self.images = images

    def count(self) -> int | None:
        if isinstance(self.images, np.ndarray):
            return self.images.shape[0] if self.images.ndim == 4 else None
        return len(self.images)

    async def arrays(self, sig: Signature, max_pixels: int) -> list[np.ndarray]:
        if isinstance(self.images, np.ndarray):
            _check_shape(tuple(int(d) for d in self.images.shape), sig)
            return _batch(self.images, sig)
        return [check_array(img, f"image {i}") for i, img in enumerate(self.images)]


class TensorBatch:
    """A tensor of images, expanded only after its declared shape fits the signature."""

    checked = False

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def count(self) -> int | None:
        shape = self.tensor.shape
        return shape[0] if len(shape) == 4 else None

    async def arrays(self, sig: Signature, max_pixels: int) -> list[np.ndarray]:
        shape = tuple(int(d) for d in self.tensor.shape)
        _check_shape(shape, sig)
        return _batch(self.tensor.array(math.prod(shape)), sig)
