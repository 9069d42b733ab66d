"""Honest health and start-up.

* Health is NOT_SERVING while the backend OR the session store is unreachable,
  SERVING once both are back (in-process, fake backend, fakeredis store).
* A Redis that lost its data is noticed, logged and counted
  (``hashguard_store_resets_total``).
* ``hashguard-sidecar`` with a taken port (gRPC, REST, metrics), a malformed flag
  value or a missing file exits with status 2 and ONE line on stderr, before any
  port is served (subprocesses).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import REPO, free_port
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.config import Settings
from sidecar.health import HealthWatch
from sidecar.wire.messages import encode_raw
from sidecar.state.redis_store import RedisSessionStore
from sidecar.server import SidecarServer
from sidecar.state.sessions import MemorySessionStore
from sidecar.testing import FakeBackend, FakeChannel

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --------------------------------------------------------------------------- the watch itself


class FlakyStore(MemorySessionStore):
    def __init__(self):
        super().__init__()
        self.up = True

    async def ping(self) -> bool:
        if not self.up:
            raise ConnectionError("down")
        return True


async def test_watch_publishes_on_every_change_of_either():
    channel, store, seen = FakeChannel(), FlakyStore(), []

    async def publish(up, backend_up, store_up):
        seen.append((up, backend_up, store_up))

    watch = HealthWatch(channel, store, publish)
    await watch.check()
    await watch.check()  # no change: nothing published
    store.up = False
    await watch.check()
    channel.set_up(False)
    await watch.check()
    store.up = True
    await watch.check()
    channel.set_up(True)
    await watch.check()
    assert seen == [(True, True, True), (False, True, False), (False, False, False), (False, False, True),
                    (True, True, True)]


async def test_a_store_ping_that_hangs_counts_as_down():
    class Hanging(MemorySessionStore):
        async def ping(self):
            await asyncio.sleep(60)

    seen = []

    async def publish(*args):
        seen.append(args)

    await HealthWatch(FakeChannel(), Hanging(), publish, ping_timeout_s=0.05).check()
    assert seen == [(False, True, False)]


# --------------------------------------------------------------------------- the server's health


async def health_of(channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def wait_health(channel, want, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while (got := await health_of(channel)) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"health stayed {got}, wanted {want}")
        await asyncio.sleep(0.05)


def gauge(server, name) -> float:
    return server.metrics.registry.get_sample_value(name)


@pytest.fixture
async def redis_sidecar():
    redis = FakeServer()
    backend = FakeBackend()
    settings = Settings(backend="127.0.0.1:1", host="127.0.0.1", port=0, metrics_port=0, rest_port=0,
                        padding="off", score_noise=0.0)
    server = SidecarServer(settings, backend=backend)
    server.plane.store = RedisSessionStore(FakeRedis(server=redis), on_reset=server.metrics.store_resets.inc,
                                           acquire_timeout_s=0.5, ping_timeout_s=0.5)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, redis, backend, channel
    await channel.close()
    await server.stop(0)


async def test_health_follows_backend_and_session_store(redis_sidecar):
    server, redis, backend, channel = redis_sidecar
    await wait_health(channel, SERVING)
    redis.connected = False  # Redis unreachable
    await wait_health(channel, NOT_SERVING)
    assert gauge(server, "hashguard_store_up") == 0 and gauge(server, "hashguard_backend_up") == 1
    backend.channel.set_up(False)  # and the backend too
    await wait_health(channel, NOT_SERVING)
    redis.connected = True  # only the store is back: still not serving
    await asyncio.sleep(0.8)
    assert await health_of(channel) == NOT_SERVING
    assert gauge(server, "hashguard_store_up") == 1 and gauge(server, "hashguard_backend_up") == 0
    backend.channel.set_up(True)
    await wait_health(channel, SERVING)


async def test_unreachable_store_fails_calls_closed(redis_sidecar):
    server, redis, backend, channel = redis_sidecar
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    redis.connected = False
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model=pb.ModelRef(name="m"), image=encode_raw(img), session_id="s"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert backend.calls["predict"] == 0  # never forwarded unjudged


async def test_a_redis_that_lost_its_data_is_counted(redis_sidecar, caplog):
    server, redis, backend, channel = redis_sidecar
    stub = pb_grpc.ClassifierStub(channel)
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    req = pb.ClassifyRequest(model=pb.ModelRef(name="m"), image=encode_raw(img), session_id="s")
    await stub.Classify(req)
    assert gauge(server, "hashguard_store_resets_total") == 0
    await server.plane.store.client.flushall()  # a restart without persistence
    await stub.Classify(req)  # the anchor is gone: forwarded again, and the loss is noticed
    assert backend.calls["predict"] == 2
    assert gauge(server, "hashguard_store_resets_total") == 1
    assert "lost its data" in caplog.text


# --------------------------------------------------------------------------- start-up (subprocesses)


def run_sidecar(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "sidecar", "--backend", "127.0.0.1:1", "--host", "127.0.0.1",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hashguard-sidecar: ") and "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def taken_port():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("flag,what", [("--port", "gRPC"), ("--rest-port", "REST"), ("--metrics-port", "metrics")])
def test_a_taken_port_stops_the_start(taken_port, flag, what):
    ports = {"--port": str(free_port()), "--rest-port": "0", "--metrics-port": "0", flag: str(taken_port)}
    proc = run_sidecar(*[x for kv in ports.items() for x in kv])
    assert_one_line_exit_2(proc, what, str(taken_port), "in use")


def test_second_replica_on_the_same_ports_stops_before_serving():
    grpc_port, metrics_port = free_port(), free_port()
    first = subprocess.Popen([sys.executable, "-m", "sidecar", "--backend", "127.0.0.1:1", "--host", "127.0.0.1",
                              "--port", str(grpc_port), "--metrics-port", str(metrics_port), "--rest-port", "0"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
        # the default-metrics-port case: a fresh gRPC port, the first replica's metrics port
        fresh = free_port()
        proc = run_sidecar("--port", str(fresh), "--metrics-port", str(metrics_port), "--rest-port", "0")
        assert_one_line_exit_2(proc, "metrics", str(metrics_port))
        probe = socket.socket()
        probe.bind(("127.0.0.1", fresh))  # it never bound (let alone served) its gRPC port
        probe.close()
        proc = run_sidecar("--port", str(grpc_port), "--metrics-port", "0", "--rest-port", "0")
        assert_one_line_exit_2(proc, "gRPC", str(grpc_port))
        assert first.poll() is None  # the first replica is unharmed
    finally:
        first.terminate()
        first.wait(30)


@pytest.mark.parametrize("args,env,words", [
    (["--noise-key", "not-hex"], {}, ["--noise-key", "hexadecimal"]),
    (["--backend", "nohost"], {}, ["--backend"]),
    (["--backend", "host:99999"], {}, ["--backend"]),
    (["--session-store", "redis://cache:port/0"], {}, ["--session-store"]),
    (["--session-store", "memcached://cache"], {}, ["--session-store"]),
    (["--max-sessions", "-5"], {}, ["--max-sessions"]),
    (["--max-message-bytes", "0"], {}, ["--max-message-bytes"]),
    (["--session-ttl-s", "-1"], {}, ["--session-ttl-s"]),
    (["--max-image-pixels", "-1"], {}, ["--max-image-pixels"]),
    (["--metrics-port", "70000"], {}, ["--metrics-port"]),
    (["--port", "abc"], {}, ["--port"]),
    (["--mode", "nonsense"], {}, ["--mode"]),
    (["--log-level", "LOUD"], {}, ["--log-level"]),
    ([], {"HASHGUARD_MAX_BATCH": "lots"}, ["HASHGUARD_MAX_BATCH"]),
    ([], {"HASHGUARD_MODE": "nonsense"}, ["HASHGUARD_MODE"]),
    (["--auth-tokens", "/nonexistent/tokens.txt"], {}, ["--auth-tokens", "No such file"]),
    (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], {}, ["--tls-cert"]),
    (["--tls-cert", "/nonexistent/c.pem"], {}, ["--tls-key"]),
    (["--history", "0"], {}, ["--history"]),
    (["--auth-verifier", "no_such_module_xyz:verify"], {}, ["no_such_module_xyz"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_flag_or_missing_file_is_one_line_and_exit_2(args, env, words):
    proc = run_sidecar("--port", str(free_port()), "--metrics-port", "0", "--rest-port", "0", *args, env=env)
    assert_one_line_exit_2(proc, *words)


def test_a_directory_instead_of_a_file(tmp_path: Path):
    proc = run_sidecar("--port", "0", "--metrics-port", "0", "--rest-port", "0", "--auth-tokens", str(tmp_path))
    assert_one_line_exit_2(proc, "--auth-tokens")
