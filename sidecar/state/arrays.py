"""The one binary codec of numpy arrays that the state stores write to Redis.

An array is: u8 tag length, ``dtype.str`` (ASCII), u8 rank, rank x u32 dims, raw bytes.
Only plain numeric dtypes are accepted, in both directions, and every length is
checked before anything is allocated, so a corrupt or hostile value costs nothing.
"""

from __future__ import annotations

import struct

import numpy as np

ALLOWED_KINDS = frozenset("biuf")
MAX_NDIM = 8


def pack_array(out: list[bytes], arr: np.ndarray) -> None:
    """Append ``arr``'s encoding to ``out``; TypeError for what cannot be stored."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(arr).__name__}")
    dt = arr.dtype
    if dt.kind not in ALLOWED_KINDS or dt.hasobject or dt.fields is not None or arr.ndim > MAX_NDIM:
        raise TypeError(f"cannot store an array of dtype {dt} and rank {arr.ndim}")
    tag = dt.str.encode("ascii")
    out.append(struct.pack("<B", len(tag)) + tag + struct.pack(f"<B{arr.ndim}I", arr.ndim, *arr.shape))
    out.append(np.ascontiguousarray(arr).tobytes())


class ArrayReader:
    """Reads what ``pack_array`` (and plain ``struct`` fields) wrote; raises ``error``
    (a ValueError subclass) on anything inconsistent."""

    def __init__(self, data: bytes | bytearray | memoryview, error: type[ValueError] = ValueError) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.error = error

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error("truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def array(self, copy: bool = True) -> np.ndarray:
        """The next array: its own aligned memory (``copy``), or a read-only view of the data."""
        (tag_len,) = self.unpack("<B")
        try:
            tag = bytes(self.take(tag_len)).decode("ascii")
            dt = np.dtype(tag)
        except (UnicodeDecodeError, TypeError, ValueError) as exc:
            raise self.error(f"bad dtype: {exc}") from None
        if dt.kind not in ALLOWED_KINDS or dt.hasobject or dt.fields is not None or dt.str != tag:
            raise self.error(f"dtype {tag!r} not allowed")
        (ndim,) = self.unpack("<B")
        if ndim > MAX_NDIM:
            raise self.error(f"rank {ndim}")
        shape = self.unpack(f"<{ndim}I")
        nbytes = dt.itemsize
        for d in shape:
            nbytes *= d
        raw = self.take(nbytes)  # checks the length before anything is allocated
        arr = np.frombuffer(raw, dtype=dt).reshape(shape)
        if copy:
            return arr.copy()
        arr.setflags(write=False)
        return arr

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.error(f"{len(self.data) - self.pos} trailing bytes")
