"""The bad-input corpus: hostile and careless requests over the gRPC Classifier API,
the PredictionService/ModelService proxy, raw malformed bytes and the TF Serving
REST API (``REST_CASES``, issue 25: oversize instance lists, compression bombs,
image-data bombs, JSON edge cases, over-long model names).

One sidecar (paper mode) in front of the official fake backend, which serves a
32x32x3 model "m" and a model "dyn" that takes any height and width (only the
pixel limit bounds it). Before the corpus a
probe session ("victim") holds an anchor. Every case asserts:

* its status code (and that the message says something);
* no state change: every session's anchors are the same objects, the backend saw
  no Predict and no image, and (after the corpus) the victim's 1-pixel copy is
  still answered from its anchor;
* the failure is counted in ``hashguard_errors_total`` (except what gRPC itself
  refuses before any handler runs: messages over ``--max-message-bytes``);
* the process is alive: health answers SERVING.

Connections (header and body timeouts, the connection cap), metric labels of
unknown model names, abandoned calls and backend NOT_FOUND messages have tests
of their own at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import gzip
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import badinput as bad
from conftest import free_port
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.config import Settings
from sidecar.wire.messages import encode_raw
from sidecar.server import SidecarServer
from sidecar.wire.tensors import to_proto
from sidecar.testing import FakeBackend, FakeModel
from sidecar.wire.tfapi import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

C = grpc.StatusCode
MAX_MESSAGE = 1 << 20
MAX_BATCH = 8
MAX_SID = 64
RNG = np.random.default_rng(11)
IMG = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the victim's anchor
OTHER = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # an image that would be forwarded
PNG_OK = bad.png(OTHER)
JPEG_OK = bad.jpeg(OTHER)


@dataclass
class Stack:
    server: SidecarServer
    backend: FakeBackend
    channel: grpc.aio.Channel
    classifier: Any = field(init=False)
    predict: Any = field(init=False)
    models: Any = field(init=False)
    health: Any = field(init=False)

    def __post_init__(self):
        self.classifier = pb_grpc.ClassifierStub(self.channel)
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def state(self):
        store = self.server.plane.store
        sessions = {k: tuple(id(a) for a in e.anchors) for k, e in store._entries.items()}
        return sessions, self.backend.calls["predict"], self.backend.images

    def errors_counted(self) -> float:
        return sum(s.value for m in self.server.metrics.registry.collect() if m.name == "hashguard_errors"
                   for s in m.samples if s.name.endswith("_total"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack():
    backend = FakeBackend({"m": FakeModel(), "dyn": FakeModel(image_shape=(None, None, 3))})
    settings = Settings(backend="127.0.0.1:1", host="127.0.0.1", port=0, metrics_port=0, rest_port=free_port(),
                        padding="off", score_noise=0.0, score_precision=0, max_message_bytes=MAX_MESSAGE,
                        max_batch=MAX_BATCH, max_session_id_len=MAX_SID)
    server = SidecarServer(settings, backend=backend)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    s = Stack(server, backend, channel)
    for _ in range(100):
        if (await s.health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.05)
    anchor = await s.classifier.Classify(classify(encode_raw(IMG)))
    assert s.backend.calls["predict"] == 1
    s.anchor_scores = list(anchor.result.scores)
    yield s
    await channel.close()
    await server.stop(0)


# --------------------------------------------------------------------------- request builders


def raw_image(pixels: bytes, h=32, w=32, c=3, dtype=pb.DTYPE_UINT8) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=h, width=w, channels=c, dtype=dtype))


def classify(image: pb.Image | None, model="m", session="victim", **ref) -> pb.ClassifyRequest:
    req = pb.ClassifyRequest(model=pb.ModelRef(name=model, **ref), session_id=session)
    if image is not None:
        req.image.CopyFrom(image)
    return req


def encoded(data: bytes) -> pb.Image:
    return pb.Image(encoded=data)


def with_value(value: float) -> np.ndarray:
    arr = OTHER.astype(np.float32)
    arr[3, 4, 1] = value
    return arr


def tensor(arr: np.ndarray):
    return to_proto(np.asarray(arr))


def hand_tensor(dtype: int, dims: list[int], content: bytes = b"", float_val=()):
    t = to_proto(np.zeros((1,), np.float32))
    t.Clear()
    t.dtype = dtype
    for d in dims:
        t.tensor_shape.dim.add(size=d)
    if content:
        t.tensor_content = content
    t.float_val.extend(float_val)
    return t


def predict(inputs: dict | None = None, name="m", version: int | None = None, label: str | None = None,
            signature: str = "") -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    if signature:
        req.model_spec.signature_name = signature
    for k, v in (inputs if inputs is not None else {"image": tensor(OTHER[None].astype(np.float32))}).items():
        req.inputs[k].CopyFrom(v)
    return req


def png_with_ihdr(width, height, depth=8, colour=2, interlace=0) -> bytes:
    return bad.PNG_SIGNATURE + bad.ihdr(width, height, depth, colour, interlace) + bad.chunk(b"IEND", b"")


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Stack], Any]  # returns an awaitable RPC
    code: grpc.StatusCode
    counted: bool = True  # refused by gRPC itself before any handler: not ours to count


def C_(name, req, code, md=(), counted=True):
    return Case(name, lambda s: s.classifier.Classify(req, metadata=md), code, counted)


def B_(name, images, code):
    req = pb.ClassifyBatchRequest(model=pb.ModelRef(name="m"), session_id="victim", images=images)
    return Case(name, lambda s: s.classifier.ClassifyBatch(req), code)


def P_(name, req, code, md=(("x-session-id", "victim"),), counted=True):
    return Case(name, lambda s: s.predict.Predict(req, metadata=md), code, counted)


def R_(name, path, payload: bytes, code):
    """Raw bytes on a method path: identity serializers, the bytes go as they are."""
    return Case(name, lambda s: s.channel.unary_unary(path)(payload), code)


def stream(reqs):
    async def run(s):
        async for _ in s.classifier.ClassifyStream(iter(reqs)):
            pass
    return run


_png = bad.png(OTHER)
_jpeg = bad.jpeg(OTHER)
LONG_NAME = "x" * 8000
# a 32x32 RGB PNG whose image data inflates to 512 MiB of zeros (declared: 3,104 bytes); 520 KiB
IDAT_BOMB = bad.png_idat_bomb(32, 32, 512 << 20)
_valid_predict = predict().SerializeToString()
_valid_classify = classify(encode_raw(OTHER)).SerializeToString()

CASES = [
    # ---- Classifier.Classify: raw pixels
    C_("raw wrong shape 16x16", classify(encode_raw(OTHER[:16, :16])), C.INVALID_ARGUMENT),
    C_("raw 64x64 for a 32x32 model", classify(encode_raw(np.zeros((64, 64, 3), np.uint8))), C.INVALID_ARGUMENT),
    C_("raw 1 channel for an RGB model", classify(encode_raw(OTHER[:, :, :1])), C.INVALID_ARGUMENT),
    C_("raw byte count vs float32 dtype", classify(raw_image(OTHER.tobytes(), dtype=pb.DTYPE_FLOAT32)), C.INVALID_ARGUMENT),
    C_("raw byte count short by one", classify(raw_image(OTHER.tobytes()[:-1])), C.INVALID_ARGUMENT),
    C_("raw byte count long by one", classify(raw_image(OTHER.tobytes() + b"\x00")), C.INVALID_ARGUMENT),
    C_("raw channels 2", classify(raw_image(OTHER.tobytes()[:2048], c=2)), C.INVALID_ARGUMENT),
    C_("raw channels 4", classify(raw_image(np.zeros((32, 32, 4), np.uint8).tobytes(), c=4)), C.INVALID_ARGUMENT),
    C_("raw channels 0", classify(raw_image(b"", c=0)), C.INVALID_ARGUMENT),
    C_("raw height 0", classify(raw_image(b"", h=0)), C.INVALID_ARGUMENT),
    C_("raw width 0", classify(raw_image(b"", w=0)), C.INVALID_ARGUMENT),
    C_("raw unknown dtype enum", classify(raw_image(OTHER.tobytes(), dtype=7)), C.INVALID_ARGUMENT),
    C_("raw NaN", classify(encode_raw(with_value(np.nan))), C.INVALID_ARGUMENT),
    C_("raw +inf", classify(encode_raw(with_value(np.inf))), C.INVALID_ARGUMENT),
    C_("raw -inf", classify(encode_raw(with_value(-np.inf))), C.INVALID_ARGUMENT),
    C_("raw float below 0", classify(encode_raw(with_value(-1.0))), C.INVALID_ARGUMENT),
    C_("raw float above 255", classify(encode_raw(with_value(256.0))), C.INVALID_ARGUMENT),
    C_("raw huge declared size, tiny payload", classify(raw_image(b"\x00" * 16, h=100_000, w=100_000)), C.INVALID_ARGUMENT),
    C_("no image", classify(None), C.INVALID_ARGUMENT),
    # ---- Classifier.Classify: encoded images
    C_("encoded empty", classify(encoded(b"")), C.INVALID_ARGUMENT),
    C_("encoded non-image bytes", classify(encoded(b"GIF89a not really an image")), C.INVALID_ARGUMENT),
    C_("encoded BMP (not PNG/JPEG)", classify(encoded(bad.bmp(OTHER))), C.INVALID_ARGUMENT),
    C_("PNG truncated in its signature", classify(encoded(_png[:6])), C.INVALID_ARGUMENT),
    C_("PNG truncated in IHDR", classify(encoded(_png[:20])), C.INVALID_ARGUMENT),
    C_("PNG without image data", classify(encoded(png_with_ihdr(32, 32))), C.INVALID_ARGUMENT),
    C_("PNG truncated in IDAT", classify(encoded(_png[: len(_png) // 2])), C.INVALID_ARGUMENT),
    C_("PNG bomb 20000x20000", classify(encoded(bad.png_bomb())), C.INVALID_ARGUMENT),
    C_("PNG declaring 65536x65536 (> 2^30 pixels)", classify(encoded(bad.png_bomb(65536, 65536, rows=1))), C.INVALID_ARGUMENT),
    C_("PNG declaring 2^31-1 square", classify(encoded(png_with_ihdr(2**31 - 1, 2**31 - 1))), C.INVALID_ARGUMENT),
    C_("PNG declaring width 0", classify(encoded(png_with_ihdr(0, 32))), C.INVALID_ARGUMENT),
    C_("PNG declaring 2^32-1 wide", classify(encoded(png_with_ihdr(2**32 - 1, 1))), C.INVALID_ARGUMENT),
    C_("PNG invalid colour type", classify(encoded(png_with_ihdr(32, 32, colour=5))), C.INVALID_ARGUMENT),
    C_("PNG invalid bit depth", classify(encoded(png_with_ihdr(32, 32, depth=3))), C.INVALID_ARGUMENT),
    C_("PNG unknown interlace method", classify(encoded(png_with_ihdr(32, 32, interlace=7))), C.INVALID_ARGUMENT),
    C_("PNG 64x64 for a 32x32 model", classify(encoded(bad.png(np.zeros((64, 64, 3), np.uint8)))), C.INVALID_ARGUMENT),
    C_("PNG IHDR not first", classify(encoded(bad.PNG_SIGNATURE + bad.chunk(b"tEXt", b"a\x00b") + _png[8:])), C.INVALID_ARGUMENT),
    C_("JPEG SOI only", classify(encoded(b"\xff\xd8")), C.INVALID_ARGUMENT),
    C_("JPEG SOI + EOI", classify(encoded(b"\xff\xd8\xff\xd9")), C.INVALID_ARGUMENT),
    C_("JPEG truncated before its frame header", classify(encoded(_jpeg[: bad.sof_offset(_jpeg) - 2])), C.INVALID_ARGUMENT),
    C_("JPEG bomb 30000x30000", classify(encoded(bad.jpeg_declaring(_jpeg, 30000, 30000))), C.INVALID_ARGUMENT),
    C_("JPEG declaring 65535x65535", classify(encoded(bad.jpeg_declaring(_jpeg, 65535, 65535))), C.INVALID_ARGUMENT),
    C_("JPEG declaring height 0 (DNL)", classify(encoded(bad.jpeg_declaring(_jpeg, 0, 32))), C.INVALID_ARGUMENT),
    C_("JPEG declaring 2 components", classify(encoded(bad.jpeg_declaring(_jpeg, 32, 32, components=2))), C.INVALID_ARGUMENT),
    C_("JPEG 64x64 for a 32x32 model", classify(encoded(bad.jpeg(np.zeros((64, 64, 3), np.uint8)))), C.INVALID_ARGUMENT),
    C_("JPEG with 1000 segments before its frame header", classify(encoded(bad.jpeg_many_segments(_jpeg, 1000))), C.INVALID_ARGUMENT),
    C_("PNG 32x32 whose image data inflates to 512 MiB", classify(encoded(IDAT_BOMB)), C.INVALID_ARGUMENT),
    C_("JPEG with 200 scan markers", classify(encoded(bad.jpeg_many_scans(_jpeg, 200))), C.INVALID_ARGUMENT),
    # ---- a model of any height and width: the pixel limit refuses bombs
    C_("dyn: PNG bomb 20000x20000", classify(encoded(bad.png_bomb()), model="dyn"), C.RESOURCE_EXHAUSTED),
    C_("dyn: PNG declaring 65536x65536", classify(encoded(bad.png_bomb(65536, 65536, rows=1)), model="dyn"),
       C.RESOURCE_EXHAUSTED),
    C_("dyn: JPEG bomb 30000x30000", classify(encoded(bad.jpeg_declaring(_jpeg, 30000, 30000)), model="dyn"),
       C.RESOURCE_EXHAUSTED),
    C_("dyn: raw 5000x5000 declared, tiny payload", classify(raw_image(b"\x00" * 16, h=5000, w=5000), model="dyn"),
       C.RESOURCE_EXHAUSTED),
    C_("dyn: raw 1x5000 (side limit)", classify(raw_image(b"\x00" * 15000, h=1, w=5000), model="dyn"), C.RESOURCE_EXHAUSTED),
    C_("dyn: PNG 32x32 whose image data inflates to 512 MiB", classify(encoded(IDAT_BOMB), model="dyn"),
       C.INVALID_ARGUMENT),
    C_("dyn: grayscale raw for an RGB model", classify(encode_raw(OTHER[:, :, :1]), model="dyn"), C.INVALID_ARGUMENT),
    # ---- Classifier.Classify: model, session, size
    C_("unknown model", classify(encode_raw(OTHER), model="nope"), C.NOT_FOUND),
    C_("unknown version", classify(encode_raw(OTHER), version=99), C.NOT_FOUND),
    C_("unknown signature", classify(encode_raw(OTHER), signature_name="nope"), C.NOT_FOUND),
    C_("no model name", classify(encode_raw(OTHER), model=""), C.INVALID_ARGUMENT),
    C_("model name of 8000 characters", classify(encode_raw(OTHER), model=LONG_NAME), C.NOT_FOUND),
    C_("negative version", classify(encode_raw(OTHER), version=-1), C.INVALID_ARGUMENT),
    C_("over-long session id (field)", classify(encode_raw(OTHER), session="x" * (MAX_SID + 1)), C.INVALID_ARGUMENT),
    C_("over-long session id (metadata)", classify(encode_raw(OTHER), session=""), C.INVALID_ARGUMENT,
       md=(("x-session-id", "y" * (MAX_SID + 1)),)),
    C_("oversize message", classify(encode_raw(np.zeros((700, 700, 3), np.uint8))), C.RESOURCE_EXHAUSTED, counted=False),
    # ---- Classifier.ClassifyBatch / ClassifyStream
    B_("batch: junk at image 1", [encode_raw(OTHER), encoded(b"junk")], C.INVALID_ARGUMENT),
    B_("batch: PNG bomb at image 2", [encode_raw(OTHER), encoded(_png), encoded(bad.png_bomb())], C.INVALID_ARGUMENT),
    B_("batch: mixed shapes", [encode_raw(OTHER), encode_raw(OTHER[:16, :16])], C.INVALID_ARGUMENT),
    B_("batch: empty", [], C.INVALID_ARGUMENT),
    B_("batch: too many images", [encode_raw(OTHER)] * (MAX_BATCH + 1), C.RESOURCE_EXHAUSTED),
    Case("stream: a bad request", stream([classify(encoded(b"junk"))]), C.INVALID_ARGUMENT),
    # ---- PredictionService.Predict
    P_("predict NaN", predict({"image": tensor(with_value(np.nan)[None])}), C.INVALID_ARGUMENT),
    P_("predict +inf", predict({"image": tensor(with_value(np.inf)[None])}), C.INVALID_ARGUMENT),
    P_("predict above 255", predict({"image": tensor(with_value(300.0)[None])}), C.INVALID_ARGUMENT),
    P_("predict float64", predict({"image": tensor(OTHER[None].astype(np.float64))}), C.INVALID_ARGUMENT),
    P_("predict int32", predict({"image": tensor(OTHER[None].astype(np.int32))}), C.INVALID_ARGUMENT),
    P_("predict string tensor", predict({"image": tensor(np.array([b"abc"]))}), C.INVALID_ARGUMENT),
    P_("predict wrong shape [1,8,32,3]", predict({"image": tensor(OTHER[None, :8].astype(np.float32))}), C.INVALID_ARGUMENT),
    P_("predict 1 channel", predict({"image": tensor(OTHER[None, :, :, :1].astype(np.float32))}), C.INVALID_ARGUMENT),
    P_("predict rank 3", predict({"image": tensor(OTHER.astype(np.float32))}), C.INVALID_ARGUMENT),
    P_("predict rank 5", predict({"image": tensor(OTHER[None, None].astype(np.float32))}), C.INVALID_ARGUMENT),
    P_("predict wrong input name", predict({"pixels": tensor(OTHER[None].astype(np.float32))}), C.INVALID_ARGUMENT),
    P_("predict two inputs", predict({"image": tensor(OTHER[None].astype(np.float32)),
                                      "extra": tensor(np.zeros(1, np.float32))}), C.INVALID_ARGUMENT),
    P_("predict no inputs", predict({}), C.INVALID_ARGUMENT),
    P_("predict empty batch", predict({"image": tensor(np.zeros((0, 32, 32, 3), np.float32))}), C.INVALID_ARGUMENT),
    P_("predict too many images", predict({"image": tensor(np.zeros((MAX_BATCH + 1, 32, 32, 3), np.float32))}),
       C.RESOURCE_EXHAUSTED),
    P_("predict [100000,32,32,3] declared, one float_val", predict({"image": hand_tensor(1, [100000, 32, 32, 3], float_val=[1.0])}),
       C.RESOURCE_EXHAUSTED),
    P_("predict [1,100000,100000,3] declared, one float_val", predict({"image": hand_tensor(1, [1, 100000, 100000, 3], float_val=[1.0])}),
       C.INVALID_ARGUMENT),
    P_("predict negative dim", predict({"image": hand_tensor(1, [1, -32, 32, 3], float_val=[1.0])}), C.INVALID_ARGUMENT),
    P_("predict tensor_content too short", predict({"image": hand_tensor(1, [1, 32, 32, 3], content=b"\x00" * 10)}),
       C.INVALID_ARGUMENT),
    P_("predict unknown dtype enum", predict({"image": hand_tensor(999, [1, 32, 32, 3], content=b"\x00" * 12288)}),
       C.INVALID_ARGUMENT),
    P_("predict DT_INVALID", predict({"image": hand_tensor(0, [1, 32, 32, 3], content=b"\x00" * 12288)}), C.INVALID_ARGUMENT),
    P_("predict unknown model", predict(name="nope"), C.NOT_FOUND),
    P_("predict unknown version", predict(version=99), C.NOT_FOUND),
    P_("predict unknown version label", predict(label="nope"), C.NOT_FOUND),
    P_("predict unknown signature", predict(signature="nope"), C.NOT_FOUND),
    P_("predict no model name", predict(name=""), C.INVALID_ARGUMENT),
    P_("predict model name of 8000 characters", predict(name=LONG_NAME), C.NOT_FOUND),
    P_("predict over-long session id", predict(), C.INVALID_ARGUMENT, md=(("x-session-id", "z" * (MAX_SID + 1)),)),
    P_("predict oversize message", predict({"image": tensor(np.zeros((1, 300, 300, 3), np.float32))}),
       C.RESOURCE_EXHAUSTED, counted=False),
    # ---- unjudged PredictionService methods are refused by default
    Case("TF Classify refused", lambda s: s.predict.Classify(classification_pb2.ClassificationRequest()),
         C.FAILED_PRECONDITION),
    Case("TF Regress refused", lambda s: s.predict.Regress(regression_pb2.RegressionRequest()), C.FAILED_PRECONDITION),
    Case("TF MultiInference refused", lambda s: s.predict.MultiInference(inference_pb2.MultiInferenceRequest()),
         C.FAILED_PRECONDITION),
    Case("metadata of an unknown model", lambda s: s.predict.GetModelMetadata(
        _metadata_request("nope")), C.NOT_FOUND),
    Case("metadata, model name of 8000 characters", lambda s: s.predict.GetModelMetadata(
        _metadata_request(LONG_NAME)), C.NOT_FOUND),
    # ---- malformed protobuf bytes
    R_("raw: garbage to Classify", "/hashguard.v1.Classifier/Classify", b"\xff\xff\xff\xff", C.INVALID_ARGUMENT),
    R_("raw: truncated Classify", "/hashguard.v1.Classifier/Classify", _valid_classify[:-7], C.INVALID_ARGUMENT),
    R_("raw: truncated varint", "/hashguard.v1.Classifier/ClassifyBatch", b"\x08\x80\x80\x80", C.INVALID_ARGUMENT),
    R_("raw: wrong wire type", "/hashguard.v1.Classifier/Classify", b"\x0d\x00\x00\x00\x00", C.INVALID_ARGUMENT),
    R_("raw: invalid UTF-8 session id", "/hashguard.v1.Classifier/Classify", b"\x1a\x02\xc3\x28", C.INVALID_ARGUMENT),
    R_("raw: garbage to Predict", "/tensorflow.serving.PredictionService/Predict", b"\x0a\xff\xff\xff\xff\x0f",
       C.INVALID_ARGUMENT),
    R_("raw: truncated Predict", "/tensorflow.serving.PredictionService/Predict", _valid_predict[: len(_valid_predict) // 2],
       C.INVALID_ARGUMENT),
    R_("raw: garbage to GetModelMetadata", "/tensorflow.serving.PredictionService/GetModelMetadata", b"\xff\x00",
       C.INVALID_ARGUMENT),
    R_("raw: garbage to GetModelStatus", "/tensorflow.serving.ModelService/GetModelStatus", b"\x12\x05ab",
       C.INVALID_ARGUMENT),
]


def _metadata_request(name: str):
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = name
    return req


async def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_bad_input(stack, case):
    before = stack.state()
    counted = stack.errors_counted()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await case.call(stack)
    assert info.value.code() == case.code, info.value.details()
    assert info.value.details()
    assert stack.state() == before  # no session changed, nothing reached the model
    assert stack.errors_counted() == counted + (1 if case.counted else 0)
    health = await stack.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_after_the_corpus_the_anchor_still_answers(stack):
    """Runs after the corpus (file order): the victim's 1-pixel copy is answered from
    the anchor set before it, so no case moved the anchor."""
    copy = IMG.copy()
    copy[5, 7, 1] ^= 0xFF
    calls = stack.backend.calls["predict"]
    resp = await stack.classifier.Classify(classify(encode_raw(copy)))
    assert stack.backend.calls["predict"] == calls
    assert list(resp.result.scores) == stack.anchor_scores
    # and the encoded paths work for good input: a valid PNG and JPEG are forwarded
    for data in (PNG_OK, JPEG_OK):
        await stack.classifier.Classify(classify(encoded(data), session="fresh-" + str(len(data))))
    assert stack.backend.calls["predict"] == calls + 2


@contextlib.asynccontextmanager
async def health_polled(stack):
    """Health checked every 5 ms while the block runs; yields the list of statuses seen."""
    stop, answers = asyncio.Event(), []

    async def poll():
        while not stop.is_set():
            answers.append((await stack.health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status)
            await asyncio.sleep(0.005)

    poller = asyncio.create_task(poll())
    try:
        yield answers
    finally:
        stop.set()
        await poller


async def test_bombs_leave_no_memory_behind_and_health_answers_throughout(stack):
    """PNG and JPEG bombs and a tiny tensor declaring a huge shape, several times each,
    while health is polled: every health check answers SERVING, resident memory grows
    by less than 50 MB, and a garbage collection afterwards frees nothing large (no
    reference cycle holds a buffer)."""
    bombs = [classify(encoded(bad.png_bomb()), model=m) for m in ("m", "dyn")]
    bombs += [classify(encoded(bad.jpeg_declaring(_jpeg, 30000, 30000)), model=m) for m in ("m", "dyn")]
    tensor_bomb = predict({"image": hand_tensor(1, [100000, 32, 32, 3], float_val=[1.0])})
    gc.collect()
    rss0 = bad.rss_mb()
    async with health_polled(stack) as answers:
        for _ in range(3):
            for req in bombs:
                with pytest.raises(grpc.aio.AioRpcError):
                    await stack.classifier.Classify(req)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stack.predict.Predict(tensor_bomb, metadata=(("x-session-id", "victim"),))
            assert info.value.code() == C.RESOURCE_EXHAUSTED
    grown = bad.rss_mb() - rss0
    gc.collect()
    after_gc = bad.rss_mb() - rss0
    assert answers and set(answers) == {health_pb2.HealthCheckResponse.SERVING}
    assert grown < 50, f"RSS grew {grown:.0f} MB"
    assert grown - after_gc < 20, "a garbage collection freed memory the error path kept"


async def test_a_failed_call_keeps_no_arrays_alive(stack):
    """A large valid image whose backend call fails: once the status is sent, nothing of
    the call's pixels stays allocated, even with the garbage collector off (an error
    path whose traceback sits in a reference cycle would keep every failed call's
    images until the next full collection)."""
    import tracemalloc

    from sidecar.errors import BackendUnavailable

    y, x = np.mgrid[:2000, :2000]
    blocks = np.dstack([(x // 100) * 12, (y // 100) * 12, ((x + y) // 200) * 6]).astype(np.uint8)  # 12 MB, a small PNG
    req = classify(encoded(bad.png(blocks)), model="dyn", session="big")
    assert len(req.SerializeToString()) < MAX_MESSAGE
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            stack.backend.fail_with = BackendUnavailable("backend down")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stack.classifier.Classify(req)
            assert info.value.code() == C.UNAVAILABLE
        kept = (tracemalloc.get_traced_memory()[0] - before) / 2**20
    finally:
        tracemalloc.stop()
        gc.enable()
        stack.backend.fail_with = None
    assert kept < 20, f"{kept:.0f} MB of failed calls still allocated"


# --------------------------------------------------------------------------- the REST front door (issue 25)


def _instances(n: int) -> bytes:
    return b'{"instances": [' + b",".join([b"[[[0]]]"] * n) + b"]}"


def _row(img=OTHER) -> str:
    return json.dumps(img.tolist())


@dataclass(frozen=True)
class Rest:
    name: str
    path: str
    body: bytes
    code: int
    headers: tuple = ()
    method: str = "POST"


_DEEP = b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"
REST_CASES = [
    Rest("10^6 tiny instances", "/v1/models/m:predict", _instances(10**6)[:MAX_MESSAGE - 10] + b"]]}", 413),
    Rest("max-batch + 1 instances", "/v1/models/m:predict", _instances(MAX_BATCH + 1), 413),
    Rest("columnar {name: list} with max-batch + 1 images", "/v1/models/m:predict",
         b'{"inputs": {"image": [' + b",".join([b"[[[0]]]"] * (MAX_BATCH + 1)) + b"]}}", 413),
    Rest("gzip bomb: 1 MiB inflating to 1 GiB", "/v1/models/m:predict", bad.gzip_bomb(1 << 30), 413,
         (("Content-Encoding", "gzip"),)),
    Rest("deflate bomb: inflating to 1 GiB", "/v1/models/m:predict", bad.zeros_zlib(1 << 30), 413,
         (("Content-Encoding", "deflate"),)),
    Rest("Content-Encoding br", "/v1/models/m:predict", b"\x0b\x00\x80{}\x03", 400, (("Content-Encoding", "br"),)),
    Rest("Content-Encoding gzip, gzip", "/v1/models/m:predict", gzip.compress(gzip.compress(b"{}")), 400,
         (("Content-Encoding", "gzip, gzip"),)),
    Rest("Content-Encoding gzip, not gzip data", "/v1/models/m:predict", b'{"instances": []}', 400,
         (("Content-Encoding", "gzip"),)),
    Rest("gzip data cut short", "/v1/models/m:predict", gzip.compress(b'{"instances": [[[[1]]]]}')[:-12], 400,
         (("Content-Encoding", "gzip"),)),
    Rest("b64 PNG 32x32 whose image data inflates to 512 MiB", "/v1/models/m:predict",
         json.dumps({"instances": [{"b64": base64.b64encode(IDAT_BOMB).decode()}]}).encode(), 400),
    Rest("JSON nested 5000 deep", "/v1/models/m:predict", _DEEP, 400),
    Rest("a 5000-digit integer", "/v1/models/m:predict", b'{"instances": [[[[' + b"9" * 5000 + b"]]]]}", 400),
    Rest("1e400", "/v1/models/m:predict", b'{"instances": [[[[1e400]]]]}', 400),
    Rest("-1e400", "/v1/models/m:predict", b'{"instances": [[[[-1e400]]]]}', 400),
    Rest("Infinity", "/v1/models/m:predict", b'{"instances": [[[[Infinity]]]]}', 400),
    Rest("brackets inside a string are not nesting", "/v1/models/m:predict",
         b'{"signature_name": "' + b"[" * 5000 + b'", "instances": [' + _row().encode() + b"]}", 404),
    Rest("escaped quote, then nesting 5000 deep", "/v1/models/m:predict",
         b'{"signature_name": "a\\"", "instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    Rest("model name of 8000 characters: predict", f"/v1/models/{LONG_NAME}:predict",
         ('{"instances": [%s]}' % _row()).encode(), 404),
    Rest("model name of 8000 characters: status", f"/v1/models/{LONG_NAME}", b"", 404, method="GET"),
    Rest("model name of 8000 characters: metadata", f"/v1/models/{LONG_NAME}/metadata", b"", 404, method="GET"),
    Rest("an unknown HTTP method", "/v1/models/m", b"", 404, method="PROPFIND"),
]


async def rest_call(stack, case: Rest, timeout: float = 30.0) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.request(case.method, f"http://127.0.0.1:{stack.server.rest.port}{case.path}",
                                    content=case.body, headers={"X-Session-Id": "victim", **dict(case.headers)})


async def test_the_rest_corpus_is_distinct():
    assert len({c.name for c in REST_CASES}) == len(REST_CASES)
    assert all(len(c.body) <= MAX_MESSAGE for c in REST_CASES)  # each reaches the handler, not aiohttp's limit


@pytest.mark.parametrize("case", REST_CASES, ids=lambda c: c.name)
async def test_rest_bad_input(stack, case, caplog):
    before = stack.state()
    counted = stack.errors_counted()
    r = await rest_call(stack, case)
    assert r.status_code == case.code, r.text[:300]
    assert isinstance(r.json().get("error"), str) and r.json()["error"]
    assert stack.state() == before
    assert stack.errors_counted() == counted + 1
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"
    health = await stack.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_unknown_http_method_is_one_label(stack):
    text = _exposition(stack.server)
    assert 'method="rest:PROPFIND"' not in text and 'method="rest:other"' in text


async def test_hostile_rest_bodies_leave_no_memory_behind_and_health_answers_throughout(stack):
    heavy = [c for c in REST_CASES if len(c.body) > 100_000]
    assert len(heavy) >= 4
    gc.collect()
    rss0 = bad.rss_mb()
    async with health_polled(stack) as answers:
        for _ in range(3):
            for case in heavy:
                assert (await rest_call(stack, case)).status_code == case.code
    grown = bad.rss_mb() - rss0
    assert answers and set(answers) == {health_pb2.HealthCheckResponse.SERVING}
    assert grown < 50, f"RSS grew {grown:.0f} MB"


# --------------------------------------------------------------------------- metric labels


def _exposition(server) -> str:
    from prometheus_client import generate_latest

    return generate_latest(server.metrics.registry).decode()


async def test_unknown_model_names_never_become_metric_labels(stack):
    names = [f"made-up-{i}" for i in range(50)]
    for name in names:
        for call in (lambda name=name: stack.classifier.Classify(classify(encode_raw(OTHER), model=name)),
                     lambda name=name: stack.predict.Predict(predict(name=name), metadata=(("x-session-id", "victim"),)),
                     lambda name=name: stack.predict.GetModelMetadata(_metadata_request(name))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == C.NOT_FOUND
        for path in (f"/v1/models/{name}", f"/v1/models/{name}/metadata"):
            assert (await rest_call(stack, Rest("", path, b"", 404, method="GET"))).status_code == 404
    text = _exposition(stack.server)
    assert not [n for n in names if n in text]
    assert 'model="_unknown"' in text
    ok = await stack.predict.GetModelMetadata(_metadata_request("m"))  # a served model keeps its own label
    assert ok.model_spec.name == "m" and 'method="GetModelMetadata",mode="paper",model="m"' in _exposition(stack.server)


# --------------------------------------------------------------------------- backend NOT_FOUND


async def test_a_backend_not_found_names_only_what_was_asked():
    from sidecar.backend.base import ModelRef
    from sidecar.errors import from_backend, status_of

    err = grpc.aio.AioRpcError(C.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="Servable not found for request: Latest(nope): no model named 'nope' "
                                       "(models served: secret-a, secret-b)")
    for spec, want in ((ModelRef("nope"), "Latest(nope)"), (ModelRef("m", 7), "Specific(m, 7)"),
                       (ModelRef("m", 0, "canary"), "Labeled(m, canary)"), (None, "")):
        code, message = status_of(from_backend(err, spec))
        assert code == C.NOT_FOUND and "secret" not in message and want in message


async def test_the_model_server_does_not_list_its_models():
    from serving.errors import ModelNotFound
    from serving.registry import ModelRegistry
    from sidecar.wire.tfapi import model_pb2

    registry = ModelRegistry([])
    registry._servables["secret-a"] = {1: object()}
    with pytest.raises(ModelNotFound) as info:
        registry.resolve(model_pb2.ModelSpec(name="nope"))
    assert "secret" not in str(info.value)


# --------------------------------------------------------------------------- abandoned calls


async def test_a_call_its_client_abandoned_is_not_forwarded_and_changes_nothing(stack):
    from sidecar.errors import Abandoned
    from sidecar.plane.dataplane import ImageCall
    from sidecar.plane.images import Arrays
    from sidecar.plane.identity import Caller
    from sidecar.backend.base import ModelRef

    for reason in ("deadline", "cancelled"):
        before = stack.state()
        call = ImageCall("Classify", ModelRef("m"), Arrays([OTHER]), Caller(None, "victim", gone=lambda r=reason: r))
        with pytest.raises(Abandoned) as info:
            await stack.server.plane.infer(call)
        assert status_of_name(info.value) == ("DEADLINE_EXCEEDED" if reason == "deadline" else "CANCELLED")
        assert stack.state() == before


def status_of_name(exc) -> str:
    from sidecar.errors import status_of

    return status_of(exc)[0].name


async def _counted(stack, method: str, code: str, at_least: float) -> float:
    for _ in range(200):
        value = stack.server.metrics.registry.get_sample_value(
            "hashguard_errors_total", {"method": method, "code": code}) or 0.0
        if value >= at_least:
            return value
        await asyncio.sleep(0.025)
    return value


async def test_deadlines_and_cancellations_are_counted_and_a_waiting_call_is_not_forwarded(stack):
    """A slow forward holds the session; a second call of that session whose deadline
    passes while it waits is never forwarded. Both deadlines, and a cancellation, are
    counted in hashguard_errors_total."""
    get = lambda code: stack.server.metrics.registry.get_sample_value(  # noqa: E731
        "hashguard_errors_total", {"method": "Classify", "code": code}) or 0.0
    deadline0, cancelled0 = get("DEADLINE_EXCEEDED"), get("CANCELLED")
    stack.backend.delay_s = 0.5
    try:
        calls = stack.backend.calls["predict"]
        first = asyncio.ensure_future(stack.classifier.Classify(
            classify(encode_raw(OTHER), session="slow"), timeout=30))  # holds the session 0.5 s, answers
        while stack.backend.calls["predict"] == calls:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # waits for the session, its deadline passes
            await stack.classifier.Classify(classify(encode_raw(IMG), session="slow"), timeout=0.1)
        assert info.value.code() == C.DEADLINE_EXCEEDED
        await first
        assert await _counted(stack, "Classify", "DEADLINE_EXCEEDED", deadline0 + 1) == deadline0 + 1
        assert stack.backend.calls["predict"] == calls + 1  # the waiting call was not forwarded
        with pytest.raises(grpc.aio.AioRpcError) as info:  # forwarded, then its deadline passes: counted too
            await stack.classifier.Classify(classify(encode_raw(with_value(7.0)), session="slow3"), timeout=0.2)
        assert info.value.code() == C.DEADLINE_EXCEEDED
        assert await _counted(stack, "Classify", "DEADLINE_EXCEEDED", deadline0 + 2) == deadline0 + 2
        calls = stack.backend.calls["predict"]
        third = stack.classifier.Classify(classify(encode_raw(IMG), session="slow2"))
        while stack.backend.calls["predict"] == calls:
            await asyncio.sleep(0.01)
        third.cancel()
        assert await _counted(stack, "Classify", "CANCELLED", cancelled0 + 1) == cancelled0 + 1
    finally:
        stack.backend.delay_s = 0.0
    await asyncio.sleep(0.6)  # the abandoned forwards finish before the next test


# --------------------------------------------------------------------------- connections


async def _server(**kw) -> SidecarServer:
    settings = Settings(backend="127.0.0.1:1", host="127.0.0.1", port=0, metrics_port=0, rest_port=free_port(),
                        padding="off", score_noise=0.0, score_precision=0, **kw)
    server = SidecarServer(settings, backend=FakeBackend())
    await server.start()
    return server


async def _closed(reader: asyncio.StreamReader, within: float = 20.0) -> bytes:
    """Everything the server sent until it closed the connection."""
    return await asyncio.wait_for(reader.read(), within)


async def test_a_request_head_or_body_that_never_ends_is_cut_off():
    server = await _server(http_idle_timeout_s=0.3, http_body_timeout_s=0.3)
    port = server.rest.port
    try:
        # 1. never sends anything; 2. stops in the middle of its head
        idle = await asyncio.open_connection("127.0.0.1", port)
        head = await asyncio.open_connection("127.0.0.1", port)
        head[1].write(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert await _closed(idle[0]) == b""
        assert await _closed(head[0]) == b""
        # 3. a chunked body that never ends: 408, counted, connection closed
        body = await asyncio.open_connection("127.0.0.1", port)
        body[1].write(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\n{\"ins\r\n")
        answer = await _closed(body[0])
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert server.metrics.registry.get_sample_value(
            "hashguard_errors_total", {"method": "rest:POST", "code": "DEADLINE_EXCEEDED"}) == 1
        for _, writer in (idle, head, body):
            writer.close()
    finally:
        await server.stop(0)


async def test_at_the_connection_cap_the_oldest_idle_connection_makes_room():
    server = await _server(max_connections=4, http_idle_timeout_s=60)
    port = server.rest.port
    try:
        assert server.connection_cap == 4
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(f"http://127.0.0.1:{port}/v1/models/m")
        assert r.status_code == 200
        assert await _closed(idle[0][0]) == b""  # the oldest went
        for reader, _ in idle[1:3]:  # the newer ones are still open
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.2)
        for _, writer in idle:
            writer.close()
    finally:
        await server.stop(0)


async def test_a_compressed_body_meets_authentication_before_its_size_limit(tmp_path):
    """Without a token a gzip bomb is 401; with one it is 413 (inflated, bounded, after
    authentication). What the bomb costs the event loop is measured in bench_bombs."""
    tokens = tmp_path / "tokens"
    tokens.write_text("t-alice alice\n")
    server = await _server(auth_tokens=str(tokens), max_message_bytes=MAX_MESSAGE)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"http://127.0.0.1:{server.rest.port}/v1/models/m:predict"
            for auth, code in (({}, 401), ({"Authorization": "Bearer t-alice"}, 413)):
                r = await client.post(url, content=bad.gzip_bomb(1 << 30),
                                      headers={"Content-Encoding": "gzip", **auth})
                assert r.status_code == code, r.text
    finally:
        await server.stop(0)


async def test_the_file_descriptor_limit_is_raised_and_the_caps_fit_below_it():
    import resource

    from sidecar.transport.connections import RESERVED_FDS, connection_cap, raise_nofile

    soft = raise_nofile()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or soft == hard
    cap = connection_cap(10**9, soft)
    assert 2 * cap + RESERVED_FDS <= soft
