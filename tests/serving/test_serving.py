"""serving/: a TF-Serving-compatible model server, exercised with STOCK tensorflow-serving-api clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import REPO, free_port

tf = pytest.importorskip("tensorflow")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.batching import DynamicBatcher, run_batch  # noqa: E402
from serving.config import (  # noqa: E402
    BatchingConfig,
    ModelConfig,
    VersionPolicy,
    config_from_args,
    build_parser,
    parse_model_config_text,
)
from serving.errors import ConfigError, ModelLoadError  # noqa: E402
from serving.server import ServerThread, ServingServer  # noqa: E402

pytestmark = pytest.mark.integration
TOL = 1e-5
CODE = grpc.StatusCode


# ------------------------------------------------------------------ fixtures & helpers

@pytest.fixture(scope="module")
def images(request) -> np.ndarray:
    """128 float32 images: real CIFAR-10 test images when available, else random 0-255."""
    try:
        x = request.getfixturevalue("test_images")[:128]
    except pytest.skip.Exception:
        x = np.random.RandomState(0).randint(0, 256, (128, 32, 32, 3))
    return np.asarray(x, np.float32)


@pytest.fixture(scope="module")
def server(model_base: Path):
    models = [
        ModelConfig("tiny", model_base / "tiny", VersionPolicy.all(), {"stable": 1, "canary": 2}),
        ModelConfig("other", model_base / "other"),
    ]
    with ServerThread(ServingServer(models, host="127.0.0.1", port=0)) as t:
        yield t


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.target)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def reference(model_base: Path):
    """In-process SavedModel calls: (model, version) -> images -> scores."""
    cache: dict = {}

    def call(name: str, version: int, x: np.ndarray) -> np.ndarray:
        if (name, version) not in cache:
            cache[name, version] = tf.saved_model.load(str(model_base / name / str(version)))
        fn = cache[name, version].signatures["serving_default"]
        return fn(image=tf.constant(x))["scores"].numpy()
    return call


def make_request(name: str, x=None, version: int | None = None, signature: str = "", label: str = "",
                 output_filter=(), input_name: str = "image") -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label:
        req.model_spec.version_label = label
    if signature:
        req.model_spec.signature_name = signature
    if x is not None:
        req.inputs[input_name].CopyFrom(tf.make_tensor_proto(x))
    req.output_filter.extend(output_filter)
    return req


def scores(resp: predict_pb2.PredictResponse) -> np.ndarray:
    return tf.make_ndarray(resp.outputs["scores"])


def assert_good_request_works(stub, images, reference):
    resp = stub.Predict(make_request("tiny", images[:2]), timeout=30)
    np.testing.assert_allclose(scores(resp), reference("tiny", 2, images[:2]), atol=TOL)


# ------------------------------------------------------------------ Predict

@pytest.mark.parametrize("batch", [1, 64])
def test_predict_matches_in_process_savedmodel(stub, images, reference, batch):
    x = images[:batch]
    resp = stub.Predict(make_request("tiny", x), timeout=30)
    got = scores(resp)
    assert got.shape == (batch, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference("tiny", 2, x), atol=TOL)
    assert resp.model_spec.name == "tiny"
    assert resp.model_spec.version.value == 2
    assert resp.model_spec.signature_name == "serving_default"
    assert list(resp.outputs) == ["scores"]


def test_default_is_highest_version_and_explicit_versions_are_honoured(stub, images, reference):
    x = images[:8]
    v1 = stub.Predict(make_request("tiny", x, version=1), timeout=30)
    v2 = stub.Predict(make_request("tiny", x, version=2), timeout=30)
    default = stub.Predict(make_request("tiny", x), timeout=30)
    assert (v1.model_spec.version.value, v2.model_spec.version.value, default.model_spec.version.value) == (1, 2, 2)
    np.testing.assert_allclose(scores(v1), reference("tiny", 1, x), atol=TOL)
    np.testing.assert_allclose(scores(default), scores(v2), atol=TOL)
    assert np.abs(scores(v1) - scores(v2)).max() > 1e-3, "v1 and v2 are different models"
    stable = stub.Predict(make_request("tiny", x, label="stable"), timeout=30)
    assert stable.model_spec.version.value == 1
    np.testing.assert_allclose(scores(stable), scores(v1), atol=TOL)


def test_second_model_and_output_filter(stub, images, reference):
    resp = stub.Predict(make_request("other", images[:3], output_filter=["scores"]), timeout=30)
    assert scores(resp).shape == (3, 5)
    np.testing.assert_allclose(scores(resp), reference("other", 1, images[:3]), atol=TOL)


def test_empty_batch_returns_empty_scores(stub):
    resp = stub.Predict(make_request("tiny", np.zeros((0, 32, 32, 3), np.float32)), timeout=30)
    assert scores(resp).shape == (0, 10)


def test_float_val_encoded_request_is_accepted(stub, images, reference):
    """Clients that fill float_val instead of tensor_content (e.g. other languages) work too."""
    req = make_request("tiny")
    t = req.inputs["image"]
    t.dtype = tf.float32.as_datatype_enum
    for d in (2, 32, 32, 3):
        t.tensor_shape.dim.add().size = d
    t.float_val.extend(images[:2].ravel().tolist())
    np.testing.assert_allclose(scores(stub.Predict(req, timeout=30)), reference("tiny", 2, images[:2]), atol=TOL)


# ------------------------------------------------------------------ metadata, status, health, reflection

def test_get_model_metadata_signature_def_unpacks_with_stock_types(stub):
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "tiny"
    resp = stub.GetModelMetadata(req, timeout=30)
    assert resp.model_spec.name == "tiny" and resp.model_spec.version.value == 2
    any_msg = resp.metadata["signature_def"]
    assert any_msg.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    sdm = get_model_metadata_pb2.SignatureDefMap()
    assert any_msg.Unpack(sdm)
    sig = sdm.signature_def["serving_default"]
    assert list(sig.inputs) == ["image"] and list(sig.outputs) == ["scores"]
    assert sig.inputs["image"].dtype == tf.float32.as_datatype_enum
    assert sig.outputs["scores"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in sig.inputs["image"].tensor_shape.dim] == [-1, 32, 32, 3]
    assert [d.size for d in sig.outputs["scores"].tensor_shape.dim] == [-1, 10]
    assert sig.method_name == "tensorflow/serving/predict"

    bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
    bad.model_spec.name = "tiny"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(bad, timeout=30)
    assert err.value.code() == CODE.INVALID_ARGUMENT


def test_get_model_status(channel):
    ms = model_service_pb2_grpc.ModelServiceStub(channel)
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "tiny"
    resp = ms.GetModelStatus(req, timeout=30)
    assert [(s.version, s.state) for s in resp.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE), (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    assert all(s.status.error_code == 0 for s in resp.model_version_status)
    req.model_spec.version.value = 2
    assert [s.version for s in ms.GetModelStatus(req, timeout=30).model_version_status] == [2]
    for name, version in (("nope", None), ("tiny", 7)):
        bad = get_model_status_pb2.GetModelStatusRequest()
        bad.model_spec.name = name
        if version:
            bad.model_spec.version.value = version
        with pytest.raises(grpc.RpcError) as err:
            ms.GetModelStatus(bad, timeout=30)
        assert err.value.code() == CODE.NOT_FOUND


def test_health_and_reflection(channel):
    hs = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tiny", "other"):
        resp = hs.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        hs.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert err.value.code() == CODE.NOT_FOUND

    rs = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=30))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
            "grpc.health.v1.Health"} <= names


# ------------------------------------------------------------------ errors

def _truncated(x):
    req = make_request("tiny", x)
    req.inputs["image"].tensor_content = req.inputs["image"].tensor_content[:-4]
    return req


def _no_spec(x):
    req = make_request("tiny", x)
    req.ClearField("model_spec")
    return req


BAD_REQUESTS = {
    "unknown model": (lambda x: make_request("nope", x), CODE.NOT_FOUND, "nope"),
    "unknown version": (lambda x: make_request("tiny", x, version=9), CODE.NOT_FOUND, "version 9"),
    "unknown version label": (lambda x: make_request("tiny", x, label="beta"), CODE.NOT_FOUND, "beta"),
    # TF Serving's code for an unknown signature in Predict (predict_util.cc) is FAILED_PRECONDITION
    "unknown signature": (lambda x: make_request("tiny", x, signature="classify"), CODE.FAILED_PRECONDITION,
                          'Serving signature key "classify" not found.'),
    "wrong input name": (lambda x: make_request("tiny", x, input_name="img"), CODE.INVALID_ARGUMENT, "{image}"),
    "no inputs": (lambda x: make_request("tiny"), CODE.INVALID_ARGUMENT, "image"),
    "uint8 dtype": (lambda x: make_request("tiny", x.astype(np.uint8)), CODE.INVALID_ARGUMENT, "float32"),
    "string dtype": (lambda x: make_request("tiny", np.array([b"abc"] * 2)), CODE.INVALID_ARGUMENT, "float32"),
    # shapes are the graph's to judge, as in TF Serving: two channels cannot meet a 3-channel kernel
    "wrong inner dims": (lambda x: make_request("tiny", x[..., :2]), CODE.INVALID_ARGUMENT, "[-1,32,32,3]"),
    "wrong rank": (lambda x: make_request("tiny", x[0]), CODE.INVALID_ARGUMENT, "rank 4"),
    "undecodable tensor": (_truncated, CODE.INVALID_ARGUMENT, "decode"),
    "unknown output filter": (lambda x: make_request("tiny", x, output_filter=["logits"]),
                              CODE.INVALID_ARGUMENT, "logits"),
    "missing model spec": (_no_spec, CODE.INVALID_ARGUMENT, "ModelSpec"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_right_status_and_server_keeps_serving(stub, images, reference, case):
    build, code, needle = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(build(images[:2]), timeout=30)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details()
    assert_good_request_works(stub, images, reference)


def test_shapes_the_graph_accepts_are_served_like_tf_serving(stub):
    """TF Serving feeds the tensor to the graph without comparing it with the SignatureDef's shape;
    tiny (convolutions, global pooling) takes 16x32 images although it declares [-1,32,32,3]."""
    x = np.random.RandomState(1).randint(0, 256, (2, 16, 32, 3)).astype(np.float32)
    got = scores(stub.Predict(make_request("tiny", x), timeout=30))
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # softmax rows


def test_classify_needs_a_classification_signature(stub):
    """Classify is served (tests/test_serving_conformance.py); tiny's only signature takes images, not Examples."""
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "tiny"
    req.input.example_list.examples.add().features.feature["x"].float_list.value.append(1.0)
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(req, timeout=30)
    assert err.value.code() == CODE.INVALID_ARGUMENT
    assert "No classification inputs found in SignatureDef" in err.value.details()


def test_oversize_message_is_resource_exhausted(model_base, images, reference):
    srv = ServingServer([ModelConfig("tiny", model_base / "tiny")], port=0, max_message_bytes=1 << 20)
    with ServerThread(srv) as t, grpc.insecure_channel(t.target) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        big = images[:128]  # 1.5 MiB of float32
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(make_request("tiny", big), timeout=30)
        assert err.value.code() == CODE.RESOURCE_EXHAUSTED
        assert_good_request_works(stub, images, reference)


# ------------------------------------------------------------------ concurrency & batching

def test_concurrent_requests_are_batched_and_correct(server, stub, images, reference):
    n = 32
    jobs = [(("tiny", "other")[i % 2], i % 3 + 1, images[i:i + i % 3 + 1]) for i in range(n)]
    barrier = threading.Barrier(n)

    def call(job):
        name, _, x = job
        barrier.wait()
        return stub.Predict(make_request(name, x), timeout=60)

    before = {k: s.requests for k, s in server.server.runner.stats().items()}
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(call, jobs))
    for (name, rows, x), resp in zip(jobs, responses):
        assert scores(resp).shape[0] == rows
        np.testing.assert_allclose(scores(resp), reference(name, 2 if name == "tiny" else 1, x), atol=TOL)
    stats = server.server.runner.stats()
    assert sum(s.requests for s in stats.values()) - sum(before.values()) == n
    assert max(s.max_requests_per_batch for s in stats.values()) > 1, "no request was batched with another"


async def test_dynamic_batcher_concatenates_caps_and_splits():
    calls: list[int] = []

    def fn(inputs):
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2, "s": inputs["x"].sum(axis=1)}

    with ThreadPoolExecutor(1) as pool:
        b = DynamicBatcher(fn, pool, max_batch_size=8)
        xs = [np.full((i % 3 + 1, 4), i, np.float32) for i in range(10)]
        outs = await asyncio.gather(*(b.submit({"x": x}, len(x)) for x in xs))
        await b.close()
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out["y"], x * 2)
        np.testing.assert_array_equal(out["s"], x.sum(axis=1))
    assert sum(calls) == sum(len(x) for x in xs) and max(calls) <= 8 and len(calls) < len(xs)


async def test_dynamic_batcher_timeout_waits_for_more_rows():
    calls: list[int] = []

    def fn(inputs):
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] + 1}

    async def late(x):
        await asyncio.sleep(0.01)
        return await b.submit({"x": x}, len(x))

    with ThreadPoolExecutor(1) as pool:
        b = DynamicBatcher(fn, pool, max_batch_size=8, timeout_s=0.5)
        a, c = np.zeros((1, 2)), np.ones((2, 2))
        out_a, out_c = await asyncio.gather(b.submit({"x": a}, 1), late(c))
        await b.close()
    assert calls == [3]
    np.testing.assert_array_equal(out_a["y"], a + 1)
    np.testing.assert_array_equal(out_c["y"], c + 1)


async def test_dynamic_batcher_propagates_model_errors():
    def fn(inputs):
        raise ValueError("boom")

    with ThreadPoolExecutor(1) as pool:
        b = DynamicBatcher(fn, pool, max_batch_size=8)
        results = await asyncio.gather(*(b.submit({"x": np.zeros((1, 2))}, 1) for _ in range(3)),
                                       return_exceptions=True)
        await b.close()
    assert all(isinstance(r, ValueError) for r in results)


def test_errors_map_to_grpc_status_in_one_place():
    from serving import errors

    cases = {errors.ModelNotFound: CODE.NOT_FOUND, errors.VersionNotFound: CODE.NOT_FOUND,
             errors.SignatureNotFound: CODE.FAILED_PRECONDITION, errors.InvalidRequest: CODE.INVALID_ARGUMENT,
             errors.Unimplemented: CODE.UNIMPLEMENTED, ValueError: CODE.INTERNAL}
    for cls, code in cases.items():
        assert errors.grpc_status(cls("msg"))[0] == code
    assert errors.grpc_status(errors.InvalidRequest("bad shape")) == (CODE.INVALID_ARGUMENT, "bad shape")
    tf_error = tf.errors.InvalidArgumentError(None, None, "model says no")
    assert errors.grpc_status(tf_error) == (CODE.INVALID_ARGUMENT, "model says no")


def test_run_batch_rejects_unsplittable_outputs():
    with pytest.raises(RuntimeError, match="cannot split"):
        run_batch(lambda d: {"y": np.zeros(())}, [{"x": np.zeros((1, 2))}, {"x": np.zeros((2, 2))}], [1, 2])


# ------------------------------------------------------------------ versions on disk, reload

def test_polling_loads_new_versions_and_reload_config(model_base, images, reference, tmp_path):
    base = tmp_path / "tiny"
    shutil.copytree(model_base / "tiny" / "1", base / "1")
    srv = ServingServer([ModelConfig("tiny", base)], port=0, poll_seconds=0.1)
    with ServerThread(srv) as t, grpc.insecure_channel(t.target) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        assert stub.Predict(make_request("tiny", images[:1]), timeout=30).model_spec.version.value == 1
        shutil.copytree(model_base / "tiny" / "2", base / "2")
        deadline = time.monotonic() + 30
        while stub.Predict(make_request("tiny", images[:1]), timeout=30).model_spec.version.value != 2:
            assert time.monotonic() < deadline, "version 2 never picked up"
            time.sleep(0.1)
        ms = model_service_pb2_grpc.ModelServiceStub(ch)
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = "tiny"
        states = {s.version: s.state for s in ms.GetModelStatus(req, timeout=30).model_version_status}
        assert states == {1: get_model_status_pb2.ModelVersionStatus.END,
                          2: get_model_status_pb2.ModelVersionStatus.AVAILABLE}

        reload = model_management_pb2.ReloadConfigRequest()
        cfg = reload.config.model_config_list.config.add(name="other", base_path=str(model_base / "other"))
        assert cfg.name == "other"
        resp = ms.HandleReloadConfigRequest(reload, timeout=60)
        assert resp.status.error_code == 0, resp.status.error_message
        np.testing.assert_allclose(scores(stub.Predict(make_request("other", images[:2]), timeout=30)),
                                   reference("other", 1, images[:2]), atol=TOL)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(make_request("tiny", images[:1]), timeout=30)
        assert err.value.code() == CODE.NOT_FOUND
        hs = health_pb2_grpc.HealthStub(ch)
        status = {s: hs.Check(health_pb2.HealthCheckRequest(service=s), timeout=30).status
                  for s in ("", "tiny", "other")}
        assert status == {"": health_pb2.HealthCheckResponse.SERVING, "other": health_pb2.HealthCheckResponse.SERVING,
                          "tiny": health_pb2.HealthCheckResponse.NOT_SERVING}

        broken = model_management_pb2.ReloadConfigRequest()
        broken.config.model_config_list.config.add(name="ghost", base_path=str(tmp_path / "ghost"))
        resp = ms.HandleReloadConfigRequest(broken, timeout=60)
        assert resp.status.error_code != 0 and "ghost" in resp.status.error_message
        assert scores(stub.Predict(make_request("other", images[:1]), timeout=30)).shape == (1, 5)


def test_missing_model_fails_fast(tmp_path):
    with pytest.raises(ModelLoadError, match="no servable version"):
        ServerThread(ServingServer([ModelConfig("ghost", tmp_path / "ghost")])).start()


def test_version_policies():
    assert VersionPolicy.latest().select([3, 1, 2]) == [3]
    assert VersionPolicy.latest(2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy.all().select([2, 1]) == [1, 2]
    assert VersionPolicy.specific(1, 5).select([1, 2, 3]) == [1]
    assert VersionPolicy.latest().select([]) == []


# ------------------------------------------------------------------ flags and config files

CONFIG_TEXT = """
model_config_list {
  config { name: 'tiny' base_path: '%(base)s/tiny' model_platform: 'tensorflow'
           model_version_policy { specific { versions: 1 versions: 2 } }
           version_labels { key: 'stable' value: 1 } }
  config { name: 'other' base_path: '%(base)s/other' }
}
"""


def test_model_config_file_parsing(tmp_path):
    models = parse_model_config_text(CONFIG_TEXT % {"base": "/m"})
    assert [(m.name, str(m.base_path)) for m in models] == [("tiny", "/m/tiny"), ("other", "/m/other")]
    assert models[0].version_policy == VersionPolicy.specific(1, 2)
    assert models[0].version_labels == {"stable": 1}
    assert models[1].version_policy == VersionPolicy.latest(1)
    all_policy = parse_model_config_text(
        "model_config_list { config { name: 'a' base_path: '/a' model_version_policy { all {} } }"
        " config { name: 'b' base_path: '/b' model_version_policy { latest { num_versions: 2 } } } }")
    assert [m.version_policy for m in all_policy] == [VersionPolicy.all(), VersionPolicy.latest(2)]
    for bad in ("model_config_list { config { name: 'a' } }", "nonsense {",
                "model_config_list { config { name: 'a' base_path: '/a' } config { name: 'a' base_path: '/b' } }"):
        with pytest.raises(ConfigError):
            parse_model_config_text(bad)


def test_cli_flags():
    parse = lambda *a: config_from_args(build_parser().parse_args(list(a)))  # noqa: E731
    cfg = parse("--model_name", "tiny", "--model_base_path", "/m/tiny")
    assert (cfg.port, cfg.host, cfg.max_message_bytes) == (8500, "0.0.0.0", 64 * 1024 * 1024)
    assert cfg.models == (ModelConfig("tiny", Path("/m/tiny")),) and cfg.batching == BatchingConfig()
    cfg = parse("--port=9000", "--host=127.0.0.1", "--model_base_path=/m/x", "--grpc_max_message_bytes=1048576",
                "--enable_batching=false", "--max_batch_size=16", "--batch_timeout_micros=500",
                "--file_system_poll_wait_seconds=0", "--rest_api_port=8501")
    assert (cfg.port, cfg.host, cfg.max_message_bytes, cfg.poll_seconds) == (9000, "127.0.0.1", 1 << 20, 0)
    assert cfg.models[0].name == "default"
    assert cfg.batching == BatchingConfig(enabled=False, max_batch_size=16, batch_timeout_micros=500)
    assert parse("--model_base_path=/m", "--enable_batching").batching.enabled
    with pytest.raises(ConfigError):
        parse()
    with pytest.raises(ConfigError):
        parse("--model_base_path=/m", "--model_config_file=/c")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--enable_batching=maybe"])


def test_cli_serves_two_models_from_config_file_and_stops_on_sigterm(model_base, images, reference, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(CONFIG_TEXT % {"base": model_base})
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "serving", f"--port={port}", "--host=127.0.0.1",
                             f"--model_config_file={config}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            hs = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if hs.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server did not become healthy"
                time.sleep(0.25)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            for name, version in (("tiny", 1), ("tiny", 2), ("other", 1)):
                resp = stub.Predict(make_request(name, images[:4], version=version), timeout=30)
                np.testing.assert_allclose(scores(resp), reference(name, version, images[:4]), atol=TOL)
            stable = stub.Predict(make_request("tiny", images[:1], label="stable"), timeout=30)
            assert stable.model_spec.version.value == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    for line in ("{name: tiny version: 1}", "{name: tiny version: 2}", "{name: other version: 1}"):
        assert f"Successfully loaded servable version {line}" in out
    assert f"Running gRPC ModelServer at 127.0.0.1:{port}" in out
    assert "Server stopped" in out
