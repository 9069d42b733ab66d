"""Committed stubs must match what proto/generate.py makes from the .proto files,
and the vendored TF Serving protos must describe what tensorflow-serving-api does."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[3]
API_STUBS = ("classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py")
PRIVATE = Path("sidecar") / "_tfproto"
HAND_WRITTEN = {PRIVATE / "__init__.py"}


def _tree(root: Path, rel: Path) -> dict[Path, str]:
    return {p.relative_to(root): p.read_text() for p in sorted((root / rel).rglob("*.py*"))
            if "__pycache__" not in p.parts and p.relative_to(root) not in HAND_WRITTEN}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    # protoc runs in its own process: in-process it can crash once TensorFlow's
    # protobuf descriptors are loaded by other tests.
    out = tmp_path_factory.mktemp("gen")
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), str(out)], check=True, capture_output=True)
    return out


def test_the_generator_is_the_pinned_one():
    """protoc's output carries its version, so drift is only judged with the pinned generator."""
    import re
    from importlib.metadata import version

    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                          (REPO / "sidecar" / "api" / "classifier_pb2_grpc.py").read_text()).group(1)
    pin = re.search(r'"grpcio-tools==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert made_with == pin, f"stubs made with grpcio-tools {made_with}, pyproject pins {pin}: run `make proto`"
    assert version("grpcio-tools") == pin, f"grpcio-tools {version('grpcio-tools')} installed, {pin} pinned"


def test_committed_api_stubs_match_proto(generated):
    api = generated / "sidecar" / "api"
    assert sorted(p.name for p in api.iterdir()) == sorted(API_STUBS)
    for name in API_STUBS:
        committed = REPO / "sidecar" / "api" / name
        assert committed.read_text() == (api / name).read_text(), f"{committed} is stale: run `make proto`"


def test_committed_private_tf_package_matches_the_vendored_protos(generated):
    fresh, committed = _tree(generated, PRIVATE), _tree(REPO, PRIVATE)
    assert sorted(fresh) == sorted(committed), "sidecar/_tfproto has missing or extra modules: run `make proto`"
    stale = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert not stale, f"stale generated modules (run `make proto`): {stale[:5]}"
    assert len(fresh) > 30  # the whole import closure, not a stub or two


def test_private_package_uses_its_own_pool_and_imports():
    for path, text in _tree(REPO, PRIVATE).items():
        assert "_descriptor_pool.Default()" not in text, path
        for line in text.splitlines():
            if line.startswith(("from tensorflow", "import tensorflow", "from xla", "import xla")):
                pytest.fail(f"{path} imports a public package: {line}")


def test_stubs_import_and_describe_the_api():
    from sidecar.api import classifier_pb2, classifier_pb2_grpc

    svc = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    assert {m.name for m in svc.methods} == {"Classify", "ClassifyBatch", "ClassifyStream"}
    assert hasattr(classifier_pb2_grpc, "ClassifierStub")


def test_private_services_are_tf_servings():
    from sidecar.wire import tfapi

    pred = tfapi.prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
    assert pred.full_name == "tensorflow.serving.PredictionService"
    assert {m.name for m in pred.methods} == {"Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata"}
    model = tfapi.model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
    assert {m.name for m in model.methods} == {"GetModelStatus", "HandleReloadConfigRequest"}
    fields = tfapi.predict_pb2.PredictRequest.DESCRIPTOR.fields_by_name
    assert {"model_spec", "inputs", "output_filter", "client_id", "request_options"} <= set(fields)


def _closure(fd, seen: dict) -> dict:
    if fd.name not in seen:
        seen[fd.name] = fd
        for dep in fd.dependencies:
            _closure(dep, seen)
    return seen


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_serving") is None,
                    reason="tensorflow-serving-api is not installed (the serving extra)")
def test_vendored_protos_describe_what_the_installed_tensorflow_serving_api_does():
    """Every vendored file compiles to the installed wheels' FileDescriptorProto:
    same messages, fields, numbers, types, options; only comments may differ."""
    from sidecar.wire import tfapi

    theirs: dict = {}
    ours: dict = {}
    for name in ("prediction_service_pb2", "model_service_pb2"):
        _closure(importlib.import_module(f"tensorflow_serving.apis.{name}").DESCRIPTOR, theirs)
        _closure(getattr(tfapi, name).DESCRIPTOR, ours)
    assert sorted(ours) == sorted(theirs)
    differ = [name for name in sorted(theirs)
              if descriptor_pb2.FileDescriptorProto.FromString(theirs[name].serialized_pb)
              != descriptor_pb2.FileDescriptorProto.FromString(ours[name].serialized_pb)]
    assert not differ, f"vendored protos differ from the installed tensorflow-serving-api: {differ}"
