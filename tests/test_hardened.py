"""Hardened mode: several anchors per session, memory across sessions, identity
from authenticated principals."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.crosssession import CrossSessionIndex
from sidecar.judgment import Anchor, Fingerprint, Thresholds, plan, resolve
from test_judgment import perturb
from test_sidecar_integration import BackendCounter, backend, channel, classify_req, start_sidecar  # noqa: F401
from test_sidecar_faults import snapshot

TH = Thresholds()


def fps(*imgs):
    return [Fingerprint.of(x) for x in imgs]


def test_multi_anchor_hit_survives_interleaving(test_images):
    a, b = test_images[40], test_images[41]
    seq = fps(a, perturb(a, 1), b, perturb(a, 3), perturb(b, 2))
    paper = plan([], seq, TH, history=1)
    hard = plan([], seq, TH, history=8)
    assert [s.forward for s in paper.steps] == [True, False, True, True, True]  # the bypass
    assert [s.forward for s in hard.steps] == [True, False, True, False, False]
    answers, anchors = resolve(hard, ["A", "B"])
    assert answers == ["A", "A", "B", "A", "B"] and [x.result for x in anchors] == ["A", "B"]


def test_history_is_bounded(test_images):
    imgs = [test_images[i] for i in range(50, 55)]
    p = plan([], fps(*imgs), TH, history=3)
    assert len(p.anchors) == 3
    late = plan(resolve(p, list("abcde"))[1], fps(perturb(imgs[0], 1)), TH, history=3)
    assert late.steps[0].forward  # the oldest anchor fell out of the window


def test_cross_session_lookup_and_window_eviction(test_images):
    idx = CrossSessionIndex(window=2, ttl_s=0, radius=25)
    a, b, c = fps(test_images[60], test_images[61], test_images[62])
    idx.add("m", [Anchor(a, "A"), Anchor(b, "B")])
    find = idx.lookup("m")
    assert find(Fingerprint.of(perturb(test_images[60], 2))).result == "A"
    assert idx.lookup("other") is None  # per model
    idx.add("m", [Anchor(c, "C")])
    assert idx.lookup("m")(Fingerprint.of(perturb(test_images[60], 2))) is None  # evicted: window of 2
    assert idx.lookup("m")(c).result == "C"
    assert len(idx) == 2


def test_cross_session_ttl(test_images):
    now = [0.0]
    idx = CrossSessionIndex(window=10, ttl_s=5, radius=25, clock=lambda: now[0])
    a = Fingerprint.of(test_images[63])
    idx.add("m", [Anchor(a, "A")])
    assert idx.lookup("m")(a).result == "A"
    now[0] = 6.0
    found = idx.lookup("m")
    assert found is None or found(a) is None


@pytest.fixture
async def hardened(backend):  # noqa: F811
    server = await start_sidecar(backend.target, mode="hardened")
    yield server
    await server.stop(0)


async def test_cross_session_hit_over_grpc(hardened, test_images):
    a = test_images[70]
    counter = BackendCounter(hardened)
    async with channel(hardened) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        first = await stub.Classify(classify_req(a, session="one"))
        rotated = [await stub.Classify(classify_req(perturb(a, k, k), session=f"fresh-{k}")) for k in (1, 3, 5)]
    assert counter.calls == 1  # every fresh session got the first session's answer
    assert all(r.result.scores == first.result.scores for r in rotated)
    reg = hardened.metrics.registry
    assert reg.get_sample_value("hashguard_cache_answers_total", {"model": "tiny", "mode": "hardened", "source": "lookup"}) == 3


async def test_interleaving_bypasses_paper_but_not_hardened(backend, test_images):  # noqa: F811
    a, decoy = test_images[71], test_images[72]
    calls = {}
    for mode in ("paper", "hardened"):
        server = await start_sidecar(backend.target, mode=mode)
        try:
            counter = BackendCounter(server)
            async with channel(server) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                await stub.Classify(classify_req(a))
                for k in range(1, 4):
                    await stub.Classify(classify_req(decoy))
                    await stub.Classify(classify_req(perturb(a, k, k)))
            calls[mode] = counter.calls
        finally:
            await server.stop(0)
    assert calls["paper"] == 7  # every perturbed query reached the model
    assert calls["hardened"] == 2  # only a and the decoy, once each


@pytest.fixture
async def authed(backend, tmp_path):  # noqa: F811
    tokens = tmp_path / "tokens"
    tokens.write_text("# token principal\nt-alice alice\nt-bob bob\n")
    server = await start_sidecar(backend.target, mode="paper", auth_tokens=str(tokens))
    yield server
    await server.stop(0)


async def test_principal_not_session_id_is_the_session(authed, test_images):
    a = test_images[73]
    counter = BackendCounter(authed)
    alice = [("authorization", "Bearer t-alice")]
    async with channel(authed) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        await stub.Classify(classify_req(a, session="chosen-1"), metadata=alice)
        await stub.Classify(classify_req(perturb(a, 2), session="chosen-2"), metadata=alice)
        assert counter.calls == 1  # a new client-chosen session id did not reset alice's anchor
        await stub.Classify(classify_req(perturb(a, 2), session="chosen-1"), metadata=[("authorization", "Bearer t-bob")])
        assert counter.calls == 2  # bob is another principal: his own anchor
    assert any(k.startswith("u:alice") for k in snapshot(authed))


async def test_bad_or_missing_token_is_unauthenticated_and_changes_nothing(authed, test_images):
    async with channel(authed) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        await stub.Classify(classify_req(test_images[74]), metadata=[("authorization", "Bearer t-alice")])
        before = snapshot(authed)
        for md in ([("authorization", "Bearer wrong")], [("authorization", "Basic dDp4")], []):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Classify(classify_req(test_images[75]), metadata=md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert snapshot(authed) == before


async def test_concurrent_fresh_sessions_wait_for_the_image_in_flight(backend, test_images):  # noqa: F811
    """Many fresh sessions at once with copies of one image: only one reaches the
    model; the others wait for its answer instead of racing past the index."""
    import asyncio

    server = await start_sidecar(backend.target, mode="hardened")
    try:
        counter = BackendCounter(server)
        original = server.guard.backend.predict

        in_flight = asyncio.Event()

        async def slow(key, batch):  # keep the first forward in flight a while
            in_flight.set()
            await asyncio.sleep(0.3)
            return await original(key, batch)

        server.guard.backend.predict = slow
        a = test_images[76]
        async with channel(server) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            first = asyncio.ensure_future(stub.Classify(classify_req(a, session="first")))
            await asyncio.wait_for(in_flight.wait(), 10)
            rest = await asyncio.gather(*(stub.Classify(classify_req(perturb(a, k % 5 + 1, k), session=f"f{k}"))
                                          for k in range(12)))
            head = await first
        assert counter.calls == 1
        assert all(r.result.scores == head.result.scores for r in rest)
    finally:
        await server.stop(0)


async def test_waiters_fail_like_the_forward_and_keep_no_state(backend, test_images):  # noqa: F811
    import asyncio

    from sidecar.errors import BackendUnavailable

    server = await start_sidecar(backend.target, mode="hardened")
    try:
        in_flight = asyncio.Event()

        async def down(key, batch):
            in_flight.set()
            await asyncio.sleep(0.2)
            raise BackendUnavailable("model backend unavailable: test")

        server.guard.backend.predict = down
        a = test_images[77]
        async with channel(server) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            first = asyncio.ensure_future(stub.Classify(classify_req(a, session="first")))
            await asyncio.wait_for(in_flight.wait(), 10)
            second = stub.Classify(classify_req(perturb(a, 1), session="second"))
            for call in (first, second):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert snapshot(server) == {}
        assert len(server.guard.index) == 0
    finally:
        await server.stop(0)
