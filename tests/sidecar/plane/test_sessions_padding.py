"""Session store bounds and ordering; time-layer targets."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from sidecar.judge.judgment import Anchor, Fingerprint
from sidecar.plane.padding import LatencyModel, Padder, PaddingSettings, size_bucket
from sidecar.state.sessions import MemorySessionStore


def anchor(v: int) -> Anchor:
    return Anchor(Fingerprint.of(np.full((4, 4, 3), v, np.uint8)), v)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


async def commit(store, sid, v):
    async with store.hold(sid) as slot:
        slot.anchors = (anchor(v),)


async def test_commit_and_peek():
    store = MemorySessionStore()
    await commit(store, "a", 1)
    assert [a.result for a in store.peek("a")] == [1]
    assert store.peek("b") == ()


async def test_exception_inside_hold_commits_nothing():
    store = MemorySessionStore()
    await commit(store, "a", 1)
    with pytest.raises(RuntimeError):
        async with store.hold("a") as slot:
            slot.anchors = (anchor(2),)
            raise RuntimeError("backend down")
    assert [a.result for a in store.peek("a")] == [1]
    with pytest.raises(RuntimeError):
        async with store.hold("new") as slot:
            raise RuntimeError("x")
    assert len(store) == 1  # a failed first request leaves no session behind


async def test_lru_eviction_bounds_sessions():
    evicted = []
    store = MemorySessionStore(max_sessions=3, on_evict=evicted.append)
    for i in range(5):
        await commit(store, f"s{i}", i)
    assert len(store) == 3
    assert store.peek("s0") == () and store.peek("s1") == ()
    assert evicted == ["lru", "lru"]
    await commit(store, "s2", 22)  # touch s2: s3 is now least recent
    await commit(store, "s5", 5)
    assert store.peek("s3") == () and store.peek("s2")


async def test_ttl_expiry():
    clock = Clock()
    store = MemorySessionStore(ttl_s=10, clock=clock)
    await commit(store, "a", 1)
    clock.t = 5
    assert store.peek("a")
    clock.t = 16
    assert store.peek("a") == ()
    async with store.hold("a") as slot:
        assert slot.anchors == ()


async def test_concurrent_requests_of_one_session_are_serialised():
    store = MemorySessionStore()
    order = []

    async def req(i):
        async with store.hold("s") as slot:
            order.append(("in", i, len(slot.anchors)))
            await asyncio.sleep(0.01)
            slot.anchors = slot.anchors + (anchor(i),)
            order.append(("out", i))

    await asyncio.gather(*(req(i) for i in range(5)))
    # never two inside at once; each sees every earlier commit
    for k in range(5):
        assert order[2 * k][0] == "in" and order[2 * k + 1][0] == "out"
        assert order[2 * k][2] == k


def test_size_bucket():
    assert [size_bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]


def test_padding_targets_per_mode():
    off = Padder(PaddingSettings("off"))
    assert off.target("m", 1, cached=True) == 0
    fixed = Padder(PaddingSettings("fixed", fixed_target_s=0.05))
    assert fixed.target("m", 1, cached=True) == fixed.target("m", 1, cached=False) == 0.05
    dist = Padder(PaddingSettings("distribution", floor_s=0.001, fallback_s=0.02), rng=random.Random(0))
    assert dist.target("m", 1, cached=True) == 0.02  # nothing observed yet: fallback
    for s in (0.010, 0.011, 0.012):
        dist.observe_forward("m", 1, s)
    draws = {dist.target("m", 1, cached=True) for _ in range(200)}
    assert draws == {0.010, 0.011, 0.012}
    assert dist.target("m", 1, cached=False) == 0.001  # misses only to the floor


def test_latency_model_scales_from_smaller_bucket():
    lm = LatencyModel(10, random.Random(0))
    lm.observe("m", 1, 0.002)
    assert lm.sample("m", 8) == pytest.approx(0.016)
    assert lm.sample("other", 1) is None


async def test_hold_waits_until_target():
    import time

    p = Padder(PaddingSettings("fixed", fixed_target_s=0.03))
    t0 = time.perf_counter()
    await p.hold(t0, 0.03)
    assert time.perf_counter() - t0 >= 0.028


async def test_expiry_sweep_is_bounded_per_request():
    """A request never walks the whole session table: it removes at most SWEEP_BUDGET
    expired sessions, so their removal is spread over the next requests."""
    from sidecar.state.sessions import SWEEP_BUDGET

    clock, evicted = Clock(), []
    store = MemorySessionStore(ttl_s=10, clock=clock, on_evict=evicted.append)
    for i in range(100):
        await commit(store, f"s{i}", i)
    clock.t = 100  # every session idle past its TTL
    await commit(store, "fresh", 1)
    assert evicted == ["ttl"] * SWEEP_BUDGET
    assert store.peek("s99") == ()  # an expired session reads as gone before it is swept
    for _ in range(100 // SWEEP_BUDGET):
        await commit(store, "fresh", 1)
    assert len(store) == 1 and evicted == ["ttl"] * 100


async def test_a_session_in_use_is_not_evicted():
    store = MemorySessionStore(max_sessions=2)
    entered, release = asyncio.Event(), asyncio.Event()

    async def long_hold():
        async with store.hold("busy") as slot:
            entered.set()
            await release.wait()
            slot.anchors = (anchor(9),)

    await commit(store, "busy", 1)
    task = asyncio.create_task(long_hold())
    await entered.wait()
    for i in range(5):  # "busy" is the least recent, but held: the others go
        await commit(store, f"s{i}", i)
    release.set()
    await task
    assert [a.result for a in store.peek("busy")] == [9] and len(store) == 2
