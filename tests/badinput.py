"""Hostile and careless inputs, as bytes: image bombs, malformed headers, truncated
files. Shared by the bad-input corpus and the image tests; pure functions."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ihdr(width: int, height: int, depth: int = 8, colour: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))


def zeros_zlib(n: int, block: int = 1 << 22) -> bytes:
    """A zlib stream of ``n`` zero bytes, built in milliseconds: one deflate block of
    ``block`` zeros, ended with a full flush, is byte-identical every time it is
    repeated (a full flush resets the compressor), and the Adler-32 of zeros is
    (1, n mod 65521)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(b"\x00" * block) + c.flush(zlib.Z_FULL_FLUSH)
    reps, rest = divmod(n, block)
    tail = c.compress(b"\x00" * rest) + c.flush(zlib.Z_FINISH)
    adler = (n % 65521) << 16 | 1
    return b"\x78\xda" + piece * reps + tail + struct.pack(">I", adler)


def png_bomb(width: int = 20000, height: int = 20000, rows: int | None = None, colour: int = 0) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels, all zero: gray (colour 0) by default,
    so the 20000x20000 bomb is about 380 KiB and decodes to 1.2 GB as RGB. With
    ``rows`` only that many rows of data are included (for sizes too large to fill)."""
    channels = {0: 1, 2: 3}[colour]
    n = (width * channels + 1) * (height if rows is None else rows)
    return PNG_SIGNATURE + ihdr(width, height, colour=colour) + chunk(b"IDAT", zeros_zlib(n)) + chunk(b"IEND", b"")


def png_idat_bomb(width: int, height: int, inflated: int) -> bytes:
    """A PNG declaring a small RGB image whose image data inflates to ``inflated`` zero bytes."""
    return PNG_SIGNATURE + ihdr(width, height) + chunk(b"IDAT", zeros_zlib(inflated)) + chunk(b"IEND", b"")


def png(image: np.ndarray) -> bytes:
    arr = np.asarray(image, np.uint8)
    ok, buf = cv2.imencode(".png", arr if arr.shape[-1] == 1 else arr[:, :, ::-1])
    assert ok
    return buf.tobytes()


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.asarray(image, np.uint8)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def sof_offset(data: bytes) -> int:
    """Offset of the first SOF marker's length field in a baseline JPEG."""
    i = data.index(b"\xff\xc0")
    return i + 2


def jpeg_declaring(data: bytes, height: int, width: int, components: int | None = None) -> bytes:
    """A real JPEG with its frame header patched to declare another size: a JPEG bomb
    when the size is large (libjpeg allocates for the declared size)."""
    b = bytearray(data)
    o = sof_offset(data)
    struct.pack_into(">HH", b, o + 3, height, width)
    if components is not None:
        b[o + 7] = components
    return bytes(b)


def jpeg_many_segments(data: bytes, n: int) -> bytes:
    """``n`` empty COM segments before the frame header: a header walk must stay bounded."""
    return data[:2] + b"\xff\xfe\x00\x02" * n + data[2:]


def jpeg_many_scans(data: bytes, n: int) -> bytes:
    """A JPEG with ``n`` start-of-scan markers before its frame header (in a comment
    segment): a decoder's work grows with the scans a JPEG has."""
    payload = b"\xff\xda" * n
    return data[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def gzip_bomb(inflated: int) -> bytes:
    """A gzip member of ``inflated`` zero bytes (1 GiB is about 1 MiB), built fast."""
    import zlib as _z

    c = _z.compressobj(9, _z.DEFLATED, 31)
    block = c.compress(b"\x00" * (1 << 22)) + c.flush(_z.Z_FULL_FLUSH)
    head = block[:10]  # the gzip header
    body = block[10:]
    reps, rest = divmod(inflated, 1 << 22)
    # every full-flushed block of zeros deflates to the same bytes; the trailer is CRC-32 and size
    crc = 0
    piece = b"\x00" * (1 << 22)
    for _ in range(reps):
        crc = _z.crc32(piece, crc)
    end = _z.compressobj(9, _z.DEFLATED, -15)
    tail = end.compress(b"\x00" * rest) + end.flush(_z.Z_FINISH)
    crc = _z.crc32(b"\x00" * rest, crc)
    return head + body * reps + tail + crc.to_bytes(4, "little") + (inflated & 0xFFFFFFFF).to_bytes(4, "little")


def bmp(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".bmp", np.asarray(image, np.uint8))
    assert ok
    return buf.tobytes()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
