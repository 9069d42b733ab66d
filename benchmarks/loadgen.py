"""A cheap closed-loop gRPC load generator: several client processes, each with a
few threads, calling through grpc's sync generic unary callables with request
bytes composed from pre-serialized parts (no stub, no proto built per call).

Why: on a 2-core host the load client shares the cores with the servers it
measures, so every CPU millisecond it spends per call is taken from them (the
asyncio stubs of ``bench_scale.Load`` cost about as much per call as the model
server). The parent measures each process's CPU time separately (client,
sidecar, model server, Redis), see ``bench_scale``.

A protobuf message's serialization is the concatenation of its fields'
encodings, so ``model + image + session`` (each a message with one field set,
serialized once) is a valid request; ``requests`` describes the stream of one
client thread as indices into ``parts``.

Timing uses ``time.monotonic`` (CLOCK_MONOTONIC: one clock for every process on
Linux), so the parent cuts every client's records to one window.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
         "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
         "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


@dataclass
class Stream:
    """What one client thread sends: call ``s`` is ``prefix + parts[steps[s % len]] + suffix``."""

    prefix: bytes
    steps: list[int]
    suffix: bytes


@dataclass
class Job:
    """One client process: ``streams`` (one thread each) against ``target``."""

    target: str                # "host:port", or "ipv4:a,b" with round_robin
    method: str                # "/package.Service/Method"
    parts: list[bytes]
    streams: list[Stream]
    start_at: float            # monotonic time the threads start calling
    stop_at: float             # ... and stop starting new calls
    timeout_s: float = 10.0
    round_robin: bool = False


def _thread(job: Job, stream: Stream, out: list) -> None:
    import grpc

    opts = [("grpc.use_local_subchannel_pool", 1)]  # each thread its own connection(s)
    if job.round_robin:
        opts.append(("grpc.lb_policy_name", "round_robin"))
    channel = grpc.insecure_channel(job.target, options=opts)
    call = channel.unary_unary(job.method, request_serializer=None, response_deserializer=None)
    reqs = [stream.prefix + job.parts[i] + stream.suffix for i in sorted(set(stream.steps))]
    by_part = dict(zip(sorted(set(stream.steps)), reqs))
    seq = [by_part[i] for i in stream.steps]
    t0s, t1s, codes = [], [], []
    ok = CODES.index("OK")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        pass
    delay = job.start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    s, n = 0, len(seq)
    mono = time.monotonic
    while True:
        t0 = mono()
        if t0 >= job.stop_at:
            break
        try:
            call(seq[s % n], timeout=job.timeout_s)
            code = ok
        except grpc.RpcError as exc:
            code = CODES.index(exc.code().name) if exc.code() is not None else CODES.index("UNKNOWN")
        t1 = mono()
        t0s.append(t0)
        t1s.append(t1)
        codes.append(code)
        s += 1
        if code != ok:
            time.sleep(0.002)  # a failing target answers at once: do not spin
    channel.close()
    out.append((np.asarray(t0s), np.asarray(t1s), np.asarray(codes, dtype=np.int8)))


def _client_main(job: Job, conn) -> None:  # a spawned process
    out: list = []
    threads = [threading.Thread(target=_thread, args=(job, st, out), daemon=True) for st in job.streams]
    for t in threads:
        t.start()
    conn.send(("ready", os.getpid()))
    for t in threads:
        t.join()
    if out:
        t0 = np.concatenate([o[0] for o in out])
        t1 = np.concatenate([o[1] for o in out])
        codes = np.concatenate([o[2] for o in out])
    else:
        t0 = t1 = np.zeros(0)
        codes = np.zeros(0, dtype=np.int8)
    conn.send((t0, t1, codes))
    conn.close()


class Clients:
    """Start the client processes (spawned: no gRPC state from the parent), learn their
    pids (for CPU accounting), then collect their records."""

    def __init__(self, jobs: list[Job]) -> None:
        ctx = mp.get_context("spawn")
        self.procs, self.conns, self.pids = [], [], []
        for job in jobs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_main, args=(job, child), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        for c in self.conns:
            tag, pid = c.recv()
            self.pids.append(pid)

    def results(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = [c.recv() for c in self.conns]
        for p in self.procs:
            p.join(30)
        return (np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got]),
                np.concatenate([g[2] for g in got]))


def split(n_threads: int, processes: int) -> list[list[int]]:
    """Thread indices 0..n-1 dealt over ``processes`` client processes."""
    return [list(range(i, n_threads, processes)) for i in range(processes) if i < n_threads]


def summarize(t0: np.ndarray, t1: np.ndarray, codes: np.ndarray, t_from: float, t_to: float) -> dict:
    inside = (t0 >= t_from) & (t1 <= t_to)
    lat = (t1 - t0)[inside & (codes == 0)]
    got: dict[str, int] = {}
    for c, n in zip(*np.unique(codes[inside], return_counts=True)):
        got[CODES[int(c)]] = int(n)
    out = {"calls": int(inside.sum()), "codes": got, "throughput_rps": float(len(lat) / max(t_to - t_from, 1e-9))}
    if len(lat):
        out |= {"p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}
    return out
