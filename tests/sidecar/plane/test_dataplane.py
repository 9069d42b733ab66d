"""The data plane on its own (with the official FakeBackend), the error table,
and the real gRPC backend client's caches (against a sidecar that serves TF
Serving's API over a FakeBackend)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from fake_sidecar import image, one_pixel, start_fake_sidecar
from sidecar.backend.base import ModelKey, ModelRef
from sidecar.backend.tfserving import GrpcBackend
from sidecar.plane.dataplane import DataPlane, ImageCall, JudgmentSettings
from sidecar.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    HashguardError,
    InvalidInput,
    NotFound,
    Refused,
    TooLarge,
    Unauthenticated,
    http_status_of,
    status_of,
)
from sidecar.plane.identity import Caller, IdentityPolicy
from sidecar.metrics import Metrics
from sidecar.plane.padding import Padder, PaddingSettings
from sidecar.judge.policy import OutputPolicy
from sidecar.state.sessions import MemorySessionStore
from sidecar.testing import FakeBackend

C = grpc.StatusCode


def plane_with(backend=None, mode="paper", policy=OutputPolicy(), **kw) -> DataPlane:
    return DataPlane(JudgmentSettings(mode), backend or FakeBackend(), MemorySessionStore(),
                     Padder(PaddingSettings("off")), Metrics(mode), policy=policy, **kw)


def call(images, session="s", **ref) -> ImageCall:
    return ImageCall("test", ModelRef("m", **ref), images, Caller(peer="ipv4:10.0.0.1:99"), session_id=session)


def state(plane):
    return {k: tuple(id(a) for a in e.anchors) for k, e in plane.store._entries.items()}


@pytest.mark.parametrize("exc, grpc_code, http", [
    (InvalidInput("x"), C.INVALID_ARGUMENT, 400), (NotFound("x"), C.NOT_FOUND, 404),
    (TooLarge("x"), C.RESOURCE_EXHAUSTED, 413), (Unauthenticated("x"), C.UNAUTHENTICATED, 401),
    (Refused("x"), C.FAILED_PRECONDITION, 412), (BackendUnavailable("x"), C.UNAVAILABLE, 503),
    (BackendTimeout("x"), C.DEADLINE_EXCEEDED, 504), (BackendError(C.PERMISSION_DENIED, "x"), C.PERMISSION_DENIED, 403),
    (ValueError("secret detail"), C.INTERNAL, 500),
])
def test_one_table_maps_errors_to_grpc_and_http(exc, grpc_code, http):
    assert status_of(exc)[0] == grpc_code
    assert http_status_of(exc)[0] == http
    if not isinstance(exc, HashguardError):
        assert "secret" not in status_of(exc)[1]  # unexpected errors do not leak their text


def test_a_subclass_with_its_own_code_keeps_it():
    class StoreDown(HashguardError):
        code = C.UNAVAILABLE

    assert status_of(StoreDown("redis down")) == (C.UNAVAILABLE, "redis down")
    assert http_status_of(StoreDown("redis down"))[0] == 503


async def test_answers_are_keyed_by_the_served_version():
    backend = FakeBackend()
    plane = plane_with(backend)
    a = image(11)
    first = await plane.infer(call([a]))
    assert first.key == ModelKey("m", 2) and first.forwarded == 1
    for ref in ({"version": 2}, {"label": "canary"}):
        out = await plane.infer(call([one_pixel(a, 1)], **ref))
        assert out.forwarded == 0 and out.key == first.key
        np.testing.assert_array_equal(out.answers[0].scores, first.answers[0].scores)
    stable = await plane.infer(call([one_pixel(a, 1)], label="stable"))
    assert stable.forwarded == 1 and stable.key == ModelKey("m", 1)
    assert backend.calls["predict"] == 2


async def test_a_backend_failure_commits_nothing_and_is_unavailable():
    backend = FakeBackend()
    plane = plane_with(backend)
    await plane.infer(call([image(12)]))
    before = state(plane)
    backend.fail_with = BackendUnavailable("model backend unavailable: test")
    with pytest.raises(BackendUnavailable):
        await plane.infer(call([image(13)]))
    assert state(plane) == before
    backend.fail_with = None
    out = await plane.infer(call([image(13)]))
    assert out.forwarded == 1 and state(plane) != before


async def test_bad_calls_change_nothing_and_reach_no_model():
    backend = FakeBackend()
    plane = plane_with(backend, identity=IdentityPolicy(max_len=8))
    await plane.infer(call([image(14)]))
    before, calls = state(plane), backend.calls["predict"]
    bad = [
        (call([]), InvalidInput),
        (call([image(1)] * 2000), TooLarge),
        (call([np.zeros((8, 8, 3), np.uint8)]), InvalidInput),
        (call([np.zeros((32, 32, 3), np.float64)]), InvalidInput),
        (call([image(1)], session="x" * 9), InvalidInput),
        (call([image(1)], version=7), NotFound),
        (ImageCall("test", ModelRef("m"), [image(1)], input_name="pixels"), InvalidInput),
        (call(np.zeros((2, 32, 32), np.float32)), InvalidInput),
        (call(np.zeros((1, 32, 32, 3), np.int32)), InvalidInput),
    ]
    for c, err in bad:
        with pytest.raises(err):
            await plane.infer(c)
        assert state(plane) == before and backend.calls["predict"] == calls


async def test_mode_off_forwards_everything_and_policy_still_applies():
    backend = FakeBackend()
    plane = plane_with(backend, mode="off", policy=OutputPolicy("label"))
    a = image(15)
    outs = [await plane.infer(call([img])) for img in (a, one_pixel(a), a)]
    assert backend.calls["predict"] == 3 and all(o.forwarded == 1 for o in outs)
    assert all(len(o.answers[0].scores) == 0 for o in outs)  # label policy: no scores shown
    dense = outs[0].dense()
    assert dense.shape == (1, 10) and dense.sum() == 1 and dense[0, outs[0].answers[0].label] == 1


async def test_passthrough_is_refused_unless_allowed():
    backend = FakeBackend()
    plane = plane_with(backend)
    with pytest.raises(Refused, match="--passthrough classify"):
        await plane.passthrough("Classify", None)
    with pytest.raises(Refused, match="not served"):
        await plane.passthrough("Anything", None)
    assert sum(backend.calls.values()) == 0
    allowed = plane_with(backend, passthrough=frozenset({"classify"}))
    await allowed.passthrough("Classify", None)
    assert backend.calls["Classify"] == 1
    with pytest.raises(ValueError, match="--passthrough: unknown"):
        plane_with(backend, passthrough=frozenset({"predict"}))


async def test_grpc_backend_caches_resolutions_and_signatures():
    """The real client against a sidecar serving TF Serving's API (mode off) over a FakeBackend:
    one metadata round trip per model reference per TTL, none on the hot path."""
    upstream = FakeBackend()
    server = await start_fake_sidecar(upstream, rest=False, mode="off")
    backend = GrpcBackend(f"127.0.0.1:{server.port}", timeout_s=5, resolve_ttl_s=60)
    now = [0.0]
    backend.cache.clock = lambda: now[0]
    try:
        plane = plane_with(backend)
        for i in range(10):
            await plane.infer(call([image(100 + i)], session=f"s{i}"))
        assert upstream.calls["GetModelMetadata"] == 1 and upstream.calls["predict"] == 10
        out = await plane.infer(call([image(200)], label="canary"))
        assert out.key == ModelKey("m", 2) and upstream.calls["GetModelMetadata"] == 2
        await plane.infer(call([image(201)], label="canary"))
        assert upstream.calls["GetModelMetadata"] == 2
        now[0] = 61.0  # the resolution expired: one new round trip, then cached again
        await plane.infer(call([image(202)]))
        await plane.infer(call([image(203)]))
        assert upstream.calls["GetModelMetadata"] == 3
        with pytest.raises(NotFound):
            await plane.infer(call([image(204)], label="nope"))
    finally:
        await backend.close()
        await server.stop(0)
