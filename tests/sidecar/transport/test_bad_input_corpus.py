"""The bad-input corpus: hostile and careless requests over the gRPC Classifier API,
the PredictionService/ModelService proxy and raw malformed bytes.

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
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import badinput as bad
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.config import Settings
from sidecar.wire.images import encode_raw
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
    settings = Settings(backend="127.0.0.1:1", host="127.0.0.1", port=0, metrics_port=0, rest_port=0,
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
    # ---- a model of any height and width: the pixel limit refuses bombs
    C_("dyn: PNG bomb 20000x20000", classify(encoded(bad.png_bomb()), model="dyn"), C.RESOURCE_EXHAUSTED),
    C_("dyn: PNG declaring 65536x65536", classify(encoded(bad.png_bomb(65536, 65536, rows=1)), model="dyn"),
       C.RESOURCE_EXHAUSTED),
    C_("dyn: JPEG bomb 30000x30000", classify(encoded(bad.jpeg_declaring(_jpeg, 30000, 30000)), model="dyn"),
       C.RESOURCE_EXHAUSTED),
    C_("dyn: raw 5000x5000 declared, tiny payload", classify(raw_image(b"\x00" * 16, h=5000, w=5000), model="dyn"),
       C.RESOURCE_EXHAUSTED),
    C_("dyn: raw 1x5000 (side limit)", classify(raw_image(b"\x00" * 15000, h=1, w=5000), model="dyn"), C.RESOURCE_EXHAUSTED),
    C_("dyn: grayscale raw for an RGB model", classify(encode_raw(OTHER[:, :, :1]), model="dyn"), C.INVALID_ARGUMENT),
    # ---- Classifier.Classify: model, session, size
    C_("unknown model", classify(encode_raw(OTHER), model="nope"), C.NOT_FOUND),
    C_("unknown version", classify(encode_raw(OTHER), version=99), C.NOT_FOUND),
    C_("unknown signature", classify(encode_raw(OTHER), signature_name="nope"), C.NOT_FOUND),
    C_("no model name", classify(encode_raw(OTHER), model=""), C.INVALID_ARGUMENT),
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
    stop = asyncio.Event()
    answers = []

    async def poll_health():
        while not stop.is_set():
            answers.append((await stack.health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status)
            await asyncio.sleep(0.005)

    poller = asyncio.create_task(poll_health())
    for _ in range(3):
        for req in bombs:
            with pytest.raises(grpc.aio.AioRpcError):
                await stack.classifier.Classify(req)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.predict.Predict(tensor_bomb, metadata=(("x-session-id", "victim"),))
        assert info.value.code() == C.RESOURCE_EXHAUSTED
    stop.set()
    await poller
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
