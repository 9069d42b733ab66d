"""Scale-out load and fault suite (issue 15): real ``redis-server``, real model
server, sidecars as processes, closed-loop gRPC load on loopback.

    python -m benchmarks.bench_scale --models-dir models --model cnn --out reports/scale.json
    make suite                      # installs redis-server when it can, then the above

Points (each ``--seconds`` long after a short warm-up, ``--concurrency`` closed-loop
client threads over ``--client-procs`` processes, ``benchmarks/loadgen.py``: sync
generic unary callables sending pre-serialized request bytes, the cheapest
Python client, because on a 2-core host the client's CPU is taken from the
servers it measures):

* ``direct``: Predict straight to the model server, the reference;
* ``memory_1``, ``redis_1``, ``redis_workers_2``, ``redis_replicas_2``: Classify
  through one sidecar process (memory / Redis store), ``--workers 2``, and two
  replicas behind one client-side round-robin channel. Paper mode, padding off,
  the ``half`` mix: every session alternates a new image with a 1-pixel copy of
  it, so about half of the calls are forwarded. Throughput and p50/p99 are also
  given as ratios to ``direct``;
* ``redis_1_attack`` / ``redis_workers_2_attack``: an attacker's probe stream (a
  new image, then 9 1-pixel copies of it; about 1 call in 10 forwarded), and
  ``..._fresh``: every call a new image, all forwarded (``--mixes``).

Every point has the CPU time per answered call of each group of processes
(``sidecar``, ``client``, ``model_server``, ``redis``; /proc, children included),
the cores each group used, and what the rest of the machine used meanwhile
(``other_busy_cores``: other people's jobs on a shared host). ``scale_bound``
turns them into the most ``--workers 2`` can gain over one worker on this host,
``cores * S1 / (S2 + C + B + R)``: with 2 cores and the client, model server and
Redis on them, one worker's one core of sidecar CPU against what 2 cores give
when every call also costs C + B + R elsewhere. ``--rounds`` repeats the
sidecar points in alternating order and keeps the median round.

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

from benchmarks import loadgen
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.wire.messages import encode_raw
from sidecar.wire.tensors import to_proto
from sidecar.wire.tfapi import predict_pb2

HOST = "127.0.0.1"
CLASSIFY = "/hashguard.v1.Classifier/Classify"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
COPIES = 3          # distinct 1-pixel copies per image in the attack mix
ATTACK_GROUP = 10   # attack mix: 1 new image, then 9 copies of it
MIXES = {
    "half": "each session alternates a new image with a 1-pixel copy of it: about half forwarded",
    "attack": f"each session sends a new image, then {ATTACK_GROUP - 1} 1-pixel copies of it (an attacker's "
              "probe stream): about 1 in 10 forwarded, the rest answered from the session's anchor",
    "fresh": "every call a new image: all forwarded (the backend's cost in every call)",
}
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


def cpu_by_process(roots: list[int]) -> dict[int, float]:
    """pid -> CPU seconds so far of ``roots`` and each of their live descendants."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(roots)
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
            todo += children.get(pid, [])
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


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def scale_bound(one: dict, two: dict, cores: int | None = None) -> dict:
    """What the measured CPU per call allows ``--workers 2`` on this host.

    With the client, the model server and Redis on the same cores, 2 workers can at
    most answer ``cores / (S + C + B + R)`` calls per second (every process's CPU ms
    per call, measured at the 2-worker point); one worker, bound by its one event
    loop, answers ``1 / S1`` (one core's worth of sidecar CPU). So the ratio is at
    most ``cores * S1 / (S2 + C + B + R)``, ``2S/(S+C+B+R)`` when S1 = S2 and the
    host has 2 cores (``bound_2S_over_total``). ``bound_dedicated_host`` is the
    same with one worker's own limit ``min(1/S1, cores/total1)``: what a host with
    nothing else on its cores allows. ``measured_bound`` divides by the one
    worker's measured throughput instead (on a shared host it got less than a
    core), ``own_cores_ratio`` is ``2 S1 / S2``: workers with 2 cores of their own."""
    cores = cores or os.cpu_count() or 1
    s1, s2 = one["sidecar_cpu_ms_per_call"], two["sidecar_cpu_ms_per_call"]
    total2 = two["accounted_cpu_ms_per_call"]
    parts = {k: two.get(f"{k}_cpu_ms_per_call") for k in ("sidecar", "client", "model_server", "redis")}
    capacity2 = cores * 1e3 / total2 if total2 > 0 else None
    return {
        "cores": cores,
        "S1_ms": s1, "S2_ms": s2,
        "per_call_ms_at_2_workers": parts,
        "others_ms": total2 - s2,
        "bound_2S_over_total": cores * s1 / total2 if total2 > 0 else None,
        "bound_dedicated_host": (cores / total2) / min(1 / s1, cores / one["accounted_cpu_ms_per_call"])
        if total2 > 0 and s1 > 0 and one.get("accounted_cpu_ms_per_call") else None,
        "capacity_2_workers_rps": capacity2,
        "measured_bound": capacity2 / one["throughput_rps"] if capacity2 and one["throughput_rps"] else None,
        "one_worker_sidecar_cores": one.get("sidecar_cores"),
        "measured_ratio": two["throughput_rps"] / one["throughput_rps"] if one["throughput_rps"] else None,
        # a host where the sidecar has 2 cores of its own (client, model server, Redis elsewhere)
        "own_cores_ratio": (2 * 1e3 / s2) / (1e3 / s1) if s1 > 0 and s2 > 0 else None,
        # what the measured ratio is made of: throughput = cores our processes got / CPU ms per call
        "cores_ours_1": one.get("cores_ours"), "cores_ours_2": two.get("cores_ours"),
        "total_ms_1": one.get("accounted_cpu_ms_per_call"), "total_ms_2": total2,
        "other_cores_1": one.get("other_busy_cores"), "other_cores_2": two.get("other_busy_cores"),
    }


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
        # pre-serialized request parts for loadgen: images, then COPIES rows of 1-pixel copies
        rng = np.random.default_rng(1)
        self.prefix = pb.ClassifyRequest(model=pb.ModelRef(name=args.model)).SerializeToString()
        imgs = list(self.images) + [one_pixel_copy(x, rng) for _ in range(COPIES) for x in self.images]
        self.parts = [pb.ClassifyRequest(image=encode_raw(x)).SerializeToString() for x in imgs]
        self.direct_parts = []
        for t in self.load.tensors:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = args.model
            req.inputs["image"].CopyFrom(t)
            self.direct_parts.append(req.SerializeToString())
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

    # ------------------------------------------------------------------ throughput

    def _streams(self, mix: str, tag: str, threads: list[int], direct: bool = False) -> list[loadgen.Stream]:
        """Per client thread k: session ``{tag}-{k}`` and the mix's image stream (see MIXES)."""
        n = len(self.images)
        out = []
        for k in threads:
            base = k * 7919
            if direct:
                steps = [(base + s) % n for s in range(n)]
            elif mix == "half":      # new image, then a 1-pixel copy of it
                steps = [(base + s // 2) % n + (0 if s % 2 == 0 else n) for s in range(2 * n)]
            elif mix == "attack":    # new image, then COPIES different 1-pixel copies of it, over and over
                g = ATTACK_GROUP
                steps = [(base + s // g) % n + (0 if s % g == 0 else n * (1 + (s % g - 1) % COPIES))
                         for s in range(g * n)]
            elif mix == "fresh":     # a new image every call: all forwarded
                steps = [(base + s) % n for s in range(n)]
            else:
                raise ValueError(mix)
            suffix = b"" if direct else pb.ClassifyRequest(session_id=f"{tag}-{k}").SerializeToString()
            out.append(loadgen.Stream(self.prefix if not direct else b"", steps, suffix))
        return out

    async def _point(self, targets: list[str], mix: str, tag: str, cpu_of: dict[str, list[int]],
                     metrics: list[str] = (), direct: bool = False) -> dict:
        """One closed-loop point: ``--concurrency`` threads over ``--client-procs`` client
        processes; per-process-group CPU time per answered call over the measured window."""
        a = self.args
        rr = len(targets) > 1
        target = ("ipv4:" + ",".join(targets)) if rr else targets[0]
        start_at = time.monotonic() + a.spawn_s
        t_from, t_to = start_at + a.warmup, start_at + a.warmup + a.seconds
        jobs = [loadgen.Job(target, PREDICT if direct else CLASSIFY, self.direct_parts if direct else self.parts,
                            self._streams(mix, tag, ks, direct), start_at, t_to + 0.5, round_robin=rr)
                for ks in loadgen.split(a.concurrency, a.client_procs)]
        clients = await asyncio.to_thread(loadgen.Clients, jobs)
        groups = {"client": clients.pids, **cpu_of}

        def sample() -> dict:
            cpu = {k: cpu_seconds(v) for k, v in groups.items()}
            cpu["machine"] = machine_cpu_seconds()
            cpu["sidecar_by_pid"] = cpu_by_process(cpu_of.get("sidecar", []))
            for name in ("hashguard_forwards_total", "hashguard_cache_answers_total"):
                cpu[name] = sum(scrape(u, name) for u in metrics)
            return cpu

        await asyncio.sleep(max(0.0, t_from - time.monotonic()))
        c0 = await asyncio.to_thread(sample)
        await asyncio.sleep(max(0.0, t_to - time.monotonic()))
        c1 = await asyncio.to_thread(sample)
        t0, t1, codes = await asyncio.to_thread(clients.results)
        out = loadgen.summarize(t0, t1, codes, t_from, t_to)
        answered = max(out["throughput_rps"] * a.seconds, 1)
        for k in groups:
            out[f"{k}_cpu_ms_per_call"] = (c1[k] - c0[k]) / answered * 1e3
            out[f"{k}_cores"] = (c1[k] - c0[k]) / a.seconds
        out["machine_busy_cores"] = (c1["machine"] - c0["machine"]) / a.seconds
        if cpu_of.get("sidecar"):  # how the load spread over the sidecar's processes (workers, replicas)
            out["sidecar_cores_by_process"] = sorted(
                (round((c1["sidecar_by_pid"][p] - c0["sidecar_by_pid"].get(p, 0.0)) / a.seconds, 3)
                 for p in c1["sidecar_by_pid"]), reverse=True)
        out["other_busy_cores"] = out["machine_busy_cores"] - sum(out[f"{k}_cores"] for k in groups)
        out["accounted_cpu_ms_per_call"] = sum(out[f"{k}_cpu_ms_per_call"] for k in groups)
        out["cores_ours"] = sum(out[f"{k}_cores"] for k in groups)
        if metrics:
            fwd = c1["hashguard_forwards_total"] - c0["hashguard_forwards_total"]
            cached = c1["hashguard_cache_answers_total"] - c0["hashguard_cache_answers_total"]
            out["forwarded_fraction"] = fwd / max(fwd + cached, 1)
        out["mix"] = mix
        return out

    async def throughput(self) -> dict:
        a = self.args
        out: dict = {"load": {"client_processes": a.client_procs, "threads": a.concurrency,
                              "client": "grpc sync generic unary callables, pre-serialized request bytes",
                              "mixes": {k: v for k, v in MIXES.items() if k in a.mixes or k == "half"}}}
        serving = [self.serving.popen.pid]
        redis_pid = [self.redis.proc.pid]
        out["direct"] = await self._point([self.serving.address], "direct", "direct", {"model_server": serving},
                                          direct=True)
        base = ("--mode", "paper", "--padding", "off")
        mixes = ("half",) + tuple(m for m in a.mixes if m != "half")  # half: every point's reference
        configs = {
            "memory_1": ([("--session-store", "memory")], ("half",)),
            "redis_1": ([("--session-store", self.redis.url)], mixes),
            "redis_workers_2": ([("--session-store", self.redis.url, "--workers", "2")], mixes),
            "redis_replicas_2": ([("--session-store", self.redis.url)] * 2, ("half",)),
        }
        order = [(name, r) for r in range(a.rounds) for name in
                 (configs if r % 2 == 0 else reversed(list(configs)))]
        runs: dict[str, list[dict]] = {}
        for name, r in order:
            specs, point_mixes = configs[name]
            procs = [self.start_sidecar(f"{name}-{i}", *base, *flags) for i, flags in enumerate(specs)]
            groups = {"sidecar": [p.popen.pid for p in procs], "model_server": serving}
            if "memory" not in name:
                groups["redis"] = redis_pid
            for mix in point_mixes:
                key = name if mix == "half" else f"{name}_{mix}"
                p = await self._point([p.address for p in procs], mix, f"{key}-r{r}", groups,
                                      [p.metrics_url for p in procs])
                p["processes"] = len(procs)
                runs.setdefault(key, []).append(p)
            self.stop_sidecars()
        d = out["direct"]
        for key, rs in runs.items():
            best = sorted(rs, key=lambda p: p["throughput_rps"])[len(rs) // 2]  # the median round
            p = out[key] = dict(best, rounds_rps=[round(x["throughput_rps"], 1) for x in rs])
            p["throughput_vs_direct"] = p["throughput_rps"] / d["throughput_rps"]
            if "p50_ms" in p:
                p["p50_vs_direct"] = p["p50_ms"] / d["p50_ms"]
                p["p99_vs_direct"] = p["p99_ms"] / d["p99_ms"]
            cost = p["sidecar_cpu_ms_per_call"]
            p["calls_per_sidecar_cpu_second"] = 1e3 / cost if cost > 0 else None
        out["workers_2_vs_1"] = {m: out[f"redis_workers_2{'' if m == 'half' else '_' + m}"]["throughput_rps"]
                                 / out[f"redis_1{'' if m == 'half' else '_' + m}"]["throughput_rps"] for m in mixes}
        out["replicas_2_vs_1"] = out["redis_replicas_2"]["throughput_rps"] / out["redis_1"]["throughput_rps"]
        out["scale_bound"] = {m: scale_bound(out[f"redis_1{'' if m == 'half' else '_' + m}"],
                                             out[f"redis_workers_2{'' if m == 'half' else '_' + m}"]) for m in mixes}
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
        lines.append(f"{'point':<24} {'rps':>7} {'p50 ms':>7} {'p99 ms':>7} {'/direct':>7} {'fwd':>5} "
                     f"{'S ms':>6} {'C ms':>6} {'B ms':>6} {'R ms':>6} {'other cores':>11}")
        for name, p in t.items():
            if not isinstance(p, dict) or "throughput_rps" not in p:
                continue
            f = lambda k: p.get(k) if p.get(k) is not None else float("nan")  # noqa: E731
            lines.append(f"{name:<24} {p['throughput_rps']:7.0f} {f('p50_ms'):7.1f} {f('p99_ms'):7.1f} "
                         f"{p.get('throughput_vs_direct', 1.0):7.2f} {f('forwarded_fraction'):5.2f} "
                         f"{f('sidecar_cpu_ms_per_call'):6.2f} {f('client_cpu_ms_per_call'):6.2f} "
                         f"{f('model_server_cpu_ms_per_call'):6.2f} {f('redis_cpu_ms_per_call'):6.2f} "
                         f"{f('other_busy_cores'):11.2f}")
        lines.append("workers 2 / 1: " + ", ".join(f"{m} {r:.2f}x" for m, r in t["workers_2_vs_1"].items())
                     + f"   replicas 2 / 1: {t['replicas_2_vs_1']:.2f}x")
        for m, b in t.get("scale_bound", {}).items():
            lines.append(f"bound {m}: 2S/(S+C+B+R) = {b['bound_2S_over_total']:.2f}, measured bound "
                         f"{b['measured_bound']:.2f}, measured {b['measured_ratio']:.2f}, own cores {b['own_cores_ratio']:.2f}")
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
    result["machine"]["loadavg_before"] = os.getloadavg()
    try:  # with autogroup, nice only orders processes inside one session: other sessions' jobs take their share
        result["machine"]["sched_autogroup"] = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        pass  # other work on the cores shows in every ratio
    with tempfile.TemporaryDirectory(prefix="hashguard-scale-") as tmp:
        result |= asyncio.run(run_suite(args, exe, Path(tmp)))
    result["machine"]["loadavg_after"] = os.getloadavg()
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--out", default="reports/scale.json")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per throughput point")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop client threads (all processes)")
    ap.add_argument("--client-procs", type=int, default=2, help="load client processes for the throughput points")
    ap.add_argument("--spawn-s", type=float, default=3.0, help="seconds for the client processes to start")
    ap.add_argument("--mixes", nargs="*", default=["half", "attack", "fresh"], choices=sorted(MIXES),
                    help="streams for 1 vs 2 workers (half: also every other point)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the sidecar throughput points (median kept)")
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
