"""Scale-out load and fault suite (issue 15): real ``redis-server``, real model
server, sidecars as processes, closed-loop gRPC load on loopback.

    python -m benchmarks.bench_scale --models-dir models --model cnn --out reports/scale.json
    make suite                      # installs redis-server when it can, then the above

Points (each ``--seconds`` long after a short warm-up, ``--concurrency`` clients):

* ``direct``: Predict straight to the model server, the reference;
* ``memory_1``, ``redis_1``, ``redis_workers_2``, ``redis_replicas_2``: Classify
  through one sidecar process (memory / Redis store), ``--workers 2``, and two
  replicas behind one client-side round-robin channel. Paper mode, padding off,
  every session alternates a new image with a 1-pixel copy of it, so about half
  of the calls are forwarded. Throughput and p50/p99 are also given as ratios to
  ``direct``.

Faults, each under load:

* ``redis_restart``: Redis SIGKILLed, started again on the same port and AOF
  directory. While it is down every call must fail (UNAVAILABLE) and no image
  may reach the model; recovery is the time from Redis answering PING again to
  the first call answered;
* ``replica_kill``: two replicas sharing Redis; sessions anchored at replica A,
  A SIGKILLed, 1-pixel copies then sent through the round-robin channel: they
  must be answered from the anchors at replica B (B's cache-answer counter);
* ``backend_restart``: the model server SIGKILLed and started again: calls fail
  UNAVAILABLE meanwhile; recovery is the time from the model server SERVING to
  the first forwarded call answered.

``rotation``: a session-rotation attack (every query in a fresh session, copies
of ``--attack-images`` images) in hardened mode, spread round-robin over two
replicas sharing Redis, against one process: same probe, same budget; the count
that reached the model (the sidecars' forward counters) is the leak.

Without ``redis-server`` on PATH the suite says so, writes ``{"skipped": ...}``
and exits 0. Every figure is measured at run time, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # we start processes, no gRPC in the children

import grpc  # noqa: E402
import numpy as np

from lab.cifar10 import load_cifar10
from lab.distinguisher import one_pixel_copy
from lab.launcher import Process, Serving, free_port
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.images import encode_raw
from sidecar.tensors import to_proto
from sidecar.tfapi import predict_pb2, prediction_service_pb2_grpc

HOST = "127.0.0.1"
NOISE_KEY = "5ca1e0ff" * 8  # one key for every replica of a run (a benchmark constant, not a secret)


# --------------------------------------------------------------------------- processes


class RedisServer:
    """``redis-server`` on a fixed port with an AOF directory: kill -9 and start again."""

    def __init__(self, exe: str, workdir: Path) -> None:
        self.exe, self.dir, self.port = exe, workdir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> float:
        """Returns the time (monotonic) Redis answered PING."""
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", HOST, "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return time.monotonic()
            except redis.RedisError:
                time.sleep(0.005)
        raise RuntimeError("redis-server did not answer PING")

    def flush(self) -> None:
        import redis

        redis.Redis(host=HOST, port=self.port).flushall()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def sidecar(name: str, backend: str, log_dir: Path, *flags: str, env: dict | None = None) -> Process:
    port, mport = free_port(), free_port()
    argv = [sys.executable, "-m", "sidecar", "--backend", backend, "--host", HOST, "--port", str(port),
            "--metrics-port", str(mport), "--rest-port", "0", "--noise-key", NOISE_KEY, "--log-level", "WARNING",
            "--grace-s", "1", *flags]
    proc = Process(name, argv, f"{HOST}:{port}", log_dir / f"{name}-{port}.log", env=env).start()
    proc.metrics_url = f"http://{HOST}:{mport}/metrics"
    return proc


def scrape(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (with these label values) at ``url``."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) of every process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
    return out


def cpu_seconds(roots: list[int]) -> float:
    """CPU time used so far by ``roots`` and all their live descendants."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(roots)
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo += children.get(pid, [])
    return total


# --------------------------------------------------------------------------- load


@dataclass
class Record:
    t0: float
    t1: float
    code: str


@dataclass
class Load:
    """Closed loop: ``concurrency`` clients, each calls again as soon as it is answered."""

    call: object            # async (client index, step) -> None; raises grpc.aio.AioRpcError
    concurrency: int
    records: list[Record] = field(default_factory=list)
    stop: bool = False

    async def _client(self, k: int) -> None:
        step = 0
        while not self.stop:
            t0 = time.monotonic()
            try:
                await self.call(k, step)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            self.records.append(Record(t0, time.monotonic(), code))
            step += 1
            if code not in ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
                await asyncio.sleep(0.002)  # a failing target answers at once: do not spin

    async def run(self, seconds: float, during=None) -> list[Record]:
        tasks = [asyncio.create_task(self._client(k)) for k in range(self.concurrency)]
        try:
            if during is not None:
                await during()
            else:
                await asyncio.sleep(seconds)
        finally:
            self.stop = True
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.records


def summarize(records: list[Record], t_from: float, t_to: float) -> dict:
    window = [r for r in records if t_from <= r.t0 and r.t1 <= t_to]
    ok = [r.t1 - r.t0 for r in window if r.code == "OK"]
    codes: dict[str, int] = {}
    for r in window:
        codes[r.code] = codes.get(r.code, 0) + 1
    out = {"calls": len(window), "codes": codes, "throughput_rps": len(ok) / max(t_to - t_from, 1e-9)}
    if ok:
        a = np.asarray(ok) * 1e3
        out |= {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}
    return out


def channels(targets: list[str], n: int, round_robin: bool = False) -> list[grpc.aio.Channel]:
    """``n`` channels, each its own connection(s) (no shared subchannel pool), so
    SO_REUSEPORT workers see several connections; ``round_robin``: each channel
    balances over every target, per call."""
    opts = [("grpc.use_local_subchannel_pool", 1)]
    if round_robin:
        target = "ipv4:" + ",".join(targets)
        opts.append(("grpc.lb_policy_name", "round_robin"))
        return [grpc.aio.insecure_channel(target, options=opts) for _ in range(n)]
    return [grpc.aio.insecure_channel(targets[i % len(targets)], options=opts) for i in range(n)]


class Workload:
    """Per client k: sessions ``{tag}-{k}``; step 2j sends image j (forwarded), step
    2j+1 a 1-pixel copy of it (answered from the anchor in paper mode)."""

    def __init__(self, images: np.ndarray, model: str, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.model = model
        self.images = images
        self.raw = [encode_raw(x) for x in images]
        self.copies = [encode_raw(one_pixel_copy(x, rng)) for x in images]
        self.tensors = [to_proto(x[None].astype(np.float32)) for x in images]

    def image_of(self, k: int, step: int, fresh_only: bool = False):
        j = (k * 7919 + (step if fresh_only else step // 2)) % len(self.images)
        return self.raw[j] if fresh_only or step % 2 == 0 else self.copies[j]

    def sidecar_call(self, chans, tag: str, fresh_only: bool = False, timeout: float = 10.0):
        stubs = [pb_grpc.ClassifierStub(c) for c in chans]

        async def call(k: int, step: int) -> None:
            req = pb.ClassifyRequest(model=pb.ModelRef(name=self.model), image=self.image_of(k, step, fresh_only),
                                     session_id=f"{tag}-{k}")
            await stubs[k % len(stubs)].Classify(req, timeout=timeout)

        return call

    def direct_call(self, chans, timeout: float = 10.0):
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in chans]

        async def call(k: int, step: int) -> None:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = self.model
            req.inputs["image"].CopyFrom(self.tensors[(k * 7919 + step // 2) % len(self.tensors)])
            await stubs[k % len(stubs)].Predict(req, timeout=timeout)

        return call


async def measure(call, concurrency: int, seconds: float, warmup_s: float, cpu_of: dict | None = None) -> dict:
    """``cpu_of``: name -> pids whose CPU time (with their children's) per answered
    call is reported: the cost that decides throughput on a host with free cores."""
    load = Load(call, concurrency)
    t_start = time.monotonic()
    cpu0: dict = {}

    async def during():
        await asyncio.sleep(warmup_s)
        cpu0.update({k: cpu_seconds(v) for k, v in (cpu_of or {}).items()})
        await asyncio.sleep(seconds)
        cpu0.update({f"{k}:end": cpu_seconds(v) for k, v in (cpu_of or {}).items()})

    records = await load.run(0, during)
    out = summarize(records, t_start + warmup_s, t_start + warmup_s + seconds)
    answered = out["throughput_rps"] * seconds
    for k in cpu_of or {}:
        out[f"{k}_cpu_ms_per_call"] = (cpu0[f"{k}:end"] - cpu0[k]) / max(answered, 1) * 1e3
    return out


async def close_all(chans) -> None:
    await asyncio.gather(*(c.close() for c in chans))


# --------------------------------------------------------------------------- suite


class Suite:
    def __init__(self, args, redis_exe: str, work: Path) -> None:
        self.args, self.work = args, work
        self.redis = RedisServer(redis_exe, work)
        data = load_cifar10()
        self.images = np.asarray(data.x_test[: args.images], dtype=np.uint8)
        self.load = Workload(self.images, args.model)
        self.serving = Serving(args.models_dir, [args.model], work, host=HOST)
        self.procs: list[Process] = []

    def start_sidecar(self, name: str, *flags: str) -> Process:
        p = sidecar(name, self.serving.address, self.work, *flags)
        self.procs.append(p)
        return p

    def stop_sidecars(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()

    async def throughput(self) -> dict:
        a, c = self.args, self.args.concurrency
        out: dict = {}
        chans = channels([self.serving.address], c)
        serving = [self.serving.popen.pid]
        out["direct"] = await measure(self.load.direct_call(chans), c, a.seconds, a.warmup, {"model_server": serving})
        await close_all(chans)
        base = ("--mode", "paper", "--padding", "off")
        points = {
            "memory_1": [("--session-store", "memory")],
            "redis_1": [("--session-store", self.redis.url)],
            "redis_workers_2": [("--session-store", self.redis.url, "--workers", "2")],
            "redis_replicas_2": [("--session-store", self.redis.url)] * 2,
        }
        for name, specs in points.items():
            procs = [self.start_sidecar(f"{name}-{i}", *base, *flags) for i, flags in enumerate(specs)]
            chans = channels([p.address for p in procs], c, round_robin=len(procs) > 1)
            out[name] = await measure(self.load.sidecar_call(chans, name), c, a.seconds, a.warmup,
                                      {"sidecar": [p.popen.pid for p in procs], "model_server": serving})
            out[name]["processes"] = len(procs)
            await close_all(chans)
            self.stop_sidecars()
        d = out["direct"]
        for name in points:
            p = out[name]
            p["throughput_vs_direct"] = p["throughput_rps"] / d["throughput_rps"]
            if "p50_ms" in p:
                p["p50_vs_direct"] = p["p50_ms"] / d["p50_ms"]
                p["p99_vs_direct"] = p["p99_ms"] / d["p99_ms"]
        out["workers_2_vs_1"] = out["redis_workers_2"]["throughput_rps"] / out["redis_1"]["throughput_rps"]
        # what one sidecar core answers per second, from its CPU cost (not the contended wall clock)
        for name in points:
            cost = out[name]["sidecar_cpu_ms_per_call"]
            out[name]["calls_per_sidecar_cpu_second"] = 1e3 / cost if cost > 0 else None
        out["replicas_2_vs_1"] = out["redis_replicas_2"]["throughput_rps"] / out["redis_1"]["throughput_rps"]
        return out

    async def redis_restart(self) -> dict:
        a = self.args
        p = self.start_sidecar("redis-fault", "--mode", "paper", "--padding", "off", "--session-store", self.redis.url)
        chans = channels([p.address], a.concurrency)
        load = Load(self.load.sidecar_call(chans, "redisfault", timeout=3.0), a.concurrency)
        marks: dict[str, float] = {}

        settle = 0.5  # calls holding a session when Redis died end within their socket timeout

        async def during():
            await asyncio.sleep(a.warmup + 1.0)
            marks["killed"] = time.monotonic()
            await asyncio.to_thread(self.redis.kill)
            await asyncio.sleep(settle)
            marks["forwards_down_start"] = await asyncio.to_thread(scrape, p.metrics_url, "hashguard_forwards_total")
            await asyncio.sleep(max(0.0, a.outage - settle))
            marks["forwards_down_end"] = await asyncio.to_thread(scrape, p.metrics_url, "hashguard_forwards_total")
            marks["restarted"] = time.monotonic()
            marks["ping"] = await asyncio.to_thread(self.redis.start)
            await asyncio.sleep(3.0)

        records = await load.run(0, during)
        await close_all(chans)
        self.stop_sidecars()
        down = [r for r in records if r.t0 >= marks["killed"] + settle and r.t1 <= marks["restarted"]]
        after = [r for r in records if r.code == "OK" and r.t1 >= marks["ping"]]
        first_ok = min((r.t1 for r in after), default=None)
        return {
            "outage_s": marks["restarted"] - marks["killed"],
            "calls_while_down": len(down),
            "codes_while_down": _codes(down),
            "answered_while_down": sum(r.code == "OK" for r in down),
            "forwards_while_down": marks["forwards_down_end"] - marks["forwards_down_start"],
            "recovery_s": None if first_ok is None else first_ok - marks["ping"],
            "codes_after": _codes([r for r in records if r.t0 >= marks["ping"]]),
        }

    async def replica_kill(self) -> dict:
        a = self.args
        flags = ("--mode", "paper", "--padding", "off", "--session-store", self.redis.url)
        rep_a, rep_b = self.start_sidecar("replica-a", *flags), self.start_sidecar("replica-b", *flags)
        n = a.sessions
        chan_a = grpc.aio.insecure_channel(rep_a.address)
        stub_a = pb_grpc.ClassifierStub(chan_a)
        for k in range(n):  # anchors made at A
            await stub_a.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=a.model), image=self.load.raw[k],
                                                     session_id=f"moved-{k}"), timeout=10)
        await chan_a.close()
        cache_b0 = scrape(rep_b.metrics_url, "hashguard_cache_answers_total")
        fwd_b0 = scrape(rep_b.metrics_url, "hashguard_forwards_total")
        # background load over both replicas, round robin, while A dies
        chans = channels([rep_a.address, rep_b.address], a.concurrency, round_robin=True)
        load = Load(self.load.sidecar_call(chans, "rrload", timeout=3.0), a.concurrency)
        marks: dict[str, float] = {}
        moved_codes: list[str] = []

        async def during():
            await asyncio.sleep(a.warmup + 1.0)
            marks["killed"] = time.monotonic()
            rep_a.popen.send_signal(signal.SIGKILL)
            rep_a.popen.wait(10)
            stub = pb_grpc.ClassifierStub(chans[0])
            # the moved sessions' 1-pixel copies: judged at B against the anchors A committed
            for k in range(n):
                try:
                    await stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=a.model), image=self.load.copies[k],
                                                           session_id=f"moved-{k}"), timeout=10, wait_for_ready=True)
                    moved_codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    moved_codes.append(exc.code().name)
            await asyncio.sleep(2.0)

        records = await load.run(0, during)
        await close_all(chans)
        cache_b = scrape(rep_b.metrics_url, "hashguard_cache_answers_total") - cache_b0
        fwd_b = scrape(rep_b.metrics_url, "hashguard_forwards_total") - fwd_b0
        self.stop_sidecars()
        after = [r for r in records if r.t0 >= marks["killed"]]
        failed = [r for r in after if r.code != "OK"]
        return {
            "moved_sessions": n,
            "moved_answered": moved_codes.count("OK"),
            "moved_codes": {c: moved_codes.count(c) for c in set(moved_codes)},
            "cache_answers_at_b": cache_b,
            "forwards_at_b": fwd_b,
            "load_calls_after_kill": len(after),
            "load_failed_after_kill": len(failed),
            "load_codes_after_kill": _codes(after),
            "last_failure_after_kill_s": max((r.t1 for r in failed), default=marks["killed"]) - marks["killed"],
        }

    async def moved_sessions_cached(self) -> dict:
        """Without background load: exactly the moved sessions' copies at B, from the anchors."""
        a = self.args
        flags = ("--mode", "paper", "--padding", "off", "--session-store", self.redis.url)
        rep_a, rep_b = self.start_sidecar("moved-a", *flags), self.start_sidecar("moved-b", *flags)
        n = a.sessions
        async with grpc.aio.insecure_channel(rep_a.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for k in range(n):
                await stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=a.model), image=self.load.raw[k],
                                                       session_id=f"quiet-{k}"), timeout=10)
        rep_a.popen.send_signal(signal.SIGKILL)
        rep_a.popen.wait(10)
        c0, f0 = scrape(rep_b.metrics_url, "hashguard_cache_answers_total"), scrape(rep_b.metrics_url, "hashguard_forwards_total")
        async with grpc.aio.insecure_channel(rep_b.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for k in range(n):
                await stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=a.model), image=self.load.copies[k],
                                                       session_id=f"quiet-{k}"), timeout=10)
        out = {"sessions": n,
               "cached_at_b": scrape(rep_b.metrics_url, "hashguard_cache_answers_total") - c0,
               "forwarded_at_b": scrape(rep_b.metrics_url, "hashguard_forwards_total") - f0}
        self.stop_sidecars()
        return out

    async def backend_restart(self) -> dict:
        a = self.args
        p = self.start_sidecar("backend-fault", "--mode", "paper", "--padding", "off", "--session-store", self.redis.url)
        chans = channels([p.address], a.concurrency)
        load = Load(self.load.sidecar_call(chans, "bkfault", fresh_only=True, timeout=3.0), a.concurrency)
        marks: dict[str, float] = {}

        async def during():
            await asyncio.sleep(a.warmup + 1.0)
            marks["killed"] = time.monotonic()
            self.serving.popen.send_signal(signal.SIGKILL)
            self.serving.popen.wait(10)
            await asyncio.sleep(a.outage)
            marks["restarted"] = time.monotonic()
            await asyncio.to_thread(self.serving.start)  # returns once the model server is SERVING
            marks["serving"] = time.monotonic()
            await asyncio.sleep(3.0)

        records = await load.run(0, during)
        await close_all(chans)
        self.stop_sidecars()
        down = [r for r in records if r.t0 >= marks["killed"] + 0.5 and r.t1 <= marks["restarted"]]
        first_ok = min((r.t1 for r in records if r.code == "OK" and r.t0 >= marks["killed"] + 0.5), default=None)
        return {
            "outage_s": marks["restarted"] - marks["killed"],
            "model_server_start_s": marks["serving"] - marks["restarted"],
            "codes_while_down": _codes(down),
            "answered_while_down": sum(r.code == "OK" for r in down),
            "recovery_s": None if first_ok is None else first_ok - marks["serving"],
        }

    async def rotation(self) -> dict:
        """Every query in a fresh session: image i once, then ``copies`` 1-pixel copies,
        one after the other (``sequential``) or all at once (``burst``, inside the
        replication lag), over one process or two replicas (index shared or not)."""
        a = self.args
        rng = np.random.default_rng(7)
        probe = [(self.images[i], [one_pixel_copy(self.images[i], rng) for _ in range(a.copies)])
                 for i in range(a.attack_images)]
        out: dict = {"images": a.attack_images, "copies_per_image": a.copies}
        flags = ("--mode", "hardened", "--padding", "off", "--session-store", self.redis.url)
        setups = (("one_process", 1, ()), ("replicas_2_shared_index", 2, ()),
                  ("replicas_2_local_index", 2, ("--index-replication", "false")))
        for burst in (False, True):
            for name, n, extra in setups:
                self.redis.flush()  # no sessions, anchors or index entries from the setup before
                procs = [self.start_sidecar(f"rot-{name}-{i}", *flags, *extra) for i in range(n)]
                chans = channels([p.address for p in procs], 1, round_robin=n > 1)
                stub = pb_grpc.ClassifierStub(chans[0])
                codes: dict[str, int] = {}
                q = 0

                async def ask(img, session: str) -> None:
                    try:
                        await stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=a.model), image=encode_raw(img),
                                                               session_id=session), timeout=10)
                        code = "OK"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                    codes[code] = codes.get(code, 0) + 1

                before = sum(scrape(p.metrics_url, "hashguard_forwards_total") for p in procs)
                for clean, copies in probe:
                    q += 1
                    await ask(clean, f"rot-{q}")
                    if burst:
                        await asyncio.gather(*(ask(c, f"rot-{q}-{j}") for j, c in enumerate(copies)))
                        q += len(copies)
                    else:
                        for c in copies:
                            q += 1
                            await ask(c, f"rot-{q}")
                await close_all(chans)
                await asyncio.sleep(0.2)
                forwards = sum(scrape(p.metrics_url, "hashguard_forwards_total") for p in procs) - before
                lag_n = sum(scrape(p.metrics_url, "hashguard_index_replication_lag_seconds_count") for p in procs)
                lag_s = sum(scrape(p.metrics_url, "hashguard_index_replication_lag_seconds_sum") for p in procs)
                out[f"{'burst' if burst else 'sequential'}_{name}"] = {
                    "queries": q, "codes": codes, "forwarded": forwards, "copies_forwarded": forwards - a.attack_images,
                    "replicated_entries": lag_n, "mean_lag_ms": (lag_s / lag_n * 1e3) if lag_n else None}
                self.stop_sidecars()
        return out


def _codes(records) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r.code] = out.get(r.code, 0) + 1
    return out


def table(result: dict) -> str:
    lines = []
    t = result.get("throughput", {})
    if t:
        lines.append(f"{'point':<20} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'rps/direct':>10} {'p50/direct':>10}")
        for name, p in t.items():
            if not isinstance(p, dict):
                continue
            lines.append(f"{name:<20} {p['throughput_rps']:8.0f} {p.get('p50_ms', float('nan')):8.1f} "
                         f"{p.get('p99_ms', float('nan')):8.1f} {p.get('throughput_vs_direct', 1.0):10.2f} "
                         f"{p.get('p50_vs_direct', 1.0):10.2f}")
        lines.append(f"workers 2 / 1: {t['workers_2_vs_1']:.2f}x   replicas 2 / 1: {t['replicas_2_vs_1']:.2f}x")
    if t:
        lines.append("sidecar CPU ms per call: " + ", ".join(
            f"{k} {p['sidecar_cpu_ms_per_call']:.2f}" for k, p in t.items() if isinstance(p, dict) and "sidecar_cpu_ms_per_call" in p))
    for key in ("redis_restart", "replica_kill", "moved_sessions", "backend_restart", "rotation"):
        if key in result:
            lines.append(f"{key}: {json.dumps(result[key])}")
    return "\n".join(lines)


async def run_suite(args, redis_exe: str, work: Path) -> dict:
    suite = Suite(args, redis_exe, work)
    suite.redis.start()
    suite.serving.start()
    result: dict = {}
    try:
        want = set(args.only or ["throughput", "redis_restart", "replica_kill", "moved_sessions",
                                 "backend_restart", "rotation"])
        for name in ("throughput", "redis_restart", "replica_kill", "moved_sessions", "backend_restart", "rotation"):
            if name in want:
                print(f"bench_scale: {name} ...", file=sys.stderr, flush=True)
                result[name] = await getattr(suite, name if name != "moved_sessions" else "moved_sessions_cached")()
    finally:
        suite.stop_sidecars()
        suite.serving.stop()
        suite.redis.stop()
    return result


def run(models_dir: str, model: str, **kw) -> dict:
    """Entry for ``python -m benchmarks --only scale``."""
    args = parser().parse_args(["--models-dir", models_dir, "--model", model])
    for k, v in kw.items():
        setattr(args, k, v)
    return collect(args)


def collect(args) -> dict:
    exe = shutil.which("redis-server")
    result: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "settings": {k: v for k, v in vars(args).items() if k not in ("out", "only")}}
    if not exe:
        reason = "redis-server not found on PATH (install it: apt-get install redis-server; `make suite` tries)"
        print(f"bench_scale: skipped: {reason}", file=sys.stderr)
        return result | {"skipped": reason}
    result["redis_server"] = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    result["machine"]["loadavg_before"] = os.getloadavg()  # other work on the cores shows in every ratio
    with tempfile.TemporaryDirectory(prefix="hashguard-scale-") as tmp:
        result |= asyncio.run(run_suite(args, exe, Path(tmp)))
    result["machine"]["loadavg_after"] = os.getloadavg()
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--out", default="reports/scale.json")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per throughput point")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--outage", type=float, default=2.0, help="seconds Redis / the model server stay down")
    ap.add_argument("--sessions", type=int, default=20, help="sessions moved by the replica kill")
    ap.add_argument("--attack-images", type=int, default=3)
    ap.add_argument("--copies", type=int, default=10, help="1-pixel copies per attacked image")
    ap.add_argument("--only", nargs="*", help="throughput redis_restart replica_kill moved_sessions backend_restart rotation")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = collect(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result) if "skipped" not in result else f"skipped: {result['skipped']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
