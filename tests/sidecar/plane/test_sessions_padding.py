"""Session store bounds and ordering; time-layer targets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sidecar.judge.judgment import Anchor, Fingerprint
from sidecar.plane.padding import LatencyModel, LoopTimer, Padder, PaddingSettings, TimerfdTimer, size_bucket
from sidecar.state.sessions import MemorySessionStore
from fake_timer import RecordingTimer


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
    assert off.target("m", 1) == 0
    fixed = Padder(PaddingSettings("fixed", fixed_target_s=0.05))
    assert fixed.target("m", 1) == fixed.target("m", 64) == 0.05
    dist = Padder(PaddingSettings("distribution", floor_s=0.001, quantile=0.5, margin_s=0.002))
    assert dist.target("m", 1) == 0.001  # nothing forwarded yet: the floor
    for s in (0.010, 0.011, 0.012):
        dist.observe_forward("m", 1, s)
    target = dist.target("m", 1)
    assert target == dist.schedule.grid_up(0.011 + 0.002)  # the median plus the margin, on the grid
    assert 0.013 <= target < 0.013 * dist.settings.step
    assert dist.deadline(100.0, "m", 1) == 100.0 + target


def test_release_target_moves_up_at_once_and_down_a_step_at_a_time():
    p = Padder(PaddingSettings("distribution", window=4, quantile=1.0, margin_s=0.0))
    grid = p.schedule.grid_up
    for s in (0.010,) * 4:
        p.observe_forward("m", 1, s)
    assert p.target("m", 1) == grid(0.010)
    p.observe_forward("m", 1, 0.0101)  # a need within the same step: no change
    assert p.target("m", 1) == grid(0.010)
    p.observe_forward("m", 1, 0.030)  # a slower forward: up at once
    high = p.target("m", 1)
    assert high == grid(0.030)
    for _ in range(3):  # while the slow one is in the window, nothing moves
        p.observe_forward("m", 1, 0.0101)
    assert p.target("m", 1) == high
    for k in (1, 2):  # then down one step per forward
        p.observe_forward("m", 1, 0.0101)
        assert p.target("m", 1) == pytest.approx(high / p.settings.step ** k)
    for _ in range(40):
        p.observe_forward("m", 1, 0.0101)
    settled = p.target("m", 1)
    assert settled == pytest.approx(grid(0.0101) * p.settings.step)  # stops one step above the need
    p.observe_forward("m", 1, 0.0101 * p.settings.step * 0.99)  # a little more need: nothing moves
    assert p.target("m", 1) == settled


def test_schedule_grid_is_geometric_and_covers_the_need():
    sched = Padder(PaddingSettings()).schedule
    for need in (0.00005, 0.0013, 0.0042, 0.25):
        up = sched.grid_up(need)
        assert up >= need and up < max(need, 1e-4) * sched.step * (1 + 1e-9)
    assert sched.grid_up(sched.grid_up(0.0042)) == pytest.approx(sched.grid_up(0.0042))


def test_a_bucket_without_forwards_borrows_the_nearest_one():
    p = Padder(PaddingSettings("distribution", quantile=1.0, margin_s=0.0))
    p.observe_forward("m", 2, 0.004)
    two = p.target("m", 2)
    assert p.target("m", 1) == two  # larger bucket, as it is
    assert p.target("m", 8) == pytest.approx(two * 4)  # smaller bucket, scaled by size
    assert p.target("other", 1) == 0.0


def test_latency_model_quantile_and_window():
    lm = LatencyModel(4)
    for s in (0.4, 0.1, 0.3, 0.2):
        lm.observe("m", 1, s)
    assert lm.quantile("m", 1, 0.5) == 0.2 and lm.quantile("m", 1, 1.0) == 0.4 and lm.quantile("m", 1, 0.0) == 0.1
    lm.observe("m", 1, 0.05)  # 0.4 leaves the window
    assert lm.quantile("m", 1, 1.0) == 0.3 and lm.count("m") == 4
    assert lm.quantile("m", 2, 0.5) is None


def test_padding_settings_are_checked():
    for bad in ({"mode": "spin"}, {"quantile": 1.5}, {"margin_s": -1.0}, {"step": 1.0}, {"window": 0}):
        with pytest.raises(ValueError):
            PaddingSettings(**bad)


async def test_release_awaits_the_timer_even_past_the_deadline_and_off_never_waits():
    clock = Clock()
    timers = []
    p = Padder(PaddingSettings("fixed", fixed_target_s=0.05), clock=clock,
               timer=lambda loop: timers.append(RecordingTimer(loop)) or timers[-1])
    task = asyncio.create_task(p.release(p.deadline(0.0, "m", 1)))
    await asyncio.sleep(0)
    clock.t = 0.05
    timers[0].fire()
    assert await task == 0.05
    clock.t = 1.0  # long past the next deadline: still through the timer, not a shortcut
    task = asyncio.create_task(p.release(p.deadline(0.0, "m", 1)))
    await asyncio.sleep(0)
    assert not task.done() and [d for d, _ in timers[0].waits] == [0.05, 0.05]
    timers[0].fire()
    assert await task == 0.0
    assert len(timers) == 1  # one timer per event loop
    off = Padder(PaddingSettings("off"), timer=lambda loop: pytest.fail("off must not arm a timer"))
    assert await off.release(123.0) == 0.0


@pytest.mark.parametrize("make", [TimerfdTimer, LoopTimer])
async def test_timers_complete_in_deadline_order_and_not_before(make):
    import sys
    import time

    if make is TimerfdTimer and not sys.platform.startswith("linux"):
        pytest.skip("timerfd is Linux only")
    timer = make(asyncio.get_running_loop())
    try:
        now = time.perf_counter()
        deadlines = [now + d for d in (0.03, 0.01, 0.02, -1.0)]  # the last one has passed already
        done = []

        async def one(d):
            await timer.wait(d)
            done.append((d, time.perf_counter()))

        await asyncio.gather(*(one(d) for d in deadlines))
        assert [d for d, _ in done] == sorted(deadlines)
        assert all(woke >= d for d, woke in done)  # never released early
    finally:
        timer.close()
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
