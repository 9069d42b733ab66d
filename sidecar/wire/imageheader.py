"""What a PNG or JPEG declares about itself, read from its header without decoding.

Pure functions over bytes. ``read_header`` raises ``ValueError`` with a message
fit for a client when the bytes are not a PNG or JPEG or their header is
malformed. The walk over JPEG segments is bounded (``MAX_JPEG_SEGMENTS``), so a
file made of many tiny segments costs no more than a real one.

PNG: the signature and the IHDR chunk, which the format requires first
(width, height, bit depth, colour type). JPEG: segments from SOI up to the
first frame header (SOF0..SOF15 except DHT/JPG/DAC), which holds the height,
width and number of components; the decoder (libjpeg) uses that first frame
header and refuses a second one.

``check_work`` bounds what decoding may cost beyond the declared size: a PNG's
image data is inflated (zlib, ``max_length``) only up to the bytes its header
declares (rows x (1 + row bytes), per Adam7 pass when interlaced) and refused
as soon as it would inflate further; its chunks are counted
(``MAX_PNG_CHUNKS``). A JPEG's scans are counted (``MAX_JPEG_SCANS``): each
scan of a progressive JPEG costs a pass over the declared image. A 32x32 PNG
whose IDAT inflates to 1 GiB of zeros is refused after inflating 3 KiB.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_SIDE = (1 << 31) - 1
MAX_JPEG_SEGMENTS = 256
MAX_PNG_CHUNKS = 1 << 14  # encoders write IDAT in 8-64 KiB chunks: 16 MiB is 256-2048 of them
MAX_JPEG_SCANS = 100  # progressive JPEGs have about 10; libjpeg-turbo's djpeg suggests -maxscans 100
_INFLATE_STEP = 1 << 20
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel as stored (palette: one index)

# PNG colour type -> (allowed bit depths, channels)
_PNG_COLOUR = {
    0: ((1, 2, 4, 8, 16), 1),  # gray
    2: ((8, 16), 3),  # RGB
    3: ((1, 2, 4, 8), 3),  # palette
    4: ((8, 16), 2),  # gray + alpha
    6: ((8, 16), 4),  # RGBA
}
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}


@dataclass(frozen=True)
class Header:
    format: str  # "PNG" or "JPEG"
    height: int
    width: int
    channels: int  # as stored: PNG 1-4 (palette counts as 3), JPEG components 1, 3 or 4
    bit_depth: int
    colour: int = -1  # PNG colour type
    interlace: int = 0  # PNG: 1 = Adam7


def read_header(data: bytes) -> Header:
    if data[:8] == PNG_SIGNATURE:
        return png_header(data)
    if data[:2] == b"\xff\xd8":
        return jpeg_header(data)
    raise ValueError("bytes are not a PNG or JPEG image")


def png_header(data: bytes) -> Header:
    if len(data) < 33:
        raise ValueError("PNG is truncated before the end of its IHDR chunk")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError("PNG does not start with a valid IHDR chunk")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if not (0 < width <= MAX_PNG_SIDE and 0 < height <= MAX_PNG_SIDE):
        raise ValueError(f"PNG declares an invalid size {width}x{height}")
    if colour not in _PNG_COLOUR or depth not in _PNG_COLOUR[colour][0]:
        raise ValueError(f"PNG declares an invalid colour type {colour} / bit depth {depth}")
    if compression or filtering or interlace > 1:
        raise ValueError("PNG declares an unknown compression, filter or interlace method")
    return Header("PNG", height, width, _PNG_COLOUR[colour][1], depth, colour, interlace)


def jpeg_header(data: bytes) -> Header:
    pos, n = 2, len(data)
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos >= n or data[pos] != 0xFF:
            raise ValueError("JPEG is truncated or malformed before its frame header")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            raise ValueError("JPEG has no frame header before its image data")
        if pos + 2 > n:
            break
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            raise ValueError("JPEG has a segment of invalid length")
        if marker in _SOF:
            if length < 8 or pos + 8 > n:
                break
            depth, height, width, components = struct.unpack(">BHHB", data[pos + 2:pos + 8])
            if height == 0 or width == 0:
                raise ValueError(f"JPEG declares an invalid size {width}x{height}")
            if components not in (1, 3, 4):
                raise ValueError(f"JPEG declares {components} colour components (1, 3 or 4 are decoded)")
            return Header("JPEG", height, width, components, depth)
        pos += length
    else:
        raise ValueError(f"JPEG has no frame header within its first {MAX_JPEG_SEGMENTS} segments")
    raise ValueError("JPEG is truncated before its frame header")


def png_data_bytes(header: Header) -> int:
    """Bytes a PNG's image data inflates to, from its header: each row is a filter
    byte and its packed samples; an interlaced image is seven smaller images."""
    bits = _PNG_SAMPLES[header.colour] * header.bit_depth

    def size(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w > 0 and h > 0 else 0

    if not header.interlace:
        return size(header.width, header.height)
    return sum(size((header.width - x0 + dx - 1) // dx, (header.height - y0 + dy - 1) // dy)
               for x0, y0, dx, dy in _ADAM7)


def check_work(data: bytes, header: Header) -> None:
    """Raise ValueError when decoding ``data`` would do more work than its header
    declares (see the module's text). Costs at most the declared size of inflating."""
    if header.format == "PNG":
        _check_png_data(data, header)
    elif data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ValueError(f"JPEG has more than {MAX_JPEG_SCANS} scans")


def _check_png_data(data: bytes, header: Header) -> None:
    expected = png_data_bytes(header)
    inflater = zlib.decompressobj()
    produced, pos, n = 0, 8, len(data)
    view = memoryview(data)
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 8 > n:
            return  # truncated: the decoder says so
        length, kind = struct.unpack(">I4s", view[pos:pos + 8])
        body = view[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            return
        if kind != b"IDAT" or inflater.eof:
            continue
        pending = bytes(body)
        while pending and not inflater.eof:
            try:
                out = inflater.decompress(pending, min(_INFLATE_STEP, expected - produced + 1))
            except zlib.error as exc:
                raise ValueError(f"PNG image data is corrupt: {exc}") from None
            produced += len(out)
            if produced > expected:
                raise ValueError(f"PNG image data inflates to more than the {expected} bytes its "
                                 f"{header.width}x{header.height} header declares")
            pending = inflater.unconsumed_tail
    raise ValueError(f"PNG has more than {MAX_PNG_CHUNKS} chunks")
