"""Hardened mode's cross-session index shared by replicas over a Redis stream
(``sidecar.state.index_replication``), against fakeredis: a session-rotation attack
spread over two replicas reaches the model no more often than on one process."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis

from sidecar.backend.base import ModelRef
from sidecar.config import Settings
from sidecar.state.crosssession import CrossSessionIndex
from sidecar.plane.dataplane import ImageCall
from sidecar.plane.images import Arrays
from sidecar.errors import BackendUnavailable
from sidecar.state.index_replication import IndexReplication, ReplicatingHook, decode_images, encode_images
from sidecar.metrics import Metrics
from sidecar.server import build_plane
from sidecar.testing import FakeBackend


def test_image_codec_round_trips_and_refuses_garbage():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.random((8, 8, 1), dtype=np.float32)]
    back = decode_images(encode_images(imgs))
    for a, b in zip(imgs, back):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        assert not b.flags.writeable
    data = encode_images(imgs)
    for bad in (data[:-1], data + b"x", b"\x01\x00\x02|O\x00", b""):
        with pytest.raises(ValueError):
            decode_images(bad)


def plane_for(server: FakeServer | None):
    """A hardened data plane on the official fake backend; with ``server``, its index
    replicated over that fake Redis."""
    backend = FakeBackend()
    plane = build_plane(Settings(mode="hardened", padding="off"), Metrics("hardened"), backend)
    rep = None
    if server is not None:
        rep = IndexReplication(plane.index, FakeRedis(server=server), block_ms=50)
        plane.crossing = ReplicatingHook(plane.index, rep)
    return plane, backend, rep


async def settle(reps, timeout_s: float = 5.0):
    """Until every replica has applied every entry the others published."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        await asyncio.sleep(0.01)
        published = sum(r.published for r in reps)
        if all(r.applied == published - r.published for r in reps):
            return
    raise AssertionError("replication did not settle")


def one_pixel_copies(img, n, rng):
    out = []
    for _ in range(n):
        c = img.copy()
        c[rng.integers(0, 32), rng.integers(0, 32)] ^= 0xFF
        out.append(c)
    return out


async def rotation(planes, reps, images, copies, seed=0) -> int:
    """Every query in a fresh session, round robin over ``planes``; returns the images
    that reached the model."""
    rng = np.random.default_rng(seed)
    q = 0
    for img in images:
        for x in [img, *one_pixel_copies(img, copies, rng)]:
            plane = planes[q % len(planes)]
            await plane.infer(ImageCall("test", ModelRef("m"), Arrays([x]), session_id=f"rot-{q}"))  # never refused
            q += 1
            if reps:
                await settle(reps)
    return q


@pytest.fixture
def images():
    return np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


async def test_rotation_over_two_replicas_reaches_the_model_no_more_than_one_process(images):
    one, b_one, _ = plane_for(None)
    await rotation([one], [], images, copies=10)

    server = FakeServer()
    pa, ba, ra = plane_for(server)
    pb, bb, rb = plane_for(server)
    await ra.start()
    await rb.start()
    try:
        await rotation([pa, pb], [ra, rb], images, copies=10)
    finally:
        await ra.stop()
        await rb.stop()
    assert 0 < b_one.images < len(images) * 11  # the budget holds on one process
    # an over-budget query is answered from an answer the judging replica holds: the second
    # replica forwards at most one more per neighbourhood before it holds one
    assert ba.images + bb.images <= b_one.images + len(images)
    assert ba.images > 0 and bb.images > 0  # both replicas served
    assert ra.applied > 0 and rb.applied > 0


async def test_without_replication_the_same_attack_leaks(images):
    one, b_one, _ = plane_for(None)
    await rotation([one], [], images, copies=10)
    pa, ba, _ = plane_for(None)
    pb, bb, _ = plane_for(None)
    await rotation([pa, pb], [], images, copies=10)
    assert ba.images + bb.images > b_one.images  # what the replication closes


async def test_own_and_unreadable_entries_are_not_applied(images):
    server = FakeServer()
    plane, _, rep = plane_for(server)
    index: CrossSessionIndex = plane.index
    fields = {b"o": rep.replica.encode(), b"m": b"m", b"i": encode_images([images[0]])}
    assert rep.apply(b"1-0", fields) is False and len(index) == 0
    assert rep.apply(b"1-0", {**fields, b"o": b"other", b"i": b"\x05\x00junk"}) is False and rep.bad == 1
    lags = []
    rep.observe_lag = lags.append
    assert rep.apply(b"1000-0", {**fields, b"o": b"other"}, now=1.25) is True
    assert len(index) == 1 and lags == [pytest.approx(0.25)]


async def test_a_new_replica_starts_with_the_recent_images_of_the_others(images):
    server = FakeServer()
    pa, _, ra = plane_for(server)
    await ra.start()
    await pa.infer(ImageCall("test", ModelRef("m"), Arrays([images[0]]), session_id="early"))
    assert ra.published == 1
    for k, img in enumerate(images[1:]):
        await pa.infer(ImageCall("test", ModelRef("m"), Arrays([img]), session_id=f"early-{k}"))
    pb, _, rb = plane_for(server)
    rb.page = 2  # several pages of catch-up
    await rb.start()
    try:
        assert rb.applied == len(images) and len(pb.index) == len(images)  # applied in start(), before serving
    finally:
        await ra.stop()
        await rb.stop()


async def burst(planes, images, copies, seed=0) -> None:
    """Every copy of every image at the same instant (one ``gather``), each in a fresh
    session, round robin over ``planes``: the race a lagging replica would lose."""
    rng = np.random.default_rng(seed)
    calls = [ImageCall("test", ModelRef("m"), Arrays([x]), session_id=f"burst-{k}-{j}")
             for k, img in enumerate(images) for j, x in enumerate([img, *one_pixel_copies(img, copies, rng)])]

    async def one(q, call):
        await planes[q % len(planes)].infer(call)  # never refused

    await asyncio.gather(*(one(q, c) for q, c in enumerate(calls)))


async def test_a_burst_over_two_replicas_gets_at_most_one_budget_per_replica(images):
    """Issue 23: nothing is refused, so a replica cannot take back a forward it planned
    before another replica's entries arrived: a simultaneous burst over R replicas gets
    at most R budgets per neighbourhood (each replica's own), never more."""
    one, b_one, _ = plane_for(None)
    await burst([one], images, copies=10)
    assert 0 < b_one.images < len(images) * 11

    # readers never started: replication lag is unbounded, admission alone must hold
    server = FakeServer()
    (pa, ba, ra), (pb, bb, rb) = plane_for(server), plane_for(server)
    await burst([pa, pb], images, copies=10)
    assert ba.images > 0 and bb.images > 0
    assert ba.images + bb.images <= 2 * b_one.images
    assert ra.applied > 0 and rb.applied > 0  # learned from each other at admission


async def test_redis_down_fails_closed_and_admission_recovers(images):
    server = FakeServer()
    plane, backend, rep = plane_for(server)
    await rep.start()
    try:
        server.connected = False
        with pytest.raises(BackendUnavailable):
            await plane.infer(ImageCall("test", ModelRef("m"), Arrays([images[1]]), session_id="s"))
        assert backend.images == 0 and rep.published == 0 and rep.dropped == 1
        assert len(plane.index) == 0  # the reservation was abandoned
        # the session is unchanged: its first image after recovery is judged as a first image
        server.connected = True
        out = await plane.infer(ImageCall("test", ModelRef("m"), Arrays([images[1]]), session_id="s"))
        assert out.forwarded == 1 and backend.images == 1 and rep.published == 1
    finally:
        server.connected = True
        await rep.stop()
