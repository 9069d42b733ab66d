"""The forwarded call's short cuts give what the long way gives (issue 28): request bytes
encoded by hand, the answer read from its bytes, one image judged without a plan, and
OpenCV loaded with the first image instead of at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sidecar.backend.base import ModelKey, ModelRef, Signature
from sidecar.backend.tfserving import PredictWire, fill_float_tensor
from sidecar.errors import InvalidInput
from sidecar.judge.judgment import Anchor, Thresholds, fingerprints, judge
from sidecar.judge.policy import OutputPolicy
from sidecar.metrics import Metrics
from sidecar.plane.dataplane import DataPlane, ImageCall, JudgmentSettings
from sidecar.plane.identity import Caller
from sidecar.plane.padding import Padder, PaddingSettings
from sidecar.state.sessions import MemorySessionStore
from sidecar.testing import FakeBackend
from sidecar.wire.images import WireImages, encode_raw
from sidecar.wire.tensors import to_proto
from sidecar.wire.tfapi import predict_pb2

REPO = Path(__file__).resolve().parents[3]


def _built(key: ModelKey, sig: Signature, batch: np.ndarray) -> bytes:
    req = predict_pb2.PredictRequest()
    ModelRef(key.name, key.version, "", key.signature).spec_into(req.model_spec)
    fill_float_tensor(req.inputs[sig.input_name], batch)
    req.output_filter.append(sig.output_name)
    return req.SerializeToString()


@pytest.mark.parametrize("key, sig, shape, dtype", [
    (ModelKey("cnn", 1), Signature("image", (32, 32, 3), "scores", 10), (1, 32, 32, 3), np.float32),
    (ModelKey("cnn", 1), Signature("image", (32, 32, 3), "scores", 10), (5, 32, 32, 3), np.uint8),
    (ModelKey("m", 0, ""), Signature("x" * 200, (None, None, 1), "out"), (300, 0, 5, 1), np.float32),
    (ModelKey("m", 2 ** 40, "sig"), Signature("in", (64, 64, 3), "o"), (3, 64, 64, 3), np.float64),
])
def test_request_bytes_are_the_serialized_request(key, sig, shape, dtype):
    batch = (np.random.default_rng(1).random(shape) * 255).astype(dtype)
    wire = PredictWire(key, sig)
    assert wire.encode(batch) == _built(key, sig, batch)
    assert wire.encode(batch[::-1]) == _built(key, sig, batch[::-1])  # not contiguous
    assert wire.encode(batch.astype(">f4")) == _built(key, sig, batch)  # big-endian in, little-endian out


def test_scores_are_read_from_the_bytes_and_oddities_go_the_long_way():
    wire = PredictWire(ModelKey("m", 1), Signature("image", (32, 32, 3), "scores", 10))
    scores = np.random.default_rng(2).random((3, 10)).astype(np.float32)
    resp = predict_pb2.PredictResponse()
    resp.outputs["scores"].CopyFrom(to_proto(scores))
    wire_resp = predict_pb2.PredictResponse.FromString(resp.SerializeToString())
    assert np.array_equal(wire.scores(wire_resp, 3), scores)
    resp.outputs["scores"].CopyFrom(to_proto(scores.astype(np.float64)))  # not float32: to_ndarray converts
    assert np.array_equal(wire.scores(resp, 3), scores)
    odd = predict_pb2.PredictResponse()
    odd.outputs["scores"].dtype = 1
    odd.outputs["scores"].tensor_shape.dim.add(size=3)
    odd.outputs["scores"].tensor_shape.dim.add(size=10)
    odd.outputs["scores"].tensor_content = scores.tobytes()
    odd.outputs["scores"].float_val.append(1.0)  # both set: refused, as to_ndarray refuses it
    with pytest.raises(InvalidInput, match="both tensor_content and float_val"):
        wire.scores(odd, 3)
    with pytest.raises(InvalidInput, match="returned no output 'scores'"):
        wire.scores(predict_pb2.PredictResponse(), 3)


async def test_one_image_judged_without_a_plan_decides_as_algorithm_1():
    """Every call of a paper-mode session, one image each: forwarded exactly when
    ``judge`` against the last forwarded image says so."""
    backend = FakeBackend()
    plane = DataPlane(JudgmentSettings("paper"), backend, MemorySessionStore(), Padder(PaddingSettings("off")),
                      Metrics("paper"), policy=OutputPolicy("scores"))
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    seq = []
    for i in range(40):
        img = base.copy() if i % 3 else rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        img[rng.integers(0, 32), rng.integers(0, 32)] = rng.integers(0, 256, 3)
        seq.append(img)
        if i % 3 == 0:
            base = img
    anchor, forwards = None, 0
    for img in seq:
        fp = fingerprints([img])[0]
        want = judge(anchor, fp, Thresholds()).forward
        out = await plane.infer(ImageCall("Classify", ModelRef("m"), WireImages([encode_raw(img)], single=True),
                                          Caller(peer="ipv4:10.0.0.1:5"), "s"))
        assert out.forwarded == int(want)
        if want:
            anchor, forwards = Anchor(fp, None), forwards + 1
    assert backend.calls["predict"] == forwards and 0 < forwards < len(seq)
    cached = plane.metrics.cache_answers.labels("m", "paper", "session")._value.get()
    assert cached == len(seq) - forwards


async def test_no_cache_series_before_a_cached_answer():
    from prometheus_client import generate_latest

    plane = DataPlane(JudgmentSettings("paper"), FakeBackend(), MemorySessionStore(), Padder(PaddingSettings("off")),
                      Metrics("paper"))
    img = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = await plane.infer(ImageCall("Classify", ModelRef("m"), WireImages([encode_raw(img)], single=True),
                                      Caller(peer="ipv4:10.0.0.1:5"), "s"))
    assert out.forwarded == 1
    assert b'source="session"' not in generate_latest(plane.metrics.registry)


def test_opencv_loads_with_the_first_image_not_at_start_up():
    code = """
        import json, sys
        import numpy as np
        import sidecar.server
        from sidecar.judge.judgment import Fingerprint
        from sidecar.judge.phash import phash_cv2
        before = "cv2" in sys.modules
        img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        same = Fingerprint.of(img).hash == phash_cv2(img)
        print(json.dumps({"before": before, "after": "cv2" in sys.modules, "same": same}))
    """
    import textwrap

    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"before": False, "after": True, "same": True}
