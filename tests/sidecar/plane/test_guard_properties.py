"""Property: whatever bytes a client sends, a rejected request changes no session.

Runs the gRPC adapter and data plane in process with a fake backend (no network),
so hypothesis can try hundreds of malformed requests quickly.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.api import classifier_pb2 as pb
from sidecar.plane.dataplane import DataPlane, JudgmentSettings
from sidecar.transport.grpc_classifier import ClassifierAdapter
from sidecar.transport.grpc_gate import Gate
from sidecar.plane.identity import IdentityPolicy
from sidecar.wire.images import encode_raw
from sidecar.metrics import Metrics
from sidecar.plane.padding import Padder, PaddingSettings
from sidecar.state.sessions import MemorySessionStore
from sidecar.testing import FakeBackend


class Aborted(Exception):
    def __init__(self, code, details):
        self.code, self.details = code, details


class FakeContext:
    def invocation_metadata(self):
        return ()

    def peer(self):
        return "ipv4:127.0.0.1:5555"

    def auth_context(self):
        return {}

    def time_remaining(self):  # grpc.aio's ServicerContext: None = no deadline
        return None

    async def abort(self, code, details):
        raise Aborted(code, details)


def make_classify():
    """Classify as the server runs it: gate (auth, parsing, error mapping) -> adapter -> data plane."""
    store = MemorySessionStore()
    backend = FakeBackend()
    plane = DataPlane(JudgmentSettings("paper"), backend, store, Padder(PaddingSettings("off")), Metrics("paper"),
                      identity=IdentityPolicy(max_len=32))
    handler = grpc.unary_unary_rpc_method_handler(ClassifierAdapter(plane).Classify,
                                                  request_deserializer=pb.ClassifyRequest.FromString,
                                                  response_serializer=pb.ClassifyResponse.SerializeToString)
    behavior = Gate(plane)._wrap(handler, "Classify").unary_unary

    async def classify(req, ctx):
        return await behavior(req.SerializeToString(), ctx)

    return classify, store, backend


def state(store):
    return {k: tuple(id(a) for a in e.anchors) for k, e in store._entries.items()}


raw_images = st.builds(
    lambda pixels, h, w, c, dt: pb.Image(raw=pb.RawImage(pixels=pixels, height=h, width=w, channels=c, dtype=dt)),
    st.binary(max_size=4000), st.integers(0, 40), st.integers(0, 40), st.integers(0, 4), st.sampled_from([0, 1, 7]),
)
encoded = st.builds(lambda b: pb.Image(encoded=b), st.binary(max_size=200))
floats = st.builds(
    lambda v, pos: (lambda a: (a.__setitem__(pos, v), encode_raw(a))[1])(np.full((32, 32, 3), 7.0, np.float32)),
    st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 256.0, 1e30]),
    st.tuples(st.integers(0, 31), st.integers(0, 31), st.integers(0, 2)),
)
requests = st.builds(
    lambda img, model, sid: pb.ClassifyRequest(model=pb.ModelRef(name=model), image=img, session_id=sid),
    st.one_of(raw_images, encoded, floats, st.just(pb.Image())),
    st.sampled_from(["m", "m", "unknown", ""]),
    st.sampled_from(["victim", "other", "", "x" * 40]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_rejected_requests_never_change_state(req):
    classify, store, backend = make_classify()
    ctx = FakeContext()
    good = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    async def run():
        await classify(pb.ClassifyRequest(model=pb.ModelRef(name="m"), image=encode_raw(good), session_id="victim"), ctx)
        before = state(store)
        calls = backend.calls["predict"]
        try:
            await classify(req, ctx)
        except Aborted as exc:
            assert exc.code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert exc.details
            assert state(store) == before
            assert backend.calls["predict"] == calls
            return
        # accepted: it was a valid 32x32x3 image
        assert req.model.name == "m"

    asyncio.run(run())
