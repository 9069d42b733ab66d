"""The sidecar over real gRPC on loopback, with `python -m serving` as the backend."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.plane.dataplane import session_key
from sidecar.backend.base import ModelKey
from sidecar.wire.messages import encode_raw
from real_sidecar import BackendCounter, channel, classify_req, direct_scores, perturb, start_sidecar

pytestmark = pytest.mark.integration


@pytest.fixture
async def sidecar(backend):
    server = await start_sidecar(backend.target)
    yield server
    await server.stop(0)


async def test_scripted_attack_sequence(sidecar, backend, test_images):
    a, b = test_images[0], test_images[1]
    seq = [a, perturb(a, 1), perturb(a, 3), perturb(a, 5), b, perturb(b, 1), perturb(b, 5), a]
    expect_from = [0, 0, 0, 0, 4, 4, 4, 7]  # index of the image whose model answer is returned
    counter = BackendCounter(sidecar)
    truth = direct_scores(backend.target, np.stack(seq))
    async with channel(sidecar) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        got = [await stub.Classify(classify_req(img)) for img in seq]
    assert counter.calls == 3 and counter.images == 3
    for resp, src in zip(got, expect_from):
        np.testing.assert_allclose(resp.result.scores, truth[src], atol=1e-5)
        assert resp.result.label == int(np.argmax(truth[src]))
        assert resp.model_name == "tiny" and resp.model_version == 2
    # anchor after the sequence: the last forwarded image, a (keyed by the served version, 2)
    anchors = sidecar.plane.store.peek(session_key("s:attacker", ModelKey("tiny", 2)))
    assert len(anchors) == 1 and np.array_equal(anchors[0].fingerprint.image, a)


async def test_batch_is_judged_in_order_with_one_backend_call(sidecar, backend, test_images):
    a, b = test_images[2], test_images[3]
    seq = [a, perturb(a, 1), b, perturb(b, 3), perturb(a, 1)]
    counter = BackendCounter(sidecar)
    truth = direct_scores(backend.target, np.stack(seq))
    async with channel(sidecar) as ch:
        resp = await pb_grpc.ClassifierStub(ch).ClassifyBatch(
            pb.ClassifyBatchRequest(model=pb.ModelRef(name="tiny"), images=[encode_raw(x) for x in seq], session_id="b"))
    assert counter.calls == 1 and counter.images == 3  # a, b, and a's copy after b replaced the anchor
    for r, src in zip(resp.results, [0, 0, 2, 2, 4]):
        np.testing.assert_allclose(r.scores, truth[src], atol=1e-5)


async def test_stream_judges_in_order(sidecar, test_images):
    a = test_images[4]
    counter = BackendCounter(sidecar)

    async def requests():
        for img in [a, perturb(a, 2), perturb(a, 4)]:
            yield classify_req(img, session="stream")

    async with channel(sidecar) as ch:
        out = [r async for r in pb_grpc.ClassifierStub(ch).ClassifyStream(requests())]
    assert len(out) == 3 and counter.calls == 1
    assert out[0].result.scores == out[1].result.scores == out[2].result.scores


async def test_sessions_are_isolated_and_metadata_identifies_them(sidecar, test_images):
    a = test_images[5]
    counter = BackendCounter(sidecar)
    async with channel(sidecar) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        req = pb.ClassifyRequest(model=pb.ModelRef(name="tiny"), image=encode_raw(a))
        await stub.Classify(req, metadata=[("x-session-id", "one")])
        await stub.Classify(req, metadata=[("x-session-id", "two")])
        await stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name="tiny"), image=encode_raw(perturb(a, 1))),
                            metadata=[("x-session-id", "one")])
    assert counter.calls == 2  # each new session forwards once; the perturbed copy is cached


async def test_prediction_service_proxy_with_stock_client(sidecar, backend, test_images):
    """The stock client: tensorflow-serving-api's stubs and TF's own tensor conversion."""
    import tensorflow as tf
    from tensorflow_serving.apis import get_model_metadata_pb2 as stock_md
    from tensorflow_serving.apis import predict_pb2 as stock_predict
    from tensorflow_serving.apis import prediction_service_pb2_grpc as stock_grpc

    a = test_images[6:8]
    truth = direct_scores(backend.target, a)
    counter = BackendCounter(sidecar)

    def call(images):
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            req = stock_predict.PredictRequest()
            req.model_spec.name = "tiny"
            req.inputs["image"].CopyFrom(tf.make_tensor_proto(images.astype(np.float32)))
            return stock_grpc.PredictionServiceStub(ch).Predict(req, timeout=30, metadata=[("x-session-id", "proxy")])

    resp = await asyncio.to_thread(call, a)
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["scores"]), truth, atol=1e-5)
    assert resp.model_spec.name == "tiny" and resp.model_spec.version.value == 2
    resp2 = await asyncio.to_thread(call, np.stack([perturb(a[1], 1)]))
    np.testing.assert_allclose(tf.make_ndarray(resp2.outputs["scores"])[0], truth[1], atol=1e-5)
    assert counter.calls == 1  # the second Predict was answered from the anchor

    def metadata():
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            req = stock_md.GetModelMetadataRequest(metadata_field=["signature_def"])
            req.model_spec.name = "tiny"
            return stock_grpc.PredictionServiceStub(ch).GetModelMetadata(req, timeout=30)

    md = await asyncio.to_thread(metadata)
    assert md.model_spec.name == "tiny"


async def test_mode_off_forwards_everything(backend, test_images):
    server = await start_sidecar(backend.target, mode="off")
    try:
        counter = BackendCounter(server)
        a = test_images[9]
        async with channel(server) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            await stub.Classify(classify_req(a))
            await stub.Classify(classify_req(perturb(a, 1)))
        assert counter.calls == 2  # the perturbed copy reached the model too
        assert server.metrics.registry.get_sample_value("hashguard_mode", {"mode": "off"}) == 1
    finally:
        await server.stop(0)


async def test_health_and_reflection(sidecar):
    async with channel(sidecar) as ch:
        for _ in range(40):
            st = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            if st.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert st.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        async def one():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(one()):
            names |= {s.name for s in r.list_services_response.service}
        assert {"hashguard.v1.Classifier", "tensorflow.serving.PredictionService", "grpc.health.v1.Health"} <= names


async def test_metrics_count_forwards_and_cache_answers(sidecar, test_images):
    a = test_images[10]
    async with channel(sidecar) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for img in [a, perturb(a, 1), perturb(a, 2)]:
            await stub.Classify(classify_req(img, session="m"))
    reg = sidecar.metrics.registry
    assert reg.get_sample_value("hashguard_forwards_total", {"model": "tiny", "mode": "paper"}) == 1
    assert reg.get_sample_value("hashguard_cache_answers_total", {"model": "tiny", "mode": "paper", "source": "session"}) == 2
    assert reg.get_sample_value("hashguard_mode", {"mode": "paper"}) == 1


async def test_rest_predict_over_a_real_model_equals_grpc_and_the_model(backend, test_images):
    import httpx

    from conftest import free_port

    server = await start_sidecar(backend.target, rest_port=free_port())
    try:
        imgs = test_images[40:42]
        truth = direct_scores(backend.target, imgs)
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"http://127.0.0.1:{server.rest.port}/v1/models/tiny"
            row = await client.post(url + ":predict", json={"instances": imgs.tolist()}, headers={"X-Session-Id": "r1"})
            col = await client.post(url + "/versions/2:predict", json={"inputs": imgs.tolist()},
                                    headers={"X-Session-Id": "r2"})
            status = await client.get(url)
            meta = await client.get(url + "/metadata")
        np.testing.assert_allclose(np.float32(row.json()["predictions"]), truth, atol=1e-5)
        np.testing.assert_array_equal(np.float32(col.json()["outputs"]), np.float32(row.json()["predictions"]))
        assert [int(s["version"]) for s in status.json()["model_version_status"]] == [2]  # latest-only policy
        assert "image" in meta.json()["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    finally:
        await server.stop(0)
