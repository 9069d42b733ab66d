"""The sidecar runs without TensorFlow and can share a process with it.

Each check runs in a fresh interpreter: what a module drags in, and the order in
which two protobuf worlds register, depend on the process, not on this test run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HAS_TF_SERVING = importlib.util.find_spec("tensorflow_serving") is not None


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["sidecar.server", "sidecar.cli", "sidecar.wire.tensors"])
def test_importing_the_sidecar_loads_no_tensorflow(module):
    got = _run(f"""
        import json, sys
        import {module}
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0].startswith("tensorflow"))))
    """)
    assert got == [], f"import {module} loaded {got[:10]}"


def test_sidecar_messages_stay_out_of_protobufs_default_pool():
    got = _run("""
        import json
        from google.protobuf import descriptor_pool
        from sidecar.wire import tfapi
        names = ["tensorflow/core/framework/tensor.proto", "tensorflow_serving/apis/predict.proto"]
        def known(pool, name):
            try:
                pool.FindFileByName(name)
                return True
            except KeyError:
                return False
        print(json.dumps({"default": [known(descriptor_pool.Default(), n) for n in names],
                          "private": [known(tfapi.POOL, n) for n in names],
                          "full_name": tfapi.predict_pb2.PredictRequest.DESCRIPTOR.full_name}))
    """)
    assert got == {"default": [False, False], "private": [True, True], "full_name": "tensorflow.serving.PredictRequest"}


# A PredictRequest built with the sidecar's messages, read with tensorflow-serving-api's, and back.
ROUND_TRIP = """
    import json
    import numpy as np

    def ours():
        from sidecar.wire import tensors
        from sidecar.wire.tfapi import predict_pb2
        return predict_pb2, tensors

    def theirs():
        from tensorflow_serving.apis import predict_pb2
        import tensorflow as tf
        return predict_pb2, tf

    {load}
    img = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    req = our_pb2.PredictRequest(client_id=b"client-7", output_filter=["scores"])
    req.model_spec.name = "cnn"
    req.model_spec.signature_name = "serving_default"
    req.model_spec.version.value = 3
    req.inputs["image"].CopyFrom(tensors.to_proto(img))
    req.request_options.client_id = b"opt"
    req.request_options.max_cache_length = 9
    req.request_options.handshake.estimated_payload_bytes = 12345

    tf_req = tf_pb2.PredictRequest.FromString(req.SerializeToString())
    back = our_pb2.PredictRequest.FromString(tf_req.SerializeToString())
    tf_img = tf.make_ndarray(tf_req.inputs["image"])
    # and a tensor written by TF, read by the sidecar
    tf_req.inputs["mask"].CopyFrom(tf.make_tensor_proto(np.array([[True, False]])))
    mask = tensors.to_ndarray(our_pb2.PredictRequest.FromString(tf_req.SerializeToString()).inputs["mask"])
    print(json.dumps({{
        "types_differ": type(req) is not type(tf_req),
        "model": [tf_req.model_spec.name, tf_req.model_spec.signature_name, tf_req.model_spec.version.value],
        "client_id": tf_req.client_id.decode(),
        "options": [tf_req.request_options.client_id.decode(), tf_req.request_options.max_cache_length,
                    tf_req.request_options.handshake.estimated_payload_bytes],
        "image_equal": bool(np.array_equal(tf_img, img)) and tf_img.dtype == np.float32,
        "mask": mask.tolist(),
        "back_equal": back == req,
    }}))
"""
EXPECTED = {"types_differ": True, "model": ["cnn", "serving_default", 3], "client_id": "client-7",
            "options": ["opt", 9, 12345], "image_equal": True, "mask": [[True, False]], "back_equal": True}


@pytest.mark.skipif(not HAS_TF_SERVING, reason="tensorflow-serving-api is not installed (the serving extra)")
@pytest.mark.parametrize("order", ["sidecar first", "tensorflow first"])
def test_sidecar_and_tensorflow_share_a_process_in_either_order(order):
    first, second = ("our_pb2, tensors = ours()", "tf_pb2, tf = theirs()")
    if order == "tensorflow first":
        first, second = second, first
    assert _run(ROUND_TRIP.format(load=f"{first}\n    {second}")) == EXPECTED


def test_reflection_pool_describes_tf_serving_and_hashguard_services_without_tensorflow():
    """gRPC reflection takes one pool; ReflectionPool serves the private TF Serving
    files and hashguard's own (default pool) through it."""
    got = _run("""
        import json
        from concurrent import futures
        import grpc
        from grpc_reflection.v1alpha import reflection
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        from sidecar.wire import tfapi
        from sidecar.api import classifier_pb2  # noqa: F401 (registers hashguard.v1 in the default pool)

        server = grpc.server(futures.ThreadPoolExecutor(2))
        names = ("tensorflow.serving.PredictionService", "hashguard.v1.Classifier", reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server, pool=tfapi.ReflectionPool())
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(f"127.0.0.1:{port}"))
        found = {s: db.FindFileContainingSymbol(s).name for s in
                 ("tensorflow.serving.PredictionService", "tensorflow.TensorProto", "hashguard.v1.Classifier")}
        server.stop(0)
        print(json.dumps(found))
    """)
    assert got == {"tensorflow.serving.PredictionService": "tensorflow_serving/apis/prediction_service.proto",
                   "tensorflow.TensorProto": "tensorflow/core/framework/tensor.proto",
                   "hashguard.v1.Classifier": "hashguard/v1/classifier.proto"}


def test_the_sidecar_server_answers_reflection_for_tf_serving_services():
    """What grpcurl and other reflection clients see on the sidecar's own port."""
    got = _run("""
        import asyncio, json
        import grpc
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        from sidecar.config import Settings
        from sidecar.server import SidecarServer
        from sidecar.testing import FakeBackend

        async def main():
            server = SidecarServer(Settings(host="127.0.0.1", port=0, rest_port=0, metrics_port=0),
                                   backend=FakeBackend())
            port = await server.start()
            def look():
                db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(f"127.0.0.1:{port}"))
                return {s: db.FindFileContainingSymbol(s).name for s in
                        ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                         "hashguard.v1.Classifier")}
            found = await asyncio.to_thread(look)
            await server.stop(0)
            print(json.dumps(found))

        asyncio.run(main())
    """)
    assert got == {"tensorflow.serving.PredictionService": "tensorflow_serving/apis/prediction_service.proto",
                   "tensorflow.serving.ModelService": "tensorflow_serving/apis/model_service.proto",
                   "hashguard.v1.Classifier": "hashguard/v1/classifier.proto"}
