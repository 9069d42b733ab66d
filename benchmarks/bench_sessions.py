"""Per-request cost against the number of sessions held (issues 11 and 15: O(1) per
request, at 1k, 100k and 1M sessions, memory store and Redis).

For each store and each population N (1k, 100k, 1M):

* ``hold_commit_us``: one ``async with store.hold(sid) as slot: slot.anchors = ...``
  on a random existing session;
* ``new_session_at_capacity_us`` (memory store): a hold that creates a session
  while the store is full, so one LRU eviction happens per request;
* ``plane_call_us``: a full in-process data-plane call (``DataPlane.infer``: resolve,
  validate, fingerprint, judge under the session's hold, output policy; padding
  off) against ``sidecar.testing.FakeBackend``, a 1-pixel copy of the session's
  anchor, answered from the anchor;
* ``ratio_to_1k``: each figure divided by the same figure at N = 1k (target:
  within 1.2 at 100k and at 1M for a request, ``plane_call_us``).

Every figure is the median over ``rounds`` of a batch's mean; the populations are
measured round-robin, so a load change on a shared machine hits all of them.

Memory per session: ``bytes_per_session_store`` (store structures only, anchors
shared; tracemalloc) and ``bytes_per_session_with_anchor`` (a distinct 32x32x3
anchor per session, as real sessions have), and the process's resident memory
grown by the fill of each population (``rss_bytes_per_session``, anchors shared).
For Redis: ``used_memory`` per session from ``INFO memory``; every Redis
session holds its own serialized anchor (3 KB of image), as real ones do. The
Redis populations are written with pipelines of plain SETs and one ZADD per
thousand (the state commits leave), not through the store: the population is
not what is measured.

Redis runs against a real ``redis-server`` when one is on PATH (started here on
a free port, no persistence), else against fakeredis (in-process; its figures
say little about Redis itself, and the JSON says which). With a real server,
``redis_server_us_per_hold`` is Redis' own time per hold (``INFO commandstats``),
which a loaded client machine disturbs less than the round trip figures.

``python -m benchmarks.bench_sessions [--out reports/bench_sessions.json]``, or
``python -m benchmarks --only sessions``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from sidecar.backend.base import ModelKey, ModelRef, Prediction
from sidecar.plane.dataplane import DataPlane, ImageCall, JudgmentSettings, session_key
from sidecar.plane.images import Arrays
from sidecar.judge.judgment import Anchor, Fingerprint
from sidecar.metrics import Metrics
from sidecar.plane.padding import Padder, PaddingSettings
from sidecar.state.sessions import MemorySessionStore
from sidecar.testing import FakeBackend, fake_scores
from benchmarks.stats import emit

POPULATIONS = (1_000, 100_000, 1_000_000)
TARGET_RATIO = 1.2


def _anchor(image: np.ndarray, version: int = 2) -> Anchor:
    return Anchor(Fingerprint.of(image), Prediction(fake_scores(image, version, 10), version))


def _sid(i: int) -> str:
    return f"s:user-{i}"


async def _time_batch(op, offset: int, n_ops: int) -> float:
    """Mean time of ``op(offset + i)`` over ``n_ops`` calls, in us."""
    t0 = time.perf_counter()
    for i in range(n_ops):
        await op(offset + i)
    return (time.perf_counter() - t0) / n_ops * 1e6


async def _interleaved(points: dict[int, dict], ops: dict[str, dict[int, object]], n_ops: int, rounds: int) -> None:
    """Round-robin over populations in a fresh random order each round, one batch each,
    then the median (and the best) over rounds: a machine whose load drifts (shared
    CPUs) affects every population alike, and no population always runs first."""
    order = random.Random(rounds)
    samples = {name: {n: [] for n in points} for name in ops}
    for r in range(rounds):
        for name, per_n in ops.items():
            for n in order.sample(list(per_n), len(per_n)):
                samples[name][n].append(await _time_batch(per_n[n], r * n_ops, n_ops))
    for name, per_n in samples.items():
        for n, xs in per_n.items():
            points[n][name] = statistics.median(xs)
            points[n].setdefault("best", {})[name] = min(xs)
            points[n].setdefault("rounds_us", {})[name] = [round(x, 1) for x in xs]


async def _fill(store, keys, anchors) -> None:
    for k in keys:
        async with store.hold(k) as slot:
            slot.anchors = anchors


def _plane(store) -> tuple[DataPlane, FakeBackend]:
    backend = FakeBackend()
    return DataPlane(JudgmentSettings("paper"), backend, store, Padder(PaddingSettings("off")), Metrics("paper")), backend


def _copy_calls(base: np.ndarray, n: int, count: int, rng: random.Random) -> list[ImageCall]:
    copy = base.copy()
    copy[3, 4, 0] ^= 0x01  # a 1-pixel copy of every session's anchor: answered from it
    return [ImageCall("Classify", ModelRef("m"), Arrays([copy]), session_id=f"user-{rng.randrange(n)}") for _ in range(count)]


# --------------------------------------------------------------------------- memory store


async def _memory_points(populations, base: np.ndarray, n_ops: int, rounds: int) -> list[dict]:
    key = ModelKey("m", 2)
    anchors = (_anchor(base),)
    points, holds, calls, news, backends = {}, {}, {}, {}, []
    for n in populations:
        store = MemorySessionStore(max_sessions=n, ttl_s=3600)
        gc.collect()
        rss0 = _rss_bytes()
        t0 = time.perf_counter()
        await _fill(store, (session_key(_sid(i), key) for i in range(n)), anchors)
        points[n] = {"sessions": n, "fill_s": round(time.perf_counter() - t0, 3),
                     "rss_bytes_per_session": round((_rss_bytes() - rss0) / n)}
        rng = random.Random(n)
        picks = [session_key(_sid(rng.randrange(n)), key) for _ in range(n_ops * rounds)]
        plane, backend = _plane(store)
        backends.append(backend)
        wire = _copy_calls(base, n, n_ops * rounds, rng)

        async def hold(i, store=store, picks=picks):
            async with store.hold(picks[i]) as slot:
                slot.anchors = anchors

        async def call(i, plane=plane, wire=wire):
            await plane.infer(wire[i])

        async def new_session(i, store=store, n=n):  # the store is full: each evicts the least recent
            async with store.hold(f"new-{n}-{i}") as slot:
                slot.anchors = anchors

        holds[n], calls[n], news[n] = hold, call, new_session
    await _interleaved(points, {"hold_commit_us": holds, "plane_call_us": calls}, n_ops, rounds)
    await _interleaved(points, {"new_session_at_capacity_us": news}, n_ops, rounds)
    assert all(b.calls["predict"] == 0 for b in backends), "the copies must be answered from the anchors"
    return [points[n] for n in populations]


def _rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _memory_bytes_per_session(base: np.ndarray, n: int = 20_000) -> dict:
    async def measure(distinct: bool) -> float:
        rng = np.random.default_rng(0)
        shared = (_anchor(base),)
        store = MemorySessionStore(max_sessions=n)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            anchors = (_anchor(rng.integers(0, 256, base.shape, dtype=np.uint8)),) if distinct else shared
            async with store.hold(_sid(i)) as slot:
                slot.anchors = anchors
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        del store
        return used / n

    return {"bytes_per_session_store": round(asyncio.run(measure(False))),
            "bytes_per_session_with_anchor": round(asyncio.run(measure(True))), "measured_sessions": n}


# --------------------------------------------------------------------------- redis store


class _RedisServer:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _redis_fill(store, keys: list[str], blobs) -> None:
    """Write N committed sessions the way commits leave them (data key with TTL + index
    entry), pipelined: the population, not the thing measured. ``blobs(i)``: session
    i's serialized anchors."""
    now = time.time()
    ttl_px = int(store.ttl_s * 1000)
    step = 2000
    for i in range(0, len(keys), step):
        async with store.client.pipeline(transaction=False) as pipe:
            for j, k in enumerate(keys[i:i + step], i):
                pipe.set(store._data_key(k), blobs(j), px=ttl_px)
            pipe.zadd(store._index_key, {store._sid(k): now for k in keys[i:i + step]})
            await pipe.execute()


async def _redis_points(client_factory, populations, base: np.ndarray, n_ops: int, rounds: int) -> list[dict]:
    """One Redis database per population (separate keyspaces and indexes, one server)."""
    from sidecar.state.redis_store import RedisSessionStore, encode_anchors

    key = ModelKey("m", 2)
    anchors = (_anchor(base),)
    points, holds, calls, clients, backends, stores = {}, {}, {}, [], [], []
    for db, n in enumerate(populations):
        client = client_factory(db)
        clients.append(client)
        await client.flushdb()
        store = RedisSessionStore(client, ttl_s=3600)
        stores.append(store)
        info = await client.info("memory")
        keys = [session_key(_sid(i), key) for i in range(n)]
        blob = encode_anchors(anchors)
        t0 = time.perf_counter()
        await _redis_fill(store, keys, lambda i: blob)
        after = await client.info("memory")
        points[n] = {"sessions": n, "fill_s": round(time.perf_counter() - t0, 3),
                     "used_memory_bytes_per_session": round((after["used_memory"] - info["used_memory"]) / n)
                     if "used_memory" in info else None}
        rng = random.Random(n)
        picks = [keys[rng.randrange(n)] for _ in range(n_ops * rounds)]
        plane, backend = _plane(store)
        backends.append(backend)
        wire = _copy_calls(base, n, n_ops * rounds, rng)

        async def hold(i, store=store, picks=picks):
            async with store.hold(picks[i]) as slot:
                slot.anchors = anchors  # a new anchor object: a real write, as after a forward

        async def call(i, plane=plane, wire=wire):
            await plane.infer(wire[i])

        holds[n], calls[n] = hold, call
    await _interleaved(points, {"hold_commit_us": holds, "plane_call_us": calls}, n_ops, rounds)
    assert all(b.calls["predict"] == 0 for b in backends), "the copies must be answered from the anchors"
    # Redis' own time per hold (INFO commandstats): what the server spends, whatever the client's load
    for n, store in zip(populations, stores):
        points[n]["commit"] = "lua" if store.scripting else "watch/multi"
    for n, client in zip(populations, clients):
        await client.config_resetstat()
        await _time_batch(holds[n], 0, n_ops)
        stats = await client.info("commandstats")
        usec = sum(v["usec"] for k, v in stats.items() if isinstance(v, dict) and "usec" in v
                   and k not in ("cmdstat_config", "cmdstat_info"))
        points[n]["redis_server_us_per_hold"] = usec / n_ops if usec else None
    for client in clients:
        await client.flushdb()
        await client.aclose()
    return [points[n] for n in populations]


# --------------------------------------------------------------------------- run


def _ratios(points: list[dict], fields: tuple[str, ...]) -> None:
    ref = points[0]
    for p in points:
        p["ratio_to_1k"] = {f: p[f] / ref[f] for f in fields if p.get(f) and ref.get(f)}
        p["best_ratio_to_1k"] = {f: p["best"][f] / ref["best"][f] for f in fields if f in p.get("best", {})}


def run(n_ops: int = 400, rounds: int = 15, with_million: bool = True, populations=POPULATIONS) -> dict:
    base = np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    populations = tuple(n for n in populations if with_million or n < 1_000_000)
    out: dict = {"target_ratio": TARGET_RATIO, "reference_sessions": populations[0], "requests_per_batch": n_ops,
                 "rounds": rounds, "figure": "median over rounds of the mean time per request in a batch, us"}

    t0 = time.perf_counter()
    mem_points = asyncio.run(_memory_points(populations, base, n_ops, rounds))
    _ratios(mem_points, ("hold_commit_us", "new_session_at_capacity_us", "plane_call_us"))
    out["memory"] = {"points": mem_points, "seconds": round(time.perf_counter() - t0, 1),
                     **_memory_bytes_per_session(base)}
    print(f"bench_sessions: memory {mem_points}", file=sys.stderr, flush=True)

    if shutil.which("redis-server"):
        import redis.asyncio as aioredis

        server = _RedisServer()
        factory = lambda db: aioredis.Redis(host="127.0.0.1", port=server.port, db=db)  # noqa: E731
        kind = "redis-server " + subprocess.run(["redis-server", "--version"], capture_output=True,
                                                text=True).stdout.split()[2]
        red_pops = populations
    else:
        from fakeredis import FakeServer
        from fakeredis.aioredis import FakeRedis

        server, fake = None, FakeServer()
        factory = lambda db: FakeRedis(server=fake, db=db)  # noqa: E731
        kind = "fakeredis (no redis-server on PATH; 1M sessions skipped: they would measure fakeredis)"
        red_pops = tuple(n for n in populations if n < 1_000_000)
    t0 = time.perf_counter()
    try:
        red_points = asyncio.run(_redis_points(factory, red_pops, base, max(100, n_ops // 4), rounds + 2))
    finally:
        if server is not None:
            server.stop()
    _ratios(red_points, ("hold_commit_us", "plane_call_us", "redis_server_us_per_hold"))
    out["redis"] = {"backend": kind, "points": red_points, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"bench_sessions: redis {red_points}", file=sys.stderr, flush=True)

    # the target is about a request: the full data-plane call, at every population against the first
    verdict: dict = {}
    for store, points in (("memory", mem_points), ("redis", red_points)):
        for p in points[1:]:
            n = p["sessions"]
            tag = f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"
            for field in ("hold_commit_us", "plane_call_us"):
                verdict[f"{store}_{field}_ratio_{tag}"] = p["ratio_to_1k"].get(field)
            verdict[f"{store}_plane_call_us_best_ratio_{tag}"] = p["best_ratio_to_1k"].get("plane_call_us")
    verdict["per_request_within_target"] = all(
        v is not None and v <= TARGET_RATIO for k, v in verdict.items() if "_plane_call_us_ratio_" in k)
    verdict["memory_bytes_per_session_with_anchor"] = out["memory"]["bytes_per_session_with_anchor"]
    verdict["redis_used_memory_bytes_per_session"] = red_points[-1].get("used_memory_bytes_per_session")
    out["verdict"] = verdict
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_sessions")
    ap.add_argument("--out", default="reports/bench_sessions.json")
    ap.add_argument("--n", type=int, default=400, help="requests per timing batch")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-million", action="store_true")
    ap.add_argument("--populations", type=int, nargs="*", default=list(POPULATIONS),
                    help="session counts; ratios are to the first")
    args = ap.parse_args()
    result = run(args.n, args.rounds, not args.no_million, tuple(args.populations))
    emit(result, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
