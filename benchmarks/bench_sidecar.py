"""Sidecar figures: judgment time, overhead vs direct TF-Serving-style calls, and
whether padded cache hits can be told apart from misses by their latency.

Every figure is measured here, on this machine, at run time.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from scipy import stats as sstats
from sidecar.wire.tfapi import predict_pb2, prediction_service_pb2_grpc  # the wire TF Serving speaks, no TensorFlow here

from lab.cifar10 import load_cifar10
from lab.distinguisher import one_pixel_copy
from lab.launcher import Lab as Stack
from lab.launcher import SidecarSpec
from sidecar import BLAS_THREAD_VARS
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.wire.images import encode_raw
from sidecar.judge.judgment import Anchor, Fingerprint, Thresholds, fingerprints, plan
from sidecar.wire.tensors import to_proto

from .stats import summary_ms


def judgment_time(images: np.ndarray, reps: int = 3) -> dict:
    """Per 32x32 image, what judging a query costs: fingerprint it and ``plan`` it against
    the session's anchor (paper mode), for one image per call and for a 400-image batch
    (issue 12: <= 25 us and <= 10 us). The batch is an attacker's: 1-pixel copies of the
    anchor (all answered by it); a batch of distinct images (each forwarded, so each one
    becomes the next anchor) is reported beside it. Best of ``reps`` passes, thread CPU
    time (wall clock on a shared host counts the time this thread was descheduled)."""
    th = Thresholds()
    rng = np.random.default_rng(0)
    anchor = [Anchor(Fingerprint.of(images[0]), None)]
    one = images[1:201]
    copies = [one_pixel_copy(images[0], rng) for _ in range(400)]
    distinct = list(images[1:401])

    def per_image(run, n: int) -> float:
        best = float("inf")
        for _ in range(reps):
            c = time.thread_time()
            run()
            best = min(best, (time.thread_time() - c) / n)
        return round(best * 1e6, 2)

    return {"one_image_us": per_image(lambda: [plan(anchor, fingerprints([img]), th) for img in one], len(one)),
            "one_image_target_us": 25,
            "batch400_us_per_image": per_image(lambda: plan(anchor, fingerprints(copies), th), len(copies)),
            "batch400_target_us": 10,
            "batch400_distinct_us_per_image": per_image(lambda: plan(anchor, fingerprints(distinct), th),
                                                        len(distinct)),
            "timing": "thread CPU, best of passes, paper mode (fingerprints + plan against the anchor); "
                      "batch400: 1-pixel copies of the anchor, distinct: 400 different test images"}


def _direct_call(stub, model: str, img: np.ndarray):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.inputs["image"].CopyFrom(to_proto(img[None].astype(np.float32)))
    return stub.Predict(req, timeout=30)


def _sidecar_call(stub, model: str, img: np.ndarray, session: str):
    return stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=model), image=encode_raw(img), session_id=session), timeout=30)


def _interleaved(paths: dict, images: np.ndarray) -> tuple[dict, dict]:
    """One call per path (name -> (call, pid)) per image, the paths' order rotating every
    image: latencies per path, and each path's own process CPU ms per call (0 where it
    has none)."""
    names = list(paths)
    lat: dict[str, list[float]] = {k: [] for k in names}
    c0 = {k: _cpu_s(paths[k][1]) for k in names}
    for i, img in enumerate(images):
        j = i % len(names)
        for name in names[j:] + names[:j]:
            t0 = time.perf_counter()
            paths[name][0](img)
            lat[name].append(time.perf_counter() - t0)
    cpu = {k: round((_cpu_s(paths[k][1]) - c0[k]) / len(images) * 1e3, 4) for k in names}
    return lat, cpu


def _throughput(fn, images: np.ndarray, seconds: float, workers: int = 4) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * workers

    def worker(w):
        i = w
        while time.perf_counter() < stop:
            fn(images[i % len(images)], w)
            i += workers
            counts[w] += 1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    return sum(counts) / seconds


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _pid(server) -> int | None:
    popen = getattr(server, "popen", None) or getattr(getattr(server, "_proc", None), "popen", None)
    return popen.pid if popen is not None else None


class _Meter:
    """Wall clock plus the CPU of client (this process), sidecar and model server for one segment."""

    def __init__(self, sidecar_pid: int | None, serving_pid: int | None) -> None:
        self.pids = {"sidecar": sidecar_pid, "serving": serving_pid}

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        self.p = {k: _cpu_s(v) for k, v in self.pids.items()}
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t
        self.cpu = {"client": time.process_time() - self.c,
                    **{k: _cpu_s(v) - self.p[k] for k, v in self.pids.items()}}

    def per_call_ms(self, calls: int) -> dict:
        out = {k: round(v / calls * 1e3, 4) for k, v in self.cpu.items()}
        out["total"] = round(sum(self.cpu.values()) / calls * 1e3, 4)
        return out


def _median(rows: list[dict]) -> dict:
    return {k: round(float(np.median([r[k] for r in rows])), 4) for k in rows[0]}


def overhead(st: Stack, model: str, images: np.ndarray, n: int, seconds: float, rounds: int = 5,
             sidecars: tuple[str, ...] = ("nopad",)) -> dict:
    """Distinct images through one session: every call is forwarded (the slow path).

    ``rounds`` times: a latency sample in which direct, the no-op proxy and each
    sidecar take turns CALL BY CALL (the order rotates every image), so a load change
    on the shared host hits every path alike; then a closed-loop throughput segment of
    ``seconds / rounds`` per path. Overheads are per-round differences to direct (paired),
    medians over rounds. Besides the wall clock, each throughput segment's CPU of
    client, sidecar and model server per call is reported (on 2 shared cores the
    wall-clock ratios are bounded by who gets a core), and for the latency sample the
    proxy process's own CPU per call.
    """
    serving_pid = _pid(st.serving)
    per_round = max(100, n // rounds)
    seg = seconds / rounds
    floor = _noop_proxy(st)
    with grpc.insecure_channel(st.backend) as dch, grpc.insecure_channel(floor.address) as fch:
        direct = prediction_service_pb2_grpc.PredictionServiceStub(dch)
        noop = prediction_service_pb2_grpc.PredictionServiceStub(fch)
        chans = {name: grpc.insecure_channel(st.sidecar(name).address) for name in sidecars}
        sides = {name: pb_grpc.ClassifierStub(ch) for name, ch in chans.items()}
        try:
            for img in images[:50]:  # warm every path
                _direct_call(direct, model, img)
                _direct_call(noop, model, img)
                for side in sides.values():
                    _sidecar_call(side, model, img, "warm")
            paths = {"direct": (lambda x, w=0: _direct_call(direct, model, x), None),
                     "noop_proxy": (lambda x, w=0: _direct_call(noop, model, x), floor.popen.pid)}
            for name, side in sides.items():
                paths[name] = ((lambda x, w=0, side=side, name=name: _sidecar_call(side, model, x, f"{name}-{w}")),
                               _pid(st.sidecar(name)))
            rows: dict[str, list[dict]] = {k: [] for k in paths}
            for r in range(rounds):
                lo = (r * per_round) % len(images)
                imgs = np.resize(images[lo:], (per_round, *images.shape[1:]))
                lats, lat_cpu = _interleaved(paths, imgs)
                for name, (fn, pid) in paths.items():
                    with _Meter(pid, serving_pid) as m_tp:
                        tp = _throughput(fn, images, seg)
                    calls = tp * seg
                    cpu = {f"cpu_ms_per_call_{k}": v for k, v in m_tp.per_call_ms(max(calls, 1)).items()}
                    rows[name].append({**summary_ms(lats[name]), "throughput_rps": tp, **cpu,
                                       "cpu_ms_per_call_serial_sidecar": lat_cpu[name]})
        finally:
            for ch in chans.values():
                ch.close()
            floor.stop()
    med = {name: _median(rs) for name, rs in rows.items()}
    d = med["direct"]
    out = {"rounds": rounds, "calls_per_latency_round": per_round, "seconds_per_throughput_round": seg,
           "direct": d, "targets": {"overhead_p50_ms": 1.0, "throughput_ratio": 0.8}}
    for name in ("noop_proxy", *sidecars):
        sm = med[name]
        ratios = [s["throughput_rps"] / x["throughput_rps"] for s, x in zip(rows[name], rows["direct"])]
        p50s = [s["p50_ms"] - x["p50_ms"] for s, x in zip(rows[name], rows["direct"])]
        p99s = [s["p99_ms"] - x["p99_ms"] for s, x in zip(rows[name], rows["direct"])]
        out[name] = {**sm,
                     "overhead_p50_ms": round(float(np.median(p50s)), 4),
                     "overhead_p50_ms_per_round": [round(x, 3) for x in p50s],
                     "overhead_p99_ms": round(float(np.median(p99s)), 4),
                     "throughput_ratio": round(float(np.median(ratios)), 4),
                     "throughput_ratio_per_round": [round(x, 3) for x in ratios],
                     "cpu_ratio_total_per_call": round(sm["cpu_ms_per_call_total"] / d["cpu_ms_per_call_total"], 3),
                     "sidecar_cpu_ms_per_call": sm["cpu_ms_per_call_sidecar"]}
    # With every call forwarded and the cores saturated, throughput is bounded by CPU per call:
    # the best ratio a proxy costing the no-op proxy's CPU can reach on this machine.
    f = med["noop_proxy"]
    out["noop_proxy"]["cpu_bound_throughput_ratio"] = round(
        d["cpu_ms_per_call_total"] / (d["cpu_ms_per_call_total"] + f["cpu_ms_per_call_sidecar"]), 4)
    out["noop_proxy"]["what"] = ("a grpc.aio proxy passing Predict bytes through (benchmarks/noop_proxy.py): "
                                 "the floor of any Python sidecar")
    return out


def many_clients(st: Stack, model: str, images: np.ndarray, clients: int = 16, rounds: int = 3,
                 seconds: float = 2.0, sidecars: tuple[str, ...] = ("nopad", "nopad_unbatched")) -> dict:
    """Closed-loop throughput with ``clients`` concurrent callers (one session each, every
    call forwarded), direct and through each sidecar in turn, ``rounds`` times: where
    many forwards wait at once, ``--backend-inflight`` batching sends them as one call."""
    chans = [grpc.insecure_channel(st.backend)] + [grpc.insecure_channel(st.sidecar(n).address) for n in sidecars]
    try:
        direct = prediction_service_pb2_grpc.PredictionServiceStub(chans[0])
        sides = {n: pb_grpc.ClassifierStub(ch) for n, ch in zip(sidecars, chans[1:])}
        paths = {"direct": lambda x, w: _direct_call(direct, model, x)}
        for n, side in sides.items():
            paths[n] = lambda x, w, side=side, n=n: _sidecar_call(side, model, x, f"many-{n}-{w}")
        for fn in paths.values():
            for img in images[:20]:
                fn(img, 0)
        rps: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for k, fn in paths.items():
                rps[k].append(_throughput(fn, images, seconds, workers=clients))
    finally:
        for ch in chans:
            ch.close()
    out = {"clients": clients, "rounds": rounds, "seconds_per_round": seconds,
           "direct_rps": round(float(np.median(rps["direct"])), 1)}
    for n in sidecars:
        ratios = [a / b for a, b in zip(rps[n], rps["direct"])]
        out[n] = {"rps": round(float(np.median(rps[n])), 1), "throughput_ratio": round(float(np.median(ratios)), 4),
                  "throughput_ratio_per_round": [round(r, 3) for r in ratios]}
    return out


def _pairs(address: str, model: str, images: np.ndarray, session: str, warmup: int) -> tuple[list, list]:
    rng = np.random.default_rng(abs(hash(session)) % 2**32)
    hits, misses = [], []
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for i, img in enumerate(images):
            copy = one_pixel_copy(img, rng)  # made before the clock starts: only the calls are timed
            t0 = time.perf_counter()
            _sidecar_call(stub, model, img, session)
            miss = time.perf_counter() - t0
            t0 = time.perf_counter()
            _sidecar_call(stub, model, copy, session)
            hit = time.perf_counter() - t0
            if i >= warmup:
                misses.append(miss)
                hits.append(hit)
    return hits, misses


def timing_channel(address: str, model: str, images: np.ndarray, n: int, warmup: int = 200) -> dict:
    """Alternate a new image (forwarded) and a 1-pixel copy of it (cached) in one
    session; compare the attacker-observed latencies with a two-sample KS test."""
    hits, misses = _pairs(address, model, np.resize(images, (warmup + n, *images.shape[1:])), "timing", warmup)
    ks = sstats.ks_2samp(hits, misses)
    return {"hit": summary_ms(hits), "miss": summary_ms(misses), "ks_statistic": float(ks.statistic),
            "ks_pvalue": float(ks.pvalue), "n": n, "target_pvalue_above": 0.05}


def timing_under_load(address: str, model: str, images: np.ndarray, n: int, sessions: int = 4) -> dict:
    """The same hit/miss comparison with several attacker sessions at once."""
    per = max(1, n // sessions)
    chunks = [images[(i * per) % len(images):][:per] for i in range(sessions)]
    with ThreadPoolExecutor(sessions) as pool:
        parts = list(pool.map(lambda c: _pairs(address, model, c[1], f"load{c[0]}", warmup=min(60, per // 2)),
                              enumerate(chunks)))
    hits = [h for p in parts for h in p[0]]
    misses = [m for p in parts for m in p[1]]
    ks = sstats.ks_2samp(hits, misses)
    return {"sessions": sessions, "hit": summary_ms(hits), "miss": summary_ms(misses),
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue)}


#: Where a call's Python time goes: (component, file, function) whose cumulative time is taken.
PROFILE_PARTS = (
    ("gate + handler (whole call in Python)", "transport/grpc_gate.py", "behavior"),
    ("backend resolve (cached signature/version)", "backend/base.py", "cached"),
    ("decode (raw pixels, checks)", "wire/images.py", "decode_async"),
    ("fingerprint", "judge/judgment.py", "fingerprints"),
    ("judge (compare with the anchor, or plan)", "judge/judgment.py", ("compare", "plan")),
    ("session store hold", "state/sessions.py", ("__aenter__", "__aexit__", "hold")),
    ("backend call (request bytes, response read)", "backend/base.py", "predict"),
    ("policy (keyed score noise)", "judge/policy.py", "apply"),
    ("padding (release point) + metrics", "plane/dataplane.py", "_release"),
    ("response proto", "transport/grpc_classifier.py", "classification"),
)


def _noop_proxy(st: Stack):
    from lab.launcher import Process, free_port

    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.noop_proxy", "--backend", st.backend, "--port", str(port)]
    log = Path(tempfile.mkdtemp(prefix="hashguard-noop-")) / "noop_proxy.log"
    return Process("noop-proxy", argv, f"127.0.0.1:{port}", log).start()


def _profiled_sidecar(st: Stack, spec: SidecarSpec, out: Path, log_dir: Path):
    from lab.launcher import Process, free_port

    port, mport = free_port(), free_port()
    argv = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "sidecar", *spec.flags(st.backend, port, mport)]
    return Process(f"profiled-{spec.name}", argv, f"127.0.0.1:{port}", log_dir / f"profiled-{spec.name}.log",
                   env={v: "1" for v in BLAS_THREAD_VARS}).start()


def profile_calls(st: Stack, model: str, images: np.ndarray, calls: int = 300) -> dict:
    """cProfile of a sidecar process (paper mode, padding off) serving ``calls`` forwarded
    Classify calls (distinct images), and another serving ``calls`` cached ones (1-pixel
    copies of the session's anchor). Per component: profiled ms per call (cProfile's own
    cost inflates Python time about 1.5-2x, so read the shares) and the process's CPU per
    call from /proc; "gRPC server, event loop, C" is the process CPU the Python handler
    does not account for."""
    import pstats

    rng = np.random.default_rng(5)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="hashguard-profile-") as tmp:
        for kind in ("forwarded", "cached"):
            prof = Path(tmp) / f"{kind}.prof"
            proc = _profiled_sidecar(st, SidecarSpec(f"prof-{kind}", mode="paper", padding="off"), prof, Path(tmp))
            pid = proc.popen.pid
            with grpc.insecure_channel(proc.address) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                anchor = images[0]
                _sidecar_call(stub, model, anchor, "p")
                for img in images[1:20]:
                    _sidecar_call(stub, model, img, "warm")
                c0, t0 = _cpu_s(pid), time.perf_counter()
                for i in range(calls):
                    img = images[(i + 20) % len(images)] if kind == "forwarded" else one_pixel_copy(anchor, rng)
                    _sidecar_call(stub, model, img, "p" if kind == "cached" else f"f{i % 4}")
                cpu, wall = _cpu_s(pid) - c0, time.perf_counter() - t0
            proc.stop(timeout=30)
            stats = pstats.Stats(str(prof)).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
            parts = {}
            for label, fname, func in PROFILE_PARTS:
                funcs = (func,) if isinstance(func, str) else func
                ct = sum(v[3] for k, v in stats.items() if k[0].endswith("sidecar/" + fname) and k[2] in funcs)
                parts[label] = round(ct / calls * 1e3, 4)
            handler = parts[PROFILE_PARTS[0][0]]
            # everything measured before the call started counts too: subtract warm-up by ratio of calls
            out[kind] = {"calls": calls, "profiled_ms_per_call": parts,
                         "process_cpu_ms_per_call_profiled": round(cpu / calls * 1e3, 4),
                         "client_wall_ms_per_call_profiled": round(wall / calls * 1e3, 4),
                         "grpc_server_event_loop_c_ms_per_call": round(cpu / calls * 1e3 - handler, 4)}
    return out


def profile_markdown(prof: dict, overhead_row: dict | None = None) -> str:
    lines = ["# Where a sidecar call's time goes", "",
             "`python -m benchmarks --only sidecar` (cProfile of a `python -m sidecar` process, paper mode,",
             "padding off; Classify of one 32x32 image). Profiled ms per call; cProfile inflates Python time.", "",
             "| component | forwarded ms | cached ms |", "|---|---|---|"]
    for label, _, _ in PROFILE_PARTS:
        lines.append(f"| {label} | {prof['forwarded']['profiled_ms_per_call'][label]} | "
                     f"{prof['cached']['profiled_ms_per_call'][label]} |")
    lines.append(f"| gRPC server, event loop, C (process CPU - handler) | "
                 f"{prof['forwarded']['grpc_server_event_loop_c_ms_per_call']} | "
                 f"{prof['cached']['grpc_server_event_loop_c_ms_per_call']} |")
    lines.append(f"| sidecar process CPU, profiled | {prof['forwarded']['process_cpu_ms_per_call_profiled']} | "
                 f"{prof['cached']['process_cpu_ms_per_call_profiled']} |")
    if overhead_row:
        lines += ["", f"Unprofiled (overhead benchmark, median of rounds): sidecar CPU "
                      f"{overhead_row['sidecar_cpu_ms_per_call']} ms per forwarded call."]
    return "\n".join(lines) + "\n"


def run(models_dir: str, model: str, n: int = 1000, seconds: float = 5.0, profile_out: str | None = "reports/profile.md") -> dict:
    data = load_cifar10()
    images = data.x_test
    out = {"judgment": judgment_time(images[:500])}
    blas_threads = str(os.cpu_count() or 2)
    specs = [SidecarSpec("nopad", mode="paper", padding="off"),
             SidecarSpec("nopad_unbatched", mode="paper", padding="off", args=("--backend-inflight", "0")),
             SidecarSpec("nopad_blas_default", mode="paper", padding="off",
                         env={v: blas_threads for v in BLAS_THREAD_VARS}),
             SidecarSpec("pad", mode="paper", padding="distribution")]
    with Stack(models_dir, [model], sidecars=specs) as st:
        ov = overhead(st, model, images, min(n, 500), seconds, sidecars=("nopad", "nopad_unbatched", "nopad_blas_default"))
        ov["batching"] = {"nopad": "--backend-inflight 2 (the default): forwards beyond 2 calls in flight share one",
                          "nopad_unbatched": "--backend-inflight 0: one backend call per client call"}
        ov["blas"] = {"nopad": "1 thread (the sidecar's default)",
                      "nopad_blas_default": f"{blas_threads} threads (OpenBLAS default on this host)"}
        out["overhead"] = ov
        out["many_clients"] = many_clients(st, model, images)
        out["profile"] = profile_calls(st, model, images)
        out["timing_padding_off"] = timing_channel(st.sidecar("nopad").address, model, images, n)
        out["timing_padding_on"] = timing_channel(st.sidecar("pad").address, model, images, n)
        out["timing_padding_on_concurrent"] = timing_under_load(st.sidecar("pad").address, model, images, n)
    md = profile_markdown(out["profile"], out["overhead"]["nopad"])
    print(md, file=sys.stderr)
    if profile_out:
        Path(profile_out).parent.mkdir(parents=True, exist_ok=True)
        Path(profile_out).write_text(md)
    return out


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_sidecar")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print(json.dumps(run(args.models_dir, args.model, args.n, args.seconds), indent=2))
