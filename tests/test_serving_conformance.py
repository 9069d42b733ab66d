"""TF Serving conformance: ``hashguard-serving``, and the sidecar in front of it, answer the cases of
TF Serving's own model-server test (``tensorflow_model_server_test.py``) as TF Serving does.

Our own cases after that suite, over test models built here with TensorFlow at run time (nothing
is fetched): a TF1 half_plus_two with predict/classify/regress signatures, a TF1 half_plus_three
whose input has no declared shape, the same in TF2, ``tf.saved_model.save`` exports with an
unknown-rank input and with two signatures, and a Keras-2 (``tf_keras``) Sequential model, all in
zero-padded version folders (``00000123``). The server is started with the command line TF
Serving's harness uses (REST port and timeout, Unix socket, channel arguments, monitoring
config, batching parameters). ``make conformance`` runs this file alone; ``make test`` includes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import REPO, free_port

tf = pytest.importorskip("tensorflow")
from tensorflow.core.framework import types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

pytestmark = pytest.mark.integration
CODE = grpc.StatusCode
VERSION = 123
VERSION_DIR = "00000123"  # TF Serving's test models pad their version folders


# ------------------------------------------------------------------ test models, built at run time

def _tf1_model(path: Path, offset: float, loose: bool) -> None:
    """y = 0.5 * x + offset in a TF1 graph (tf.compat.v1), saved with SavedModelBuilder.

    ``loose``: ``x`` is a placeholder of unknown shape. Otherwise ``x`` is the [-1, 1] output of
    parsing serialized tf.Examples, and the model also has classify/regress signatures over them.
    """
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        examples = v1.placeholder(tf.string, name="tf_example")
        if loose:
            x = v1.placeholder(tf.float32, shape=None, name="x")
        else:
            parsed = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
            parsed.set_shape([None, 1])  # one float per Example: the signature declares x as [-1, 1]
            x = tf.identity(parsed, name="x")
        a = v1.get_variable("a", initializer=tf.constant(0.5))
        b = v1.get_variable("b", initializer=tf.constant(offset))
        y = tf.add(a * x, b, name="y")
        sig = v1.saved_model.signature_def_utils
        signatures = {"serving_default": sig.predict_signature_def({"x": x}, {"y": y})}
        if not loose:
            signatures["classify_x_to_y"] = sig.classification_signature_def(examples, None, y)
            signatures["regress_x_to_y"] = sig.regression_signature_def(examples, y)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=signatures)
            builder.save()


class _HalfPlusTwo(tf.Module):
    """The TF2 half_plus_two: the classify/regress signatures parse serialized tf.Examples."""

    def __init__(self):
        super().__init__()
        self.a = tf.Variable(0.5)
        self.b = tf.Variable(2.0)

    def _y(self, x):
        return self.a * x + self.b

    def _parse(self, inputs):
        return tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32)])
    def predict(self, x):
        return {"y": self._y(x)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def classify(self, inputs):
        return {"scores": self._y(self._parse(inputs))}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def regress(self, inputs):
        return {"outputs": self._y(self._parse(inputs))}


def _tf2_model(path: Path) -> None:
    m = _HalfPlusTwo()
    tf.saved_model.save(m, str(path), signatures={
        "serving_default": m.predict, "classify_x_to_y": m.classify, "regress_x_to_y": m.regress})


def _unknown_rank_model(path: Path) -> None:
    """tf.saved_model.save of a function of an input of unknown rank: y = 3 * 2 * x."""
    root = tf.train.Checkpoint()
    root.v1, root.v2 = tf.Variable(3.0), tf.Variable(2.0)
    root.f = tf.function(lambda x: {"y": root.v1 * root.v2 * x})
    tf.saved_model.save(root, str(path), root.f.get_concrete_function(tf.TensorSpec(None, tf.float32)))


def _two_signature_model(path: Path) -> None:
    root = tf.train.Checkpoint()
    spec = [tf.TensorSpec(None, tf.float32)]
    root.f = tf.function(lambda x: {"y": 1.0}, input_signature=spec)
    root.g = tf.function(lambda x: {"y": 2.0}, input_signature=spec)
    tf.saved_model.save(root, str(path), signatures={"serving_default": root.f, "custom_signature_key": root.g})


def _keras2_model(path: Path) -> None:
    """A Keras-2 (tf_keras) Sequential model saved with tf.saved_model.save: y = x."""
    import tf_keras

    model = tf_keras.models.Sequential()
    model.add(tf_keras.layers.Input(dtype="float32", shape=(1,), name="x"))
    model.add(tf_keras.layers.Lambda(lambda x: x, name="y"))
    tf.saved_model.save(model, str(path))


def _tf_text_model(path: Path) -> None:
    """A graph with TF Text's custom ops (WhitespaceTokenizer): y = the number of tokens of each string."""
    import tensorflow_text as tf_text

    class Tokens(tf.Module):
        def __init__(self):
            super().__init__()
            self.tokenizer = tf_text.WhitespaceTokenizer()

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def count(self, x):
            return {"y": tf.cast(self.tokenizer.tokenize(x).row_lengths(), tf.float32)}

    m = Tokens()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.count})


def _tflite_model(path: Path, signature_metadata: bool) -> None:
    """y = 0.5 * x + 2 for x of shape [1, 1], converted to TensorFlow Lite.

    ``signature_metadata``: with the ``signature_defs_metadata`` entry TF Serving's converter adds
    (a flexbuffer map of serialized SignatureDefs, here aliasing x -> tflite_input, y -> Identity);
    without it, TF Serving's aliases are the tensor names (x, Identity).
    """
    from flatbuffers import flexbuffers
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    name = "tflite_input" if signature_metadata else "x"
    fn = tf.function(lambda x: 0.5 * x + 2.0, input_signature=[tf.TensorSpec([1, 1], tf.float32, name=name)])
    data = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], None).convert()
    if signature_metadata:
        sd = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        for infos, alias, tensor in ((sd.inputs, "x", "tflite_input:0"), (sd.outputs, "y", "Identity:0")):
            infos[alias].name, infos[alias].dtype = tensor, types_pb2.DT_FLOAT
        fbb = flexbuffers.Builder()
        with fbb.Map():
            fbb.Key("serving_default")  # a flexbuffer string holding the proto bytes, as TF Serving writes it
            fbb._WriteBlob(sd.SerializeToString(), append_zero=True, type_=flexbuffers.Type.STRING)
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(bytes(fbb.Finish()), np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = b"signature_defs_metadata", len(model.buffers) - 1
        model.metadata = list(model.metadata or []) + [entry]
        data = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    path.mkdir(parents=True)
    (path / "model.tflite").write_bytes(data)


BUILDERS = {
    "default": lambda p: _tf1_model(p, 2.0, loose=False),  # half_plus_two
    "half_plus_three": lambda p: _tf1_model(p, 3.0, loose=True),
    "tf2": _tf2_model,
    "unknown_rank": _unknown_rank_model,
    "two_signatures": _two_signature_model,
    "keras2": _keras2_model,
    "tf_text": _tf_text_model,
}
TFLITE_BUILDERS = {
    "tflite": lambda p: _tflite_model(p, signature_metadata=False),
    "tflite_with_sigdef": lambda p: _tflite_model(p, signature_metadata=True),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tfs_models")
    out = {}
    for name, build in BUILDERS.items():
        build(base / name / VERSION_DIR)
        out[name] = base / name
    return out


def config_text(models: dict[str, Path]) -> str:
    entries = "".join(f'  config: {{ name: "{n}", base_path: "{p}", model_platform: "tensorflow" }}\n'
                      for n, p in models.items())
    return "model_config_list: {\n" + entries + "}\n"


# ------------------------------------------------------------------ the server, started as TF Serving's harness does

def wait_for_server_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """The harness's readiness probe: a Predict for a missing model must come back naming a Servable."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "intentionally_missing_model"
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"localhost:{port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
            try:
                stub.Predict(request, 5)
            except grpc.RpcError as err:
                if err.code() == CODE.NOT_FOUND and "Servable" in (err.details() or ""):
                    return
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)


class Server:
    def __init__(self, tmp: Path, config: str, *extra: str, poll: int | None = None):
        self.grpc_port, self.rest_port = free_port(), free_port()
        self.socket = str(tmp / "tf-serving.sock")
        self.config = tmp / "model_config.txt"
        self.config.write_text(config)
        self.log = open(tmp / "server.log", "wb")
        # TF Serving's harness command line (RunServer), flags unchanged
        cmd = [sys.executable, "-m", "serving", f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}",
               "--rest_api_timeout_in_ms=5000", f"--grpc_socket_path={self.socket}",
               f"--model_config_file={self.config}", *extra,
               "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,"
               "grpc.so_reuseaddr=1"]
        if poll is not None:
            cmd.append(f"--model_config_file_poll_wait_seconds={poll}")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_server_ready(self.grpc_port, self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def target(self) -> str:
        return f"localhost:{self.grpc_port}"

    def rest(self, path: str) -> str:
        return f"http://localhost:{self.rest_port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tfs_server")
    monitoring = tmp / "monitoring_config.txt"
    monitoring.write_text('prometheus_config: {\n  enable: true,\n  path: "/monitoring/prometheus/metrics"\n}\n')
    batching = tmp / "batching_config.txt"
    batching.write_text("max_batch_size { value: 128 }\nbatch_timeout_micros { value: 0 }\n"
                        "max_enqueued_batches { value: 1000000 }\nnum_batch_threads { value: 8 }\n")
    srv = Server(tmp, config_text(model_dirs), f"--monitoring_config_file={monitoring}",
                 "--enable_batching", f"--batching_parameters_file={batching}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield prediction_service_pb2_grpc.PredictionServiceStub(ch)


# ------------------------------------------------------------------ helpers after the harness

def predict_x(stub, model: str, expected: float, signature: str = "serving_default", specify_output=True,
              batch_input=False, output="y") -> predict_pb2.PredictResponse:
    """The harness's VerifyPredictRequest: x = 2.0 as a float_val tensor of shape [1] (or [1, 1])."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.append(2.0)
    request.inputs["x"].tensor_shape.dim.add().size = 1
    if batch_input:
        request.inputs["x"].tensor_shape.dim.add().size = 1
    if specify_output:
        request.output_filter.append(output)
    result = stub.Predict(request, 20)
    assert output in result.outputs
    assert result.outputs[output].dtype == types_pb2.DT_FLOAT
    assert len(result.outputs[output].float_val) == 1
    assert result.outputs[output].float_val[0] == expected
    assert (result.model_spec.name, result.model_spec.signature_name, result.model_spec.version.value) == \
        (model, signature, VERSION)
    return result


def one_example(request) -> None:
    request.input.example_list.examples.add().features.feature["x"].float_list.value.extend([2.0])


def call_rest(url: str, body=None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


STATUS_JSON = {"model_version_status": [{"version": "123", "state": "AVAILABLE",
                                         "status": {"error_code": "OK", "error_message": ""}}]}


def _dims(*sizes):
    return {"dim": [{"size": str(s), "name": ""} for s in sizes], "unknown_rank": False}


# What TF Serving prints for our TF1 half_plus_two (its test compares a file of this form):
# every default-valued field (signature_name "", dim names "", unknown_rank, defaults {}) is there.
METADATA_JSON = {
    "model_spec": {"name": "default", "signature_name": "", "version": "123"},
    "metadata": {"signature_def": {"signature_def": {
        "serving_default": {
            "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": _dims(-1, 1), "name": "x:0"}},
            "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": _dims(-1, 1), "name": "y:0"}},
            "method_name": "tensorflow/serving/predict", "defaults": {}},
        "classify_x_to_y": {
            "inputs": {"inputs": {"dtype": "DT_STRING", "tensor_shape": {"dim": [], "unknown_rank": True},
                                  "name": "tf_example:0"}},
            "outputs": {"scores": {"dtype": "DT_FLOAT", "tensor_shape": _dims(-1, 1), "name": "y:0"}},
            "method_name": "tensorflow/serving/classify", "defaults": {}},
        "regress_x_to_y": {
            "inputs": {"inputs": {"dtype": "DT_STRING", "tensor_shape": {"dim": [], "unknown_rank": True},
                                  "name": "tf_example:0"}},
            "outputs": {"outputs": {"dtype": "DT_FLOAT", "tensor_shape": _dims(-1, 1), "name": "y:0"}},
            "method_name": "tensorflow/serving/regress", "defaults": {}},
    }}},
}


# ------------------------------------------------------------------ gRPC: status, metadata, predict

def test_get_model_status_reads_the_padded_version_folder(server):
    with grpc.insecure_channel(server.target) as ch:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "default"
        result = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(request, 20)
    assert [(s.version, s.state, s.status.error_code) for s in result.model_version_status] == [
        (VERSION, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)]


def test_get_model_metadata(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "default"
    result = stub.GetModelMetadata(request, 20)
    assert (result.model_spec.name, result.model_spec.version.value) == ("default", VERSION)
    assert list(result.metadata) == ["signature_def"]
    sdm = get_model_metadata_pb2.SignatureDefMap()
    assert result.metadata["signature_def"].Unpack(sdm)
    assert set(sdm.signature_def) == {"serving_default", "classify_x_to_y", "regress_x_to_y"}


def test_predict_accepts_x_of_shape_1_for_a_signature_of_minus_1_by_1(stub):
    """TF Serving hands the tensor to the graph, which takes it: y = 0.5 * 2 + 2."""
    predict_x(stub, "default", 3.0)
    predict_x(stub, "default", 3.0, specify_output=False)
    predict_x(stub, "default", 3.0, batch_input=True)


def test_tf1_model_with_an_unshaped_input(stub):
    predict_x(stub, "half_plus_three", 4.0)
    predict_x(stub, "half_plus_three", 4.0, specify_output=False)


def test_tf_saved_model_save_exports(stub):
    predict_x(stub, "unknown_rank", 12.0, specify_output=False)
    predict_x(stub, "two_signatures", 2.0, signature="custom_signature_key")
    predict_x(stub, "two_signatures", 1.0)


def test_keras2_sequential_export(stub):
    predict_x(stub, "keras2", 2.0, batch_input=True, specify_output=False)


def test_tf_text_ops(stub):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tf_text"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([b"one two three", b"four"]))
    result = stub.Predict(request, 20)
    assert list(tf.make_ndarray(result.outputs["y"])) == [3.0, 1.0]


def test_predict_over_the_unix_socket(server):
    with grpc.insecure_channel(f"unix:{server.socket}") as ch:
        predict_x(prediction_service_pb2_grpc.PredictionServiceStub(ch), "default", 3.0, specify_output=False)


def test_tf_serving_error_codes(stub):
    cases = [
        ("nope", "serving_default", ["x"], CODE.NOT_FOUND, "Servable not found for request"),
        ("default", "nope", [], CODE.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
        ("default", "serving_default", ["z"], CODE.INVALID_ARGUMENT, "output tensor alias not found in signature: z"),
    ]
    for model, signature, output_filter, code, text in cases:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.float32([[2.0]])))
        request.output_filter.extend(output_filter)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request, 20)
        assert (err.value.code(), text in err.value.details()) == (code, True), err.value.details()
    predict_x(stub, "default", 3.0)  # still serving


# ------------------------------------------------------------------ Classify, Regress, MultiInference

@pytest.mark.parametrize("model", ["default", "tf2"])
def test_classify(stub, model):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "classify_x_to_y"
    one_example(request)
    result = stub.Classify(request, 20)
    assert [[(c.label, c.score) for c in cl.classes] for cl in result.result.classifications] == [[("", 3.0)]]
    assert (result.model_spec.name, result.model_spec.signature_name, result.model_spec.version.value) == \
        (model, "classify_x_to_y", VERSION)


@pytest.mark.parametrize("model", ["default", "tf2"])
def test_regress(stub, model):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "regress_x_to_y"
    one_example(request)
    result = stub.Regress(request, 20)
    assert [r.value for r in result.result.regressions] == [3.0]
    assert result.model_spec.version.value == VERSION


@pytest.mark.parametrize("model", ["default", "tf2"])
def test_multi_inference(stub, model):
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_x_to_y", "tensorflow/serving/regress"),
                              ("classify_x_to_y", "tensorflow/serving/classify")):
        task = request.tasks.add()
        task.model_spec.name = model
        task.model_spec.signature_name = signature
        task.method_name = method
    one_example(request)
    result = stub.MultiInference(request, 20)
    assert len(result.results) == 2
    assert result.results[0].regression_result.regressions[0].value == 3.0
    assert result.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for task, res in zip(request.tasks, result.results):
        assert (res.model_spec.name, res.model_spec.signature_name, res.model_spec.version.value) == \
            (model, task.model_spec.signature_name, VERSION)


def test_classify_refuses_an_empty_input(stub):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = "classify_x_to_y"
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request, 20)
    assert (err.value.code(), err.value.details()) == (CODE.INVALID_ARGUMENT, "Input is empty.")


# ------------------------------------------------------------------ REST and Prometheus

def test_rest_predict_row_and_columnar(server):
    assert call_rest(server.rest("/v1/models/default:predict"), {"instances": [2.0, 3.0, 4.0]}) == \
        (200, {"predictions": [3.0, 3.5, 4.0]})
    assert call_rest(server.rest("/v1/models/default:predict"), {"inputs": [2.0, 3.0, 4.0]}) == \
        (200, {"outputs": [3.0, 3.5, 4.0]})
    assert call_rest(server.rest("/v1/models/default/versions/123:predict"),
                     {"instances": [{"x": [2.0]}, {"x": [3.0]}]}) == (200, {"predictions": [[3.0], [3.5]]})


def test_rest_classify_and_regress(server):
    assert call_rest(server.rest("/v1/models/default:classify"),
                     {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}) == \
        (200, {"results": [[["", 3.0]]]})
    assert call_rest(server.rest("/v1/models/default:regress"),
                     {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}) == (200, {"results": [3.0]})


def test_rest_status_and_metadata_print_default_values(server):
    assert call_rest(server.rest("/v1/models/default")) == (200, STATUS_JSON)
    assert call_rest(server.rest("/v1/models/default/metadata")) == (200, METADATA_JSON)


def test_rest_errors(server):
    code, body = call_rest(server.rest("/v1/models/nope"))
    assert code == 404 and "nope" in body["error"]
    code, body = call_rest(server.rest("/v1/models/default:predict"), {"signature_name": "nope", "instances": [1.0]})
    assert (code, body) == (412, {"error": 'Serving signature key "nope" not found.'})


def test_prometheus_endpoint(server):
    call_rest(server.rest("/v1/models/default"))  # at least one request counted
    with urllib.request.urlopen(server.rest("/monitoring/prometheus/metrics"), timeout=30) as r:
        text = r.read().decode()
    assert "# TYPE" in text
    assert ':tensorflow:serving:request_count_total{model_name="default",status="OK"}' in text


def test_profiler_service_on_the_grpc_port(server, stub, tmp_path):
    """profiler_client.trace against the serving address (TF Serving's test does the same) records a trace."""
    import threading

    from tensorflow.python.profiler import profiler_client

    done = threading.Event()

    def load():
        while not done.is_set():
            predict_x(stub, "default", 3.0)
            time.sleep(0.05)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        profiler_client.trace(server.target, str(tmp_path / "logs"), 1000, "", 10)
    finally:
        done.set()
        worker.join(30)
    traces = list((tmp_path / "logs").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces)


# ------------------------------------------------------------------ command line and config files

def test_bad_model_config_is_reported_in_tf_servings_words(tmp_path):
    bad = tmp_path / "bad_model_config.txt"
    bad.write_text("improperly formatted file")
    out = subprocess.run([sys.executable, "-m", "serving", f"--port={free_port()}", f"--model_config_file={bad}",
                          "--rest_api_port=0"], capture_output=True, timeout=120, cwd=REPO)
    assert out.returncode != 0
    assert b"Error parsing text-format tensorflow.serving.ModelServerConfig" in out.stderr


def test_flags_are_implemented_ignored_or_refused_with_a_reason():
    from serving.config import build_parser, config_from_args
    from serving.errors import ConfigError

    def parse(*flags):
        return config_from_args(build_parser().parse_args(["--model_base_path=/m", *flags]))

    cfg = parse("--rest_api_port=8501", "--rest_api_timeout_in_ms=5000", "--grpc_socket_path=/tmp/s.sock",
                "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb",
                "--use_tflite_model=true", "--tensorflow_session_parallelism=2", "--enable_model_warmup=false")
    assert (cfg.rest_port, cfg.rest_timeout_ms, cfg.grpc_socket_path, cfg.prefer_tflite) == \
        (8501, 5000, "/tmp/s.sock", True)
    assert cfg.channel_arguments == (("grpc.max_connection_age_ms", 2000), ("grpc.lb_policy_name", "grpclb"))
    for flags, text in ((["--ssl_config_file=x"], "TLS"), (["--platform_config_file=x"], "platform"),
                        (["--saved_model_tags=serve,gpu"], "serve"), (["--grpc_channel_arguments=novalue"], "key=value"),
                        (["--model_config_file_poll_wait_seconds=1"], "--model_config_file")):
        with pytest.raises(ConfigError, match=text):
            parse(*flags)


def test_requested_ports_are_held_from_process_start():
    """While TensorFlow imports, nobody else can take the port; the server's own SO_REUSEADDR bind still can."""
    import socket

    from serving.__main__ import reserve_ports

    port = free_port()
    held = reserve_ports("0.0.0.0", [port])
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("0.0.0.0", port))
        server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
        assert server.add_insecure_port(f"0.0.0.0:{port}") == port
        server.stop(0)
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("poll", [1, 0])
def test_model_config_file_polling(model_dirs, tmp_path, poll):
    """Poll period 1 s: a rewritten config file is applied. Period 0: the file is read once."""
    first = config_text({"half_plus_two": model_dirs["default"]})
    srv = Server(tmp_path, first, poll=poll)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            predict_x(stub, "half_plus_two", 3.0, specify_output=False)
            srv.config.write_text(config_text({"half_plus_three": model_dirs["half_plus_three"]}))
            if poll:
                deadline = time.monotonic() + 60
                while True:  # applied within a few poll periods; the old model is gone after it
                    try:
                        predict_x(stub, "half_plus_three", 4.0, specify_output=False)
                        break
                    except grpc.RpcError as err:
                        assert err.code() == CODE.NOT_FOUND and time.monotonic() < deadline
                        time.sleep(0.5)
                with pytest.raises(grpc.RpcError) as err:
                    predict_x(stub, "half_plus_two", 3.0)
                assert err.value.code() == CODE.NOT_FOUND
            else:
                time.sleep(poll + 2)
                predict_x(stub, "half_plus_two", 3.0, specify_output=False)
                with pytest.raises(grpc.RpcError) as err:
                    predict_x(stub, "half_plus_three", 4.0)
                assert err.value.code() == CODE.NOT_FOUND
    finally:
        srv.stop()


def test_tflite_models_with_prefer_tflite_model(tmp_path):
    models = {}
    for name, build in TFLITE_BUILDERS.items():
        build(tmp_path / "models" / name / VERSION_DIR)
        models[name] = tmp_path / "models" / name
    srv = Server(tmp_path, config_text(models), "--prefer_tflite_model=true")
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            predict_x(stub, "tflite", 3.0, output="Identity")  # x of shape [1] on a [1, 1] model: resized
            predict_x(stub, "tflite_with_sigdef", 3.0)
            predict_x(stub, "tflite_with_sigdef", 3.0, batch_input=True, specify_output=False)
        assert call_rest(srv.rest("/v1/models/tflite_with_sigdef:predict"), {"instances": [[2.0], [4.0]]}) == \
            (200, {"predictions": [[3.0], [4.0]]})
    finally:
        srv.stop()


def test_a_tflite_model_without_the_flag_is_refused_with_a_reason(tmp_path):
    TFLITE_BUILDERS["tflite"](tmp_path / "tflite" / VERSION_DIR)
    out = subprocess.run([sys.executable, "-m", "serving", f"--port={free_port()}", "--model_name=default",
                          f"--model_base_path={tmp_path / 'tflite'}"], capture_output=True, timeout=120, cwd=REPO)
    assert out.returncode != 0 and b"--prefer_tflite_model=true" in out.stderr


# ------------------------------------------------------------------ through the sidecar

@pytest.fixture
async def sidecar(server):
    from sidecar.config import Settings
    from sidecar.server import SidecarServer

    settings = Settings(backend=server.target, host="127.0.0.1", port=0, metrics_port=0, rest_port=free_port(),
                        padding="off", score_noise=0.0, score_precision=0)
    sc = SidecarServer(settings)
    await sc.start()
    yield sc
    await sc.stop(0)


async def _via_sidecar(sc, fn):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn)


async def test_sidecar_grpc_status_and_metadata_equal_the_servers(server, sidecar):
    def both(make_call):
        with grpc.insecure_channel(server.target) as direct, \
                grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as front:
            return make_call(direct), make_call(front)

    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "default"
    direct, front = await _via_sidecar(sidecar, lambda: both(
        lambda ch: model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(status, 20)))
    assert front == direct and front.model_version_status[0].version == VERSION

    meta = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    meta.model_spec.name = "default"
    direct, front = await _via_sidecar(sidecar, lambda: both(
        lambda ch: prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata(meta, 20)))
    assert front == direct and front.model_spec.version.value == VERSION


async def test_sidecar_rest_status_and_metadata_are_tf_servings_json(server, sidecar):
    base = f"http://127.0.0.1:{sidecar.rest.port}"
    assert await _via_sidecar(sidecar, lambda: call_rest(base + "/v1/models/default")) == (200, STATUS_JSON)
    assert await _via_sidecar(sidecar, lambda: call_rest(base + "/v1/models/default/metadata")) == \
        (200, METADATA_JSON)


async def test_sidecar_answers_an_unknown_model_not_found_before_any_input_check(server, sidecar):
    """The harness's readiness probe (a Predict with no inputs for a missing model) through the sidecar."""
    def probe():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "intentionally_missing_model"
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            try:
                prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request, 20)
            except grpc.RpcError as err:
                return err.code(), err.details()
        return None

    code, details = await _via_sidecar(sidecar, probe)
    assert code == CODE.NOT_FOUND and "Servable" in details
    base = f"http://127.0.0.1:{sidecar.rest.port}"
    for body in ({"instances": [{"a": 1.0, "b": 2.0}]}, {"nothing": 1}, "not json"):
        code, answer = await _via_sidecar(sidecar, lambda body=body: call_rest(
            base + "/v1/models/intentionally_missing_model:predict", body))
        assert code == 404 and "Servable" in answer["error"], (body, answer)
    # a known model keeps its input errors
    code, answer = await _via_sidecar(sidecar, lambda: call_rest(
        base + "/v1/models/default:predict", {"instances": [{"a": 1.0, "b": 2.0}]}))
    assert code == 400, answer
