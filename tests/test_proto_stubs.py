"""Committed stubs must match what proto/generate.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    assert {p.name for p in written} == {"classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py"}
    for p in written:
        committed = REPO / "sidecar" / "api" / p.name
        assert committed.read_text() == p.read_text(), f"{committed} is stale: run `make proto`"


def test_stubs_import_and_describe_the_api():
    from sidecar.api import classifier_pb2, classifier_pb2_grpc

    svc = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    assert {m.name for m in svc.methods} == {"Classify", "ClassifyBatch", "ClassifyStream"}
    assert hasattr(classifier_pb2_grpc, "ClassifierStub")
