"""Routing and authentication through the real gRPC server over the official
FakeBackend: every method of every service authenticates first; nothing that
makes the model compute on caller input passes unjudged; anchors and the
cross-session index are keyed by the version that answers; malformed protobuf
is INVALID_ARGUMENT and counted."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fake_sidecar import errors_counted, grpc_channel, image, one_pixel, snapshot, start_fake_sidecar
from sidecar.api import classifier_pb2 as pb
from sidecar.wire.messages import encode_raw
from sidecar.wire.tensors import to_ndarray, to_proto
from sidecar.testing import FakeBackend
from sidecar.wire.tfapi import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

PS = "/tensorflow.serving.PredictionService/"
MS = "/tensorflow.serving.ModelService/"
CL = "/hashguard.v1.Classifier/"


def predict_req(images: np.ndarray, version: int = 0, label: str = "", name: str = "m") -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version:
        req.model_spec.version.value = version
    if label:
        req.model_spec.version_label = label
    req.inputs["image"].CopyFrom(to_proto(np.asarray(images, np.float32)))
    return req


def unary_requests() -> dict[str, bytes]:
    """One valid request per unary method of every served service (serialized)."""
    img = image(1)
    spec = lambda msg: (setattr(msg.model_spec, "name", "m"), msg)[1]  # noqa: E731
    return {
        PS + "Predict": predict_req(img[None]).SerializeToString(),
        PS + "GetModelMetadata": get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec={"name": "m"}, metadata_field=["signature_def"]).SerializeToString(),
        PS + "Classify": spec(classification_pb2.ClassificationRequest()).SerializeToString(),
        PS + "Regress": spec(regression_pb2.RegressionRequest()).SerializeToString(),
        PS + "MultiInference": inference_pb2.MultiInferenceRequest().SerializeToString(),
        MS + "GetModelStatus": spec(get_model_status_pb2.GetModelStatusRequest()).SerializeToString(),
        MS + "HandleReloadConfigRequest": b"",
        CL + "Classify": pb.ClassifyRequest(model=pb.ModelRef(name="m"), image=encode_raw(img)).SerializeToString(),
        CL + "ClassifyBatch": pb.ClassifyBatchRequest(model=pb.ModelRef(name="m"),
                                                      images=[encode_raw(img)]).SerializeToString(),
    }


async def call(ch: grpc.aio.Channel, method: str, body: bytes, metadata=()):
    return await ch.unary_unary(method)(body, metadata=metadata, timeout=10)


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("t-alice alice\n")
    return str(path)


async def test_every_method_without_a_valid_token_is_unauthenticated_and_reaches_no_backend(tokens):
    backend = FakeBackend()
    server = await start_fake_sidecar(backend, auth_tokens=tokens, passthrough="classify,regress,multi_inference,reload_config")
    try:
        async with grpc_channel(server) as ch:
            for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "Basic dDp4"),)):
                for method, body in unary_requests().items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(ch, method, body, md)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
                stream = ch.stream_stream(CL + "ClassifyStream")(iter([unary_requests()[CL + "Classify"]]), metadata=md)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stream:
                        pass
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # malformed bytes without a token: authentication still comes first
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(ch, PS + "Predict", b"\xff\xff\xff", md)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert sum(backend.calls.values()) == 0 and backend.images == 0
            assert snapshot(server) == {}
            # health stays open
            st = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert st.status == health_pb2.HealthCheckResponse.SERVING
            # with the token every method works, and the session is the principal
            ok = (("authorization", "Bearer t-alice"),)
            for method, body in unary_requests().items():
                await call(ch, method, body, ok)
            assert backend.calls["GetModelMetadata"] == 1 and backend.calls["GetModelStatus"] == 1
            assert backend.calls["Classify"] == 1 and backend.calls["Regress"] == 1
            assert all(k.startswith("u:alice") for k in snapshot(server))
    finally:
        await server.stop(0)


async def test_unjudged_methods_are_refused_by_default_and_reach_no_backend():
    backend = FakeBackend()
    server = await start_fake_sidecar(backend)
    try:
        async with grpc_channel(server) as ch:
            reqs = unary_requests()
            for method, flag in (("Classify", "classify"), ("Regress", "regress"),
                                 ("MultiInference", "multi_inference")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(ch, PS + method, reqs[PS + method])
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, method
                assert f"--passthrough {flag}" in info.value.details() and "unjudged" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch, MS + "HandleReloadConfigRequest", b"")
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert sum(backend.calls.values()) == 0
            # metadata and status pass through
            md = get_model_metadata_pb2.GetModelMetadataResponse.FromString(
                await call(ch, PS + "GetModelMetadata", reqs[PS + "GetModelMetadata"]))
            assert md.model_spec.name == "m" and md.model_spec.version.value == 2
            status = get_model_status_pb2.GetModelStatusResponse.FromString(
                await call(ch, MS + "GetModelStatus", reqs[MS + "GetModelStatus"]))
            assert sorted(s.version for s in status.model_version_status) == [1, 2]
            assert backend.calls["predict"] == 0
    finally:
        await server.stop(0)


async def test_passthrough_flag_allows_only_the_named_methods():
    backend = FakeBackend()
    server = await start_fake_sidecar(backend, passthrough="classify")
    try:
        async with grpc_channel(server) as ch:
            reqs = unary_requests()
            await call(ch, PS + "Classify", reqs[PS + "Classify"])
            assert backend.calls["Classify"] == 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch, PS + "Regress", reqs[PS + "Regress"])
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert backend.calls["Regress"] == 0
    finally:
        await server.stop(0)


async def predict(ch, images, session, **kw) -> predict_pb2.PredictResponse:
    raw = await call(ch, PS + "Predict", predict_req(images, **kw).SerializeToString(), (("x-session-id", session),))
    return predict_pb2.PredictResponse.FromString(raw)


@pytest.mark.parametrize("mode", ["paper", "hardened"])
async def test_label_and_number_copies_of_a_latest_anchor_are_answered_from_it(mode):
    backend = FakeBackend()  # versions 1, 2; labels stable=1, canary=2; latest = 2
    server = await start_fake_sidecar(backend, mode=mode)
    a = image(7)
    try:
        async with grpc_channel(server) as ch:
            first = await predict(ch, a[None], "s")
            assert backend.calls["predict"] == 1 and first.model_spec.version.value == 2
            anchor = to_ndarray(first.outputs["scores"])[0]
            copies = [await predict(ch, one_pixel(a, 1)[None], "s", label="canary"),
                      await predict(ch, one_pixel(a, 2)[None], "s", version=2)]
            classify = pb.ClassifyResponse.FromString(await call(
                ch, CL + "Classify", pb.ClassifyRequest(model=pb.ModelRef(name="m", version=2),
                                                        image=encode_raw(one_pixel(a, 3)), session_id="s").SerializeToString()))
            assert backend.calls["predict"] == 1  # all three were judged against the "latest" anchor
            for resp in copies:
                np.testing.assert_array_equal(to_ndarray(resp.outputs["scores"])[0], anchor)
                assert resp.model_spec.version.value == 2
            np.testing.assert_array_equal(np.float32(classify.result.scores), anchor)
            # another served version is another model: fresh key, reaches the model
            await predict(ch, one_pixel(a, 4)[None], "s", label="stable")
            assert backend.calls["predict"] == 2
            if mode == "hardened":  # the cross-session index is keyed by the served version too
                again = await predict(ch, a[None], "fresh", label="canary")
                assert backend.calls["predict"] == 2
                np.testing.assert_array_equal(to_ndarray(again.outputs["scores"])[0], anchor)
    finally:
        await server.stop(0)


async def test_unknown_label_or_version_is_not_found_and_changes_nothing():
    backend = FakeBackend()
    server = await start_fake_sidecar(backend)
    try:
        async with grpc_channel(server) as ch:
            await predict(ch, image(1)[None], "s")
            before = snapshot(server)
            for kw in ({"label": "nope"}, {"version": 9}, {"name": "nope"}):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await predict(ch, image(2)[None], "s", **kw)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND, kw
            assert snapshot(server) == before and backend.calls["predict"] == 1
    finally:
        await server.stop(0)


async def test_malformed_protobuf_is_invalid_argument_and_counted():
    backend = FakeBackend()
    server = await start_fake_sidecar(backend)
    try:
        async with grpc_channel(server) as ch:
            for method in (PS + "Predict", CL + "Classify", PS + "GetModelMetadata", MS + "GetModelStatus"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(ch, method, b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                assert "malformed" in info.value.details()
            stream = ch.stream_stream(CL + "ClassifyStream")(iter([b"\x0a\xff\xff\xff\xff\x0f"]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stream:
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert errors_counted(server, "Predict", "INVALID_ARGUMENT") == 1
        assert errors_counted(server, "Classify", "INVALID_ARGUMENT") == 1
        assert errors_counted(server, "ClassifyStream", "INVALID_ARGUMENT") == 1
        assert sum(backend.calls.values()) == 0
    finally:
        await server.stop(0)


async def test_tensor_declaring_a_huge_shape_is_refused_before_it_is_expanded():
    backend = FakeBackend()
    server = await start_fake_sidecar(backend, max_batch=64)
    try:
        async with grpc_channel(server) as ch:
            cases = {(100000, 32, 32, 3): grpc.StatusCode.RESOURCE_EXHAUSTED,
                     (1, 20000, 20000, 3): grpc.StatusCode.INVALID_ARGUMENT,
                     (-1, 32, 32, 3): grpc.StatusCode.INVALID_ARGUMENT,
                     (2, 32, 32): grpc.StatusCode.INVALID_ARGUMENT}
            for shape, code in cases.items():
                req = predict_pb2.PredictRequest()
                req.model_spec.name = "m"
                t = req.inputs["image"]
                t.dtype = 1
                for d in shape:
                    t.tensor_shape.dim.add(size=d)
                t.float_val.append(1.0)  # 46 bytes that would expand to gigabytes
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(ch, PS + "Predict", req.SerializeToString(), (("x-session-id", "s"),))
                assert info.value.code() == code, shape
        assert backend.calls["predict"] == 0 and snapshot(server) == {}
    finally:
        await server.stop(0)


def _openssl(*args, cwd) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate with CN=alice."""
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("openssl command not available")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn, ext in (("server", "localhost", ["-extfile", "san.ext"]), ("client", "alice", [])):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", *ext, cwd=d)
    return d


async def test_mtls_principal_is_the_certificate_name_on_grpc_and_rest(pki):
    import ssl

    import httpx

    from fake_sidecar import rest_url

    backend = FakeBackend()
    server = await start_fake_sidecar(backend, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                      tls_client_ca=str(pki / "ca.pem"))
    read = lambda n: (pki / n).read_bytes()  # noqa: E731
    creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    a = image(31)
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds) as ch:
            body = pb.ClassifyRequest(model=pb.ModelRef(name="m"), image=encode_raw(a), session_id="chosen").SerializeToString()
            first = pb.ClassifyResponse.FromString(await call(ch, CL + "Classify", body))
        assert backend.calls["predict"] == 1 and set(snapshot(server)) and all(k.startswith("c:alice") for k in snapshot(server))
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        url = rest_url(server, "/v1/models/m:predict").replace("http://", "https://")
        async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
            r = await client.post(url, json={"instances": [one_pixel(a).tolist()]}, headers={"X-Session-Id": "other"})
        assert r.status_code == 200, r.text
        assert backend.calls["predict"] == 1  # same principal on both transports: the anchor answered
        np.testing.assert_array_equal(np.float32(r.json()["predictions"][0]), np.float32(first.result.scores))
        # without a client certificate the TLS handshake itself fails: nothing reaches the data plane
        no_cert = grpc.ssl_channel_credentials(read("ca.pem"))
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", no_cert) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await call(ch, CL + "Classify", body)
        assert backend.calls["predict"] == 1
    finally:
        await server.stop(0)
