"""TF Serving's REST API on the sidecar (aiohttp in the sidecar's event loop),
through the same data plane as gRPC, over the official FakeBackend."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import cv2
import httpx
import numpy as np
import pytest

from fake_sidecar import grpc_channel, image, one_pixel, rest_url, snapshot, start_fake_sidecar
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.wire.tensors import to_ndarray, to_proto
from sidecar.testing import FakeBackend
from sidecar.wire.tfapi import predict_pb2, prediction_service_pb2_grpc


def png_b64(img: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


@pytest.fixture
async def noisy():
    """Default output policy (keyed noise 0.2, 4 decimals): answers must still match across transports."""
    backend = FakeBackend()
    server = await start_fake_sidecar(backend, score_noise=0.2, score_precision=4)
    yield server, backend
    await server.stop(0)


@pytest.fixture
async def exact():
    backend = FakeBackend()
    server = await start_fake_sidecar(backend, max_message_bytes=200_000, max_batch=4)
    yield server, backend
    await server.stop(0)


async def post(server, path, body, **kw):
    async with httpx.AsyncClient(timeout=10) as client:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return await client.post(rest_url(server, path), content=content, **kw)


async def get(server, path, **kw):
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(rest_url(server, path), **kw)


async def grpc_predict(server, images: np.ndarray, session: str) -> np.ndarray:
    async with grpc_channel(server) as ch:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "m"
        req.inputs["image"].CopyFrom(to_proto(images.astype(np.float32)))
        resp = await prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(
            req, metadata=[("x-session-id", session)])
        return to_ndarray(resp.outputs["scores"])


async def test_row_columnar_and_b64_equal_the_grpc_answer(noisy):
    server, backend = noisy
    imgs = np.stack([image(1), image(2)])
    want = await grpc_predict(server, imgs, "grpc")
    row = await post(server, "/v1/models/m:predict", {"instances": imgs.tolist()}, headers={"X-Session-Id": "row"})
    assert row.status_code == 200, row.text
    np.testing.assert_array_equal(np.float32(row.json()["predictions"]), want)
    named = await post(server, "/v1/models/m/versions/2:predict",
                       {"signature_name": "serving_default", "instances": [{"image": x} for x in imgs.tolist()]},
                       headers={"X-Session-Id": "named"})
    np.testing.assert_array_equal(np.float32(named.json()["predictions"]), want)
    col = await post(server, "/v1/models/m/labels/canary:predict", {"inputs": {"image": imgs.tolist()}},
                     headers={"X-Session-Id": "col"})
    assert col.status_code == 200, col.text
    np.testing.assert_array_equal(np.float32(col.json()["outputs"]), want)
    # b64 PNG equals the Classifier API with the same PNG bytes
    b64 = png_b64(imgs[0])
    rest_png = await post(server, "/v1/models/m:predict", {"instances": [{"b64": b64}]},
                          headers={"X-Session-Id": "png-rest"})
    assert rest_png.status_code == 200, rest_png.text
    async with grpc_channel(server) as ch:
        resp = await pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(
            model=pb.ModelRef(name="m"), image=pb.Image(encoded=base64.b64decode(b64)), session_id="png-grpc"))
    np.testing.assert_array_equal(np.float32(rest_png.json()["predictions"][0]), np.float32(resp.result.scores))
    assert backend.images == 2 * 4 + 2  # every fresh session forwarded its images


async def test_one_pixel_copy_in_the_same_session_gets_the_anchors_answer(exact):
    server, backend = exact
    a = image(3)
    first = await post(server, "/v1/models/m:predict", {"instances": [a.tolist()]}, headers={"X-Session-Id": "eve"})
    copy = await post(server, "/v1/models/m:predict", {"instances": [{"b64": png_b64(one_pixel(a, 1))}]},
                      headers={"X-Session-Id": "eve"})
    assert backend.calls["predict"] == 1
    assert copy.json()["predictions"] == first.json()["predictions"]
    other = await post(server, "/v1/models/m:predict", {"instances": [one_pixel(a, 1).tolist()]},
                       headers={"X-Session-Id": "bob"})
    assert other.status_code == 200 and backend.calls["predict"] == 2  # another session is judged on its own


def png_bomb_b64(side: int = 20000) -> str:
    """A tiny PNG whose header declares side x side pixels (a decompression bomb)."""
    ok, buf = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    return base64.b64encode(bytes(data)).decode()


def bad_cases(img: np.ndarray) -> list[tuple[str, str, object, int]]:
    rows = img.tolist()
    with_nan = img.astype(np.float64)
    with_nan[1, 2, 0] = np.nan
    nan = json.dumps({"instances": [with_nan.tolist()]})  # Python's json writes (and reads) NaN
    assert "NaN" in nan
    return [
        ("not json", "/v1/models/m:predict", b"{not json", 400),
        ("not an object", "/v1/models/m:predict", [1, 2], 400),
        ("neither format", "/v1/models/m:predict", {"images": [rows]}, 400),
        ("both formats", "/v1/models/m:predict", {"instances": [rows], "inputs": [rows]}, 400),
        ("instances not a list", "/v1/models/m:predict", {"instances": 3}, 400),
        ("no images", "/v1/models/m:predict", {"instances": []}, 400),
        ("ragged", "/v1/models/m:predict", {"instances": [[[1, 2, 3], [4, 5]]]}, 400),
        ("wrong shape", "/v1/models/m:predict", {"instances": [np.zeros((8, 8, 3)).tolist()]}, 400),
        ("strings", "/v1/models/m:predict", {"instances": [["a"]]}, 400),
        ("out of range", "/v1/models/m:predict", {"instances": [np.full((32, 32, 3), 300).tolist()]}, 400),
        ("NaN", "/v1/models/m:predict", nan, 400),
        ("bad base64", "/v1/models/m:predict", {"instances": [{"b64": "!!!"}]}, 400),
        ("b64 not an image", "/v1/models/m:predict", {"instances": [{"b64": base64.b64encode(b"GIF89a..").decode()}]}, 400),
        ("wrong input name", "/v1/models/m:predict", {"instances": [{"pixels": rows}]}, 400),
        ("two inputs", "/v1/models/m:predict", {"inputs": {"image": [rows], "x": [rows]}}, 400),
        ("mixed input names", "/v1/models/m:predict", {"instances": [{"image": rows}, {"x": rows}]}, 400),
        ("bad signature name", "/v1/models/m:predict", {"signature_name": 3, "instances": [rows]}, 400),
        ("unknown model", "/v1/models/nope:predict", {"instances": [rows]}, 404),
        ("unknown version", "/v1/models/m/versions/9:predict", {"instances": [rows]}, 404),
        ("unknown label", "/v1/models/m/labels/nope:predict", {"instances": [rows]}, 404),
        ("unknown signature", "/v1/models/m:predict", {"signature_name": "nope", "instances": [rows]}, 404),
        ("unknown verb", "/v1/models/m:explain", {"instances": [rows]}, 404),
        ("bad path", "/v1/models/m/versions/x:predict", {"instances": [rows]}, 404),
        ("too many images", "/v1/models/m:predict", {"instances": [rows] * 5}, 413),
        ("body too large", "/v1/models/m:predict", b" " * 300_000, 413),
        ("refused verb", "/v1/models/m:classify", {"examples": []}, 412),
        ("png bomb, refused from its header", "/v1/models/m:predict", {"instances": [{"b64": png_bomb_b64()}]}, 400),
        ("b64 and arrays mixed", "/v1/models/m:predict", {"instances": [{"b64": png_b64(img)}, rows]}, 400),
    ]


async def test_bad_input_gets_an_error_body_with_tf_serving_codes_and_changes_nothing(exact):
    server, backend = exact
    a = image(4)
    ok = await post(server, "/v1/models/m:predict", {"instances": [a.tolist()]}, headers={"X-Session-Id": "victim"})
    assert ok.status_code == 200
    before, calls = snapshot(server), backend.calls["predict"]
    cases = bad_cases(image(5))
    for name, path, body, code in cases:
        r = await post(server, path, body, headers={"X-Session-Id": "victim"})
        assert r.status_code == code, (name, r.status_code, r.text)
        assert isinstance(r.json().get("error"), str) and r.json()["error"], name
        assert snapshot(server) == before, name
        assert backend.calls["predict"] == calls, name
    again = await post(server, "/v1/models/m:predict", {"instances": [one_pixel(a).tolist()]},
                       headers={"X-Session-Id": "victim"})
    assert again.json() == ok.json()  # the victim's anchor still answers


async def test_model_status_and_metadata_come_from_the_backend(exact):
    server, backend = exact
    status = await get(server, "/v1/models/m")
    assert status.status_code == 200
    assert sorted(int(s["version"]) for s in status.json()["model_version_status"]) == [1, 2]
    one = await get(server, "/v1/models/m/versions/1")
    assert [int(s["version"]) for s in one.json()["model_version_status"]] == [1]
    md = await get(server, "/v1/models/m/labels/canary/metadata")
    assert md.status_code == 200, md.text
    body = md.json()
    assert body["model_spec"]["name"] == "m" and int(body["model_spec"]["version"]) == 2
    sig = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert "image" in sig["inputs"] and "scores" in sig["outputs"]
    missing = await get(server, "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]
    assert backend.calls["predict"] == 0


async def test_rest_authenticates_with_bearer_tokens_and_the_principal_is_the_session(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t-alice alice\n")
    backend = FakeBackend()
    server = await start_fake_sidecar(backend, auth_tokens=str(tokens))
    try:
        a = image(6)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dDp4"}):
            for call in (post(server, "/v1/models/m:predict", {"instances": [a.tolist()]}, headers=headers),
                         get(server, "/v1/models/m", headers=headers), get(server, "/v1/models/m/metadata", headers=headers),
                         post(server, "/v1/models/m:predict", b"{bad", headers=headers)):
                r = await call
                assert r.status_code == 401 and r.json()["error"]
        assert sum(backend.calls.values()) == 0 and snapshot(server) == {}
        alice = {"Authorization": "Bearer t-alice"}
        await post(server, "/v1/models/m:predict", {"instances": [a.tolist()]}, headers={**alice, "X-Session-Id": "1"})
        r = await post(server, "/v1/models/m:predict", {"instances": [one_pixel(a).tolist()]},
                       headers={**alice, "X-Session-Id": "2"})
        assert r.status_code == 200 and backend.calls["predict"] == 1  # a new session id did not reset alice
        assert all(k.startswith("u:alice") for k in snapshot(server))
    finally:
        await server.stop(0)


async def test_a_large_body_is_parsed_in_the_parse_process_with_the_same_answer():
    """Bodies over 64 KiB are parsed in a separate process; the answer is the one a
    small body gets, and bad content there is the same 400."""
    from sidecar.transport import rest

    backend = FakeBackend()
    server = await start_fake_sidecar(backend, max_batch=64)
    try:
        imgs = np.stack([image(20 + i) for i in range(12)])
        small = [await post(server, "/v1/models/m:predict", {"instances": [x.tolist()]},
                            headers={"X-Session-Id": f"s{i}"}) for i, x in enumerate(imgs)]
        body = json.dumps({"instances": imgs.tolist()})
        assert len(body) > rest.INLINE_BODY_BYTES
        large = await post(server, "/v1/models/m:predict", body, headers={"X-Session-Id": "big"})
        assert large.status_code == 200, large.text
        assert large.json()["predictions"] == [r.json()["predictions"][0] for r in small]
        ragged = imgs.tolist()
        ragged[5] = ragged[5][:3]
        bad = await post(server, "/v1/models/m:predict", {"instances": ragged}, headers={"X-Session-Id": "big"})
        assert bad.status_code == 400 and bad.json()["error"]
    finally:
        await server.stop(0)
