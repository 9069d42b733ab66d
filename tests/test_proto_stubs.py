"""Committed stubs must match what proto/generate.py makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUBS = ("classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py")


def test_committed_stubs_match_proto(tmp_path):
    # protoc runs in its own process: in-process it can crash once TensorFlow's
    # protobuf descriptors are loaded by other tests.
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), str(tmp_path)], check=True,
                   capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(STUBS)
    for name in STUBS:
        committed = REPO / "sidecar" / "api" / name
        assert committed.read_text() == (tmp_path / name).read_text(), f"{committed} is stale: run `make proto`"


def test_stubs_import_and_describe_the_api():
    from sidecar.api import classifier_pb2, classifier_pb2_grpc

    svc = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    assert {m.name for m in svc.methods} == {"Classify", "ClassifyBatch", "ClassifyStream"}
    assert hasattr(classifier_pb2_grpc, "ClassifierStub")
