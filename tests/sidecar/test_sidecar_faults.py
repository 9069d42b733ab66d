"""Bad input and backend faults: clear statuses and no change to any session."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from sidecar.testing import FakeBackend, FakeModel, FakeServing
from sidecar.wire.tfapi import predict_pb2, prediction_service_pb2_grpc

from conftest import free_port
from servers import ServingProcess
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.wire.messages import encode_raw
from sidecar.wire.tensors import to_proto
from fake_sidecar import snapshot
from real_sidecar import channel, classify_req, perturb, start_sidecar

pytestmark = pytest.mark.integration


@pytest.fixture
async def guarded(backend):  # noqa: F811
    server = await start_sidecar(backend.target, max_message_bytes=1 << 20, max_session_id_len=64)
    yield server
    await server.stop(0)


def raw(pixels: bytes, h=32, w=32, c=3, dtype=pb.DTYPE_UINT8) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=h, width=w, channels=c, dtype=dtype))


def bad_requests(img):
    nan = img.astype(np.float32)
    nan[0, 0, 0] = np.nan
    inf = img.astype(np.float32)
    inf[3, 3, 1] = np.inf
    ok = encode_raw(img)
    ref = pb.ModelRef(name="tiny")
    return {
        "wrong shape": (pb.ClassifyRequest(model=ref, image=encode_raw(img[:16, :16]), session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "byte count vs dtype": (pb.ClassifyRequest(model=ref, image=raw(img.tobytes(), dtype=pb.DTYPE_FLOAT32), session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "channels": (pb.ClassifyRequest(model=ref, image=raw(img.tobytes()[:2048], c=2), session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "non-image bytes": (pb.ClassifyRequest(model=ref, image=pb.Image(encoded=b"GIF89a not really"), session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "nan": (pb.ClassifyRequest(model=ref, image=encode_raw(nan), session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "inf": (pb.ClassifyRequest(model=ref, image=encode_raw(inf), session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "empty image": (pb.ClassifyRequest(model=ref, image=raw(b"", h=0, w=0), session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "no image": (pb.ClassifyRequest(model=ref, session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "unknown model": (pb.ClassifyRequest(model=pb.ModelRef(name="nope"), image=ok, session_id="victim"), grpc.StatusCode.NOT_FOUND),
        "unknown version": (pb.ClassifyRequest(model=pb.ModelRef(name="tiny", version=99), image=ok, session_id="victim"), grpc.StatusCode.NOT_FOUND),
        "unknown signature": (pb.ClassifyRequest(model=pb.ModelRef(name="tiny", signature_name="nope"), image=ok, session_id="victim"), grpc.StatusCode.NOT_FOUND),
        "no model name": (pb.ClassifyRequest(image=ok, session_id="victim"), grpc.StatusCode.INVALID_ARGUMENT),
        "over-long session id": (pb.ClassifyRequest(model=ref, image=ok, session_id="x" * 65), grpc.StatusCode.INVALID_ARGUMENT),
        "oversize message": (pb.ClassifyRequest(model=ref, image=encode_raw(np.zeros((700, 700, 3), np.uint8)), session_id="victim"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    }


async def test_bad_input_gets_clear_status_and_changes_no_session(guarded, test_images):
    img = test_images[20]
    async with channel(guarded) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        anchor_resp = await stub.Classify(classify_req(img, session="victim"))
        await stub.Classify(classify_req(test_images[21], session="bystander"))
        before = snapshot(guarded)
        for name, (req, code) in bad_requests(perturb(test_images[22], 0)).items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Classify(req)
            assert info.value.code() == code, name
            assert info.value.details(), name  # a message a person can read
            assert snapshot(guarded) == before, name
        # the victim's anchor still answers its perturbed copies
        again = await stub.Classify(classify_req(perturb(img, 1), session="victim"))
        assert again.result.scores == anchor_resp.result.scores


async def test_bad_image_inside_batch_rejects_the_whole_batch(guarded, test_images):
    img = test_images[23]
    async with channel(guarded) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        req = pb.ClassifyBatchRequest(model=pb.ModelRef(name="tiny"), session_id="batch",
                                      images=[encode_raw(img), pb.Image(encoded=b"junk")])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ClassifyBatch(req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1" in info.value.details()
    assert snapshot(guarded) == {}


async def test_missing_session_is_rejected_when_required(backend, test_images):  # noqa: F811
    server = await start_sidecar(backend.target, require_session=True)
    try:
        async with channel(server) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.ClassifierStub(ch).Classify(classify_req(test_images[0], session=""))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session" in info.value.details()
        assert snapshot(server) == {}
    finally:
        await server.stop(0)


async def test_proxy_rejects_bad_tensors(guarded, test_images):
    def call(arr, name="image"):
        with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as ch:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = "tiny"
            req.inputs[name].CopyFrom(to_proto(arr))
            return prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(req, timeout=30, metadata=[("x-session-id", "p")])

    nan = test_images[:1].astype(np.float32)
    nan[0, 1, 1, 1] = np.nan
    cases = [
        (nan, "image", grpc.StatusCode.INVALID_ARGUMENT),
        (test_images[:1].astype(np.float64), "image", grpc.StatusCode.INVALID_ARGUMENT),
        (test_images[:1, :8].astype(np.float32), "image", grpc.StatusCode.INVALID_ARGUMENT),
        (test_images[:1].astype(np.float32), "pixels", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for arr, name, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(call, arr, name)
        assert info.value.code() == code
    assert snapshot(guarded) == {}


async def slow_serving(delay_s: float) -> FakeServing:
    """The official fake over gRPC, answering Predict only after ``delay_s``."""
    fake = FakeBackend({"tiny": FakeModel(versions=(1,), labels={})})
    fake.delay_s = delay_s
    return await FakeServing(fake).start()


async def test_backend_timeout_is_deadline_exceeded_without_state_change(test_images):
    slow = await slow_serving(5.0)
    server = await start_sidecar(slow.target, backend_timeout_s=0.3)
    try:
        async with channel(server) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.ClassifierStub(ch).Classify(classify_req(test_images[0]))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert snapshot(server) == {}
    finally:
        await server.stop(0)
        await slow.stop(0)


async def test_graceful_shutdown_drains_in_flight_calls(test_images):
    slow = await slow_serving(0.8)
    server = await start_sidecar(slow.target)
    try:
        async with channel(server) as ch:
            call = asyncio.ensure_future(pb_grpc.ClassifierStub(ch).Classify(classify_req(test_images[0])))
            await asyncio.sleep(0.3)  # the call is waiting on the backend
            await server.stop(5.0)
            resp = await call
        assert len(resp.result.scores) == 10 and resp.result.label == int(np.argmax(resp.result.scores))
        assert slow.backend.calls["predict"] == 1
    finally:
        await slow.stop(0)


async def wait_health(server, want, timeout_s=30.0):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with channel(server) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            st = (await stub.Check(health_pb2.HealthCheckRequest())).status
            if st == want:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"health stayed {st}, wanted {want}")
            await asyncio.sleep(0.1)


async def test_backend_down_is_unavailable_and_sidecar_recovers(model_base, tmp_path, test_images):
    from grpc_health.v1 import health_pb2

    port = free_port()
    serving = ServingProcess(model_base, ["tiny"], port=port, tmp=tmp_path)
    await asyncio.to_thread(serving.start)
    server = await start_sidecar(serving.target)
    img = test_images[30]
    try:
        await wait_health(server, health_pb2.HealthCheckResponse.SERVING)
        async with channel(server) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            first = await stub.Classify(classify_req(img, session="s"))
            before = snapshot(server)
            await asyncio.to_thread(serving.stop)
            await wait_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Classify(classify_req(test_images[31], session="s"))  # would forward
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert snapshot(server) == before
            await asyncio.to_thread(serving.start)
            await wait_health(server, health_pb2.HealthCheckResponse.SERVING)
            again = await stub.Classify(classify_req(test_images[31], session="s"))
            assert again.result.scores != first.result.scores
            assert snapshot(server) != before  # the new image is the anchor now
    finally:
        await server.stop(0)
        await asyncio.to_thread(serving.stop)
