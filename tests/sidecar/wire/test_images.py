"""Encoded images: header reading, checks against the model's shape and the pixel
limit before decoding, decoding off the event loop."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest

import badinput as bad
from sidecar.api import classifier_pb2 as pb
from sidecar.errors import InvalidInput, TooLarge
from sidecar.wire.imageheader import MAX_JPEG_SEGMENTS, read_header
from sidecar.wire.images import check_encoded
from sidecar.wire.messages import WireImages, decode, decode_async, decode_batch_async, encode_png, encode_raw

RNG = np.random.default_rng(3)
RGB = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # height 24, width 40: not square on purpose


def enc(ext: str, img: np.ndarray, *params) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("data,want", [
    (enc(".png", RGB), ("PNG", 24, 40, 3, 8)),
    (enc(".png", RGB[:, :, 0]), ("PNG", 24, 40, 1, 8)),
    (enc(".png", np.dstack([RGB, RGB[:, :, :1]])), ("PNG", 24, 40, 4, 8)),
    (enc(".png", RGB.astype(np.uint16) * 257), ("PNG", 24, 40, 3, 16)),
    (enc(".jpg", RGB), ("JPEG", 24, 40, 3, 8)),
    (enc(".jpg", RGB[:, :, 0]), ("JPEG", 24, 40, 1, 8)),
    (enc(".jpg", RGB, cv2.IMWRITE_JPEG_PROGRESSIVE, 1), ("JPEG", 24, 40, 3, 8)),
])
def test_header_matches_what_the_encoder_wrote(data, want):
    h = read_header(data)
    assert (h.format, h.height, h.width, h.channels, h.bit_depth) == want


def test_header_of_a_jpeg_with_exif_before_the_frame():
    data = enc(".jpg", RGB)
    exif = b"Exif\x00\x00" + b"\x00" * 200
    with_app1 = data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + data[2:]
    assert (read_header(with_app1).height, read_header(with_app1).width) == (24, 40)
    assert decode(pb.Image(encoded=with_app1)).shape == (24, 40, 3)


def test_the_jpeg_segment_walk_is_bounded():
    data = enc(".jpg", RGB)
    assert read_header(bad.jpeg_many_segments(data, MAX_JPEG_SEGMENTS - 10)).width == 40
    with pytest.raises(ValueError, match="segments"):
        read_header(bad.jpeg_many_segments(data, MAX_JPEG_SEGMENTS + 10))


@pytest.mark.parametrize("data", [b"", b"\x89PNG", b"GIF89a....", bad.bmp(RGB), b"\xff\xd8\xff\xd9",
                                  bad.PNG_SIGNATURE + bad.ihdr(0, 5), bad.PNG_SIGNATURE + bad.ihdr(5, 5, depth=16, colour=3)])
def test_malformed_headers_are_value_errors(data):
    with pytest.raises(ValueError):
        read_header(data)


def test_decoded_rgb_equals_the_source():
    for data in (enc(".png", RGB[:, :, ::-1]), encode_png(RGB).encoded):
        np.testing.assert_array_equal(decode(pb.Image(encoded=data), expect=(24, 40, 3)), RGB)


def test_one_channel_model_gets_gray_and_rgb_model_gets_rgb():
    gray_png = enc(".png", RGB[:, :, 0])
    assert decode(pb.Image(encoded=gray_png), expect=(24, 40, 1)).shape == (24, 40, 1)
    assert decode(pb.Image(encoded=gray_png), expect=(None, None, 3)).shape == (24, 40, 3)
    assert decode(pb.Image(encoded=enc(".png", RGB)), expect=(24, 40, 1)).shape == (24, 40, 1)


def test_declared_size_is_checked_against_the_model_before_decoding():
    with pytest.raises(InvalidInput, match=r"\[32, 32, 3\], got \[24, 40, 3\]"):
        check_encoded(enc(".png", RGB), "image", expect=(32, 32, 3))
    # a bomb: refused from the header, against the model and against the pixel limit
    bomb = bad.png_bomb()
    with pytest.raises(InvalidInput):
        check_encoded(bomb, "image", expect=(32, 32, 3))
    with pytest.raises(TooLarge, match="limit"):
        check_encoded(bomb, "image", expect=(None, None, 3))
    with pytest.raises(TooLarge):
        check_encoded(enc(".png", RGB), "image", max_pixels=24 * 40 - 1)
    check_encoded(enc(".png", RGB), "image", max_pixels=24 * 40)


def test_raw_images_get_the_same_checks():
    with pytest.raises(InvalidInput):
        decode(encode_raw(RGB), expect=(32, 32, 3))
    with pytest.raises(TooLarge):
        decode(pb.Image(raw=pb.RawImage(pixels=b"", height=5000, width=5000, channels=3)))
    with pytest.raises(InvalidInput, match="dtype"):
        decode(pb.Image(raw=pb.RawImage(pixels=RGB.tobytes(), height=24, width=40, channels=3, dtype=9)))


async def test_decode_async_leaves_the_event_loop_free():
    big = enc(".png", RNG.integers(0, 256, (1500, 1500, 3), dtype=np.uint8))
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    out = await decode_async(pb.Image(encoded=big), expect=(None, None, 3))
    during = ticks - start
    done = True
    await task
    assert out.shape == (1500, 1500, 3)
    assert during > 1  # the loop ran other work while the image was decoded


async def test_a_batch_checks_every_header_before_decoding_any():
    good = pb.Image(encoded=enc(".png", RGB))
    with pytest.raises(InvalidInput, match="image 2"):
        await decode_batch_async([good, good, pb.Image(encoded=bad.png_bomb())], expect=(24, 40, 3))
    arrays = await WireImages([good, enc(".jpg", RGB)]).decode((24, 40, 3))
    assert [a.shape for a in arrays] == [(24, 40, 3)] * 2
    with pytest.raises(InvalidInput, match=r"^image:"):
        await WireImages([b"junk"], single=True).decode()
