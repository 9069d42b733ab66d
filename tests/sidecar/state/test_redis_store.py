"""RedisSessionStore against fakeredis: serialization, commit semantics, expiry,
cross-replica mutual exclusion, corrupt data, and the data plane on top of it."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import random

import numpy as np
import pytest
from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis

from sidecar.backend.base import ModelRef, Prediction
from sidecar.plane.dataplane import DataPlane, ImageCall, JudgmentSettings
from sidecar.plane.images import Arrays
from sidecar.judge.judgment import Anchor, Fingerprint
from sidecar.metrics import Metrics
from sidecar.plane.padding import Padder, PaddingSettings
from sidecar.state.redis_store import (
    CorruptSession,
    RedisSessionStore,
    decode_anchors,
    encode_anchors,
)
from sidecar.errors import StoreUnavailable
from sidecar.state.sessions import MemorySessionStore
from sidecar.testing import FakeBackend

pytestmark = pytest.mark.timeout(60)


def anchor(seed: int, dtype=np.uint8, shape=(32, 32, 3), scores_dtype=np.float32, version=3) -> Anchor:
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, 256, shape).astype(dtype))
    scores = rng.random(10).astype(scores_dtype)
    return Anchor(Fingerprint.of(image), Prediction(scores, version))


def assert_same(got: tuple[Anchor, ...], want: tuple[Anchor, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in ((g.fingerprint.image, w.fingerprint.image), (g.result.scores, w.result.scores)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
        assert g.fingerprint.hash == w.fingerprint.hash
        assert g.result.version == w.result.version
        assert not g.fingerprint.image.flags.writeable


HAS_LUA = importlib.util.find_spec("lupa") is not None  # fakeredis runs scripts only with lupa


@pytest.fixture(params=["watch", pytest.param("lua", marks=pytest.mark.skipif(
    not HAS_LUA, reason="fakeredis runs Lua scripts only with lupa installed (pip install 'fakeredis[lua]')"))])
def server(request):
    """Every test on both commit paths: the Lua script and WATCH/MULTI."""
    s = FakeServer()
    s.hashguard_scripting = request.param == "lua"
    return s


def replica(server, **kw) -> RedisSessionStore:
    kw.setdefault("scripting", getattr(server, "hashguard_scripting", False))
    return RedisSessionStore(FakeRedis(server=server), **kw)


# --------------------------------------------------------------------------- serialization


def test_codec_round_trip_is_byte_exact():
    anchors = (
        anchor(1),
        anchor(2, dtype=np.float32),
        anchor(3, shape=(28, 28), scores_dtype=np.dtype(">f4"), version=-7),
        Anchor(Fingerprint(np.zeros((0, 4, 3), np.uint8), b""), Prediction(np.array([np.nan, -0.0, np.inf], np.float32), 2**62)),
    )
    blob = encode_anchors(anchors)
    assert blob[:4] == b"HGS\x01"
    back = decode_anchors(blob)
    assert_same(back, anchors)
    assert back[2].result.scores.dtype.str == ">f4"
    assert encode_anchors(back) == blob
    assert decode_anchors(encode_anchors(())) == ()


@pytest.mark.parametrize("mutate", [
    lambda b: b"",
    lambda b: b"garbage",
    lambda b: b[:-1],  # truncated
    lambda b: b + b"\x00",  # trailing
    lambda b: b[:3] + b"\x02" + b[4:],  # unknown version
    lambda b: b.replace(b"|u1", b"|O8", 1),  # object dtype
    lambda b: b.replace(b"|u1", b"|V1", 1),  # void dtype
    lambda b: b[:5] + b"\xff" + b[6:],  # anchor count far beyond the data
])
def test_codec_rejects_corrupt(mutate):
    blob = encode_anchors((anchor(1), anchor(2)))
    with pytest.raises(CorruptSession):
        decode_anchors(mutate(blob))


def test_codec_refuses_non_prediction_results():
    with pytest.raises(TypeError):
        encode_anchors((Anchor(Fingerprint.of(np.zeros((4, 4, 3), np.uint8)), "label"),))


# --------------------------------------------------------------------------- store semantics


async def test_commit_then_peek_round_trip(server):
    store = replica(server)
    want = (anchor(1), anchor(2, dtype=np.float32))
    async with store.hold("s") as slot:
        assert slot.anchors == ()
        slot.anchors = want
    assert_same(await store.peek("s"), want)
    # a second replica sees the same bytes
    other = replica(server)
    async with other.hold("s") as slot:
        assert_same(slot.anchors, want)
    assert len(store) == 1 and await other.count() == 1
    assert await store.client.pttl(b"hashguard:s:s") > 3_500_000
    assert not await store.client.exists(b"hashguard:l:s")  # lock released


async def test_exception_commits_nothing(server):
    store = replica(server, acquire_timeout_s=0.5)
    with pytest.raises(RuntimeError):
        async with store.hold("s") as slot:
            slot.anchors = (anchor(1),)
            raise RuntimeError("backend failed")
    assert await store.peek("s") == ()
    assert await server_keys(store) == set()  # no data, no lock, no index entry

    async with store.hold("s") as slot:
        slot.anchors = (anchor(1),)
    with pytest.raises(RuntimeError):
        async with store.hold("s") as slot:
            slot.anchors = (anchor(2),)
            raise RuntimeError
    assert_same(await store.peek("s"), (anchor(1),))
    async with store.hold("s"):  # the lock was released: no wait
        pass


async def server_keys(store) -> set[bytes]:
    """Every key but the store's epoch marker (written once, kept)."""
    return set(await store.client.keys("*")) - {b"hashguard:epoch"}


async def test_empty_commit_removes_session(server):
    store = replica(server)
    async with store.hold("s") as slot:
        slot.anchors = (anchor(1),)
    async with store.hold("s") as slot:
        slot.anchors = ()
    assert await store.peek("s") == () and len(store) == 0
    assert await server_keys(store) == set()


async def test_ttl_expiry_and_refresh_on_commit(server):
    evictions = []
    store = replica(server, ttl_s=0.5, on_evict=evictions.append)
    async with store.hold("a") as slot:
        slot.anchors = (anchor(1),)
    async with store.hold("b") as slot:
        slot.anchors = (anchor(2),)
    for _ in range(3):  # "b" stays alive through commits of unchanged anchors (PEXPIRE path)
        await asyncio.sleep(0.2)
        async with store.hold("b") as slot:
            slot.anchors = tuple(slot.anchors)
    assert await store.peek("a") == ()  # idle past ttl: gone
    assert_same(await store.peek("b"), (anchor(2),))
    assert evictions == ["ttl"] and len(store) == 1  # "a" pruned from the index once
    await asyncio.sleep(0.6)
    assert await store.peek("b") == ()
    assert await store.count() == 0 and evictions == ["ttl", "ttl"]


async def test_replicas_serialize_holds_of_one_session(server):
    stores = [replica(server), replica(server)]
    n = 40

    async def increment(i: int) -> None:
        async with stores[i % 2].hold("shared") as slot:
            before = slot.anchors
            await asyncio.sleep(random.random() * 0.003)  # the backend call
            slot.anchors = before + (anchor(i),)

    await asyncio.gather(*(increment(i) for i in range(n)))
    final = await stores[0].peek("shared")
    assert len(final) == n  # no lost update
    assert sorted(a.result.version for a in final) == [3] * n
    assert {a.fingerprint.hash for a in final} == {anchor(i).fingerprint.hash for i in range(n)}


async def test_without_the_lock_updates_would_be_lost(server):
    """The test above can fail: the same interleaving on bare GET/SET loses updates."""
    client = FakeRedis(server=server)

    async def increment(i: int) -> None:
        raw = await client.get(b"k")
        before = decode_anchors(raw) if raw else ()
        await asyncio.sleep(random.random() * 0.003)
        await client.set(b"k", encode_anchors(before + (anchor(i),)))

    await asyncio.gather(*(increment(i) for i in range(20)))
    assert len(decode_anchors(await client.get(b"k"))) < 20


async def test_different_sessions_do_not_block_each_other(server):
    a, b = replica(server, acquire_timeout_s=0.2), replica(server, acquire_timeout_s=0.2)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def long_hold():
        async with a.hold("one") as slot:
            entered.set()
            await release.wait()
            slot.anchors = (anchor(1),)

    task = asyncio.create_task(long_hold())
    await entered.wait()
    async with b.hold("two") as slot:  # other session, other replica: immediate
        slot.anchors = (anchor(2),)
    with pytest.raises(StoreUnavailable):  # same session, other replica: busy
        async with b.hold("one"):
            pass
    release.set()
    await task
    assert_same(await b.peek("one"), (anchor(1),))
    assert_same(await a.peek("two"), (anchor(2),))


async def test_lease_is_renewed_while_held(server):
    a = replica(server, lock_timeout_s=0.3)
    b = replica(server, lock_timeout_s=0.3, acquire_timeout_s=0.1)
    entered = asyncio.Event()

    async def slow():
        async with a.hold("s") as slot:
            entered.set()
            await asyncio.sleep(1.2)  # four leases long
            slot.anchors = (anchor(1),)

    task = asyncio.create_task(slow())
    await entered.wait()
    await asyncio.sleep(0.7)
    with pytest.raises(StoreUnavailable):
        async with b.hold("s"):
            pass
    await task
    assert_same(await b.peek("s"), (anchor(1),))



@pytest.mark.skipif(not HAS_LUA, reason="fakeredis runs Lua scripts only with lupa installed")
async def test_commit_takes_the_script_when_the_server_runs_scripts():
    store = RedisSessionStore(FakeRedis(server=FakeServer()))  # scripting=None: try the script
    calls = []
    script = store._commit_script

    async def spy(**kw):
        calls.append(kw["args"][1])
        return await script(**kw)

    store._commit_script = spy
    for anchors in ((anchor(1),), None, ()):
        async with store.hold("s") as slot:
            if anchors is not None:
                slot.anchors = anchors  # set, then unchanged (pexpire), then delete
    assert calls == ["set", "pexpire", "del"] and store.scripting is True
    assert await store.peek("s") == () and await store.count() == 0
    await store.client.script_flush()  # a restarted Redis has no scripts cached: loaded again
    async with store.hold("s") as slot:
        slot.anchors = (anchor(2),)
    assert_same(await store.peek("s"), (anchor(2),))


async def test_commit_falls_back_to_watch_where_no_scripts_run(server):
    from redis.exceptions import ResponseError

    store = RedisSessionStore(FakeRedis(server=server))  # scripting=None

    async def no_scripts(**kw):
        raise ResponseError("unknown command 'evalsha', with args beginning with: ")

    store._commit_script = no_scripts
    async with store.hold("s") as slot:
        slot.anchors = (anchor(1),)
    assert store.scripting is False
    assert_same(await store.peek("s"), (anchor(1),))
    with pytest.raises(StoreUnavailable):  # the fallback is fenced too
        async with store.hold("s") as slot:
            await store.client.set(b"hashguard:l:s", b"someone else")
            slot.anchors = (anchor(2),)
    assert_same(await store.peek("s"), (anchor(1),))


async def test_script_errors_other_than_missing_scripting_fail_closed(server):
    from redis.exceptions import ResponseError

    store = RedisSessionStore(FakeRedis(server=server))

    async def oom(**kw):
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    store._commit_script = oom
    with pytest.raises(StoreUnavailable):
        async with store.hold("s") as slot:
            slot.anchors = (anchor(1),)
    assert store.scripting is None and await store.peek("s") == ()
    assert not await store.client.exists(b"hashguard:l:s")  # the lock was released

async def test_lost_lease_commits_nothing(server):
    store = replica(server)
    async with store.hold("s") as slot:
        slot.anchors = (anchor(1),)
    with pytest.raises(StoreUnavailable):
        async with store.hold("s") as slot:
            # the lease expired and another replica took the session
            await store.client.set(b"hashguard:l:s", b"someone else")
            slot.anchors = (anchor(2),)
    assert_same(await store.peek("s"), (anchor(1),))
    assert await store.client.get(b"hashguard:l:s") == b"someone else"  # their lock untouched


async def test_crashed_holder_blocks_only_for_its_lease(server):
    store = replica(server, acquire_timeout_s=2.0)
    await store.client.set(b"hashguard:l:s", b"dead replica", px=200)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with store.hold("s") as slot:
        slot.anchors = (anchor(1),)
    assert 0.15 < loop.time() - t0 < 1.5


async def test_cancelled_hold_releases_lock(server):
    store = replica(server, acquire_timeout_s=0.3)
    entered = asyncio.Event()

    async def body():
        async with store.hold("s") as slot:
            entered.set()
            slot.anchors = (anchor(1),)
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await server_keys(store) == set()
    async with store.hold("s"):
        pass


async def test_corrupt_value_is_treated_as_empty(server, caplog):
    evictions = []
    store = replica(server, on_evict=evictions.append)
    await store.client.set(b"hashguard:s:s", b"HGS\x01\x05\x00not really")
    with caplog.at_level(logging.WARNING, logger="hashguard.sessions.redis"):
        async with store.hold("s") as slot:
            assert slot.anchors == ()
            slot.anchors = (anchor(1),)
    assert "undecodable" in caplog.text and evictions == ["corrupt"]
    assert_same(await store.peek("s"), (anchor(1),))  # overwritten by the commit


def test_rejects_decoding_client():
    with pytest.raises(ValueError):
        RedisSessionStore(FakeRedis(decode_responses=True))


async def test_from_url_passes_options():
    store = RedisSessionStore.from_url("redis://localhost:6390/3", ttl_s=5, prefix="x:")
    kw = store.client.get_connection_kwargs()
    assert kw["db"] == 3 and kw["port"] == 6390 and kw["decode_responses"] is False
    assert store.ttl_s == 5 and store.prefix == b"x:"
    await store.aclose()


# --------------------------------------------------------------------------- the data plane on top


def guard_with(store, mode="paper"):
    backend = FakeBackend()
    return DataPlane(JudgmentSettings(mode), backend, store, Padder(PaddingSettings("off")), Metrics(mode)), backend


async def classify(plane, img, session):
    return await plane.infer(ImageCall("test", ModelRef("m"), Arrays([img]), session_id=session))


async def test_guard_on_redis_store_across_replicas(server):
    clean = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    copy = clean.copy()
    copy[5, 7, 1] ^= 0xFF
    g1, b1 = guard_with(replica(server))
    g2, b2 = guard_with(replica(server))

    first = await classify(g1, clean, "alice")
    assert first.forwarded == 1 and b1.calls["predict"] == 1
    again = await classify(g2, copy, "alice")  # other replica: the 1-pixel copy is cached
    assert again.forwarded == 0 and b2.calls["predict"] == 0
    assert again.answers[0].label == first.answers[0].label
    np.testing.assert_array_equal(again.answers[0].scores, first.answers[0].scores)
    other = await classify(g2, copy, "bob")  # another session is judged on its own
    assert other.forwarded == 1 and b2.calls["predict"] == 1
    assert len(g2.store) == 2


@pytest.mark.parametrize("mode", ["paper", "hardened"])
async def test_guard_counts_match_memory_store(server, mode):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    queries = []
    for i in range(40):
        img = base[rng.integers(0, 4)].copy()
        if rng.random() < 0.5:  # near copy
            img[rng.integers(0, 32), rng.integers(0, 32)] = rng.integers(0, 256, 3)
        queries.append((img, f"s{i % 3}"))
    outcomes = {}
    for name, store in (("memory", MemorySessionStore()), ("redis", replica(server))):
        g, backend = guard_with(store, mode)
        outs = [await classify(g, img, sid) for img, sid in queries]
        outcomes[name] = ([o.forwarded for o in outs], [o.answers[0].label for o in outs], backend.images, len(store))
    assert outcomes["redis"] == outcomes["memory"]
    assert 0 < outcomes["redis"][2] < len(queries)


# --------------------------------------------------------------------------- health and lost data


async def test_ping_follows_reachability(server):
    store = replica(server, ping_timeout_s=0.5)
    assert await store.ping() is True
    server.connected = False
    assert await store.ping() is False
    with pytest.raises(StoreUnavailable):
        async with store.hold("s"):
            pass
    server.connected = True
    assert await store.ping() is True


async def test_lost_data_is_detected_logged_and_counted(server, caplog):
    resets = []
    a = replica(server, on_reset=lambda: resets.append("a"))
    b = replica(server, on_reset=lambda: resets.append("b"))
    async with a.hold("s") as slot:
        slot.anchors = (anchor(1),)
    assert await b.ping() and resets == []  # b adopts a's epoch: no reset
    epoch = await a.client.get(b"hashguard:epoch")
    assert epoch and epoch == b._epoch
    await a.client.flushall()  # Redis restarted without persistence
    with caplog.at_level(logging.WARNING, logger="hashguard.sessions.redis"):
        async with a.hold("s") as slot:  # noticed on the next hold ...
            assert slot.anchors == ()
            slot.anchors = (anchor(2),)
        assert await b.ping()  # ... and by a replica's health poll
    assert sorted(resets) == ["a", "b"] and a.resets == b.resets == 1
    assert "lost its data" in caplog.text
    new = await a.client.get(b"hashguard:epoch")
    assert new and new != epoch and a._epoch == b._epoch == new
    async with b.hold("s") as slot:  # both in the new epoch: no further resets
        assert_same(slot.anchors, (anchor(2),))
    assert await a.ping() and len(resets) == 2


async def test_memory_store_pings():
    assert await MemorySessionStore().ping() is True
