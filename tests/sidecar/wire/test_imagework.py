"""Decoding work bounded by the declared size (sidecar/wire/imageheader.check_work):
real PNGs of every layout pass, image data that inflates past the header's size
is refused, JPEG scans are counted."""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest

import badinput as bad
from sidecar.wire.imageheader import check_work, png_data_bytes, read_header

RNG = np.random.default_rng(3)


@pytest.mark.parametrize("shape", [(32, 32, 3), (17, 5, 3), (31, 33, 1), (1, 1, 3), (100, 37, 3)])
def test_real_pngs_and_jpegs_pass(shape):
    img = RNG.integers(0, 256, shape, dtype=np.uint8)
    for data in (bad.png(img), bad.jpeg(np.repeat(img, 3, axis=2) if shape[2] == 1 else img)):
        check_work(data, read_header(data))
    ok, buf = cv2.imencode(".png", RNG.integers(0, 65535, shape, dtype=np.uint16))
    check_work(buf.tobytes(), read_header(buf.tobytes()))


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA", "1"])
def test_pngs_of_other_colour_types_pass(mode):
    Image = pytest.importorskip("PIL.Image")
    out = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (13, 29, 3), dtype=np.uint8)).convert(mode).save(out, "PNG")
    check_work(out.getvalue(), read_header(out.getvalue()))


@pytest.mark.parametrize("w, h", [(1, 1), (3, 9), (33, 17), (8, 8)])
def test_interlaced_pngs_exactly_at_their_size(w, h):
    head = bad.PNG_SIGNATURE + bad.ihdr(w, h, interlace=1)
    n = png_data_bytes(read_header(head + bad.chunk(b"IEND", b"")))
    exact = head + bad.chunk(b"IDAT", zlib.compress(b"\0" * n)) + bad.chunk(b"IEND", b"")
    check_work(exact, read_header(exact))
    decoded = cv2.imdecode(np.frombuffer(exact, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape[:2] == (h, w)  # the decoder agrees on the size
    over = head + bad.chunk(b"IDAT", zlib.compress(b"\0" * (n + 1))) + bad.chunk(b"IEND", b"")
    with pytest.raises(ValueError):
        check_work(over, read_header(over))


def test_a_small_png_carrying_a_gigabyte_is_refused():
    bomb = bad.png_idat_bomb(32, 32, 1 << 30)
    with pytest.raises(ValueError, match="inflates to more than the 3104 bytes"):
        check_work(bomb, read_header(bomb))


def test_jpeg_scans_are_counted():
    data = bad.jpeg(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    check_work(bad.jpeg_many_scans(data, 50), read_header(data))
    with pytest.raises(ValueError, match="scans"):
        check_work(bad.jpeg_many_scans(data, 200), read_header(data))
