"""The timing side channel as a client sees it, run after run (issue 24).

Protocol: in one paper-mode session a client sends a new image (the sidecar forwards
it: a miss), then a 1-pixel copy of it (answered from the session's anchor: a hit),
each a unary ``Classify`` over gRPC to a ``python -m sidecar`` process in front of
the embedded model server (``python -m serving``), and times both calls on the
client. ``sessions`` such clients run at once (threads, one session each). Every
run compares the hit and miss latencies with a two-sample KS test and the
difference of their medians; whether the answers really were cached is read from
the sidecar's Prometheus counters before and after the run, not assumed.

Two sidecars serve every run, each in its own process on the same backend: one
with the default settings (the time layer as shipped) and one with
``--padding off``. Each client thread alternates chunks of pairs between them, so
machine load drifts alike for both; the difference of their forwarded-answer
latencies (p50, p99) is what the time layer adds to a forwarded answer.

Runs: ``runs`` at each session count on the host as it is, then ``load_runs`` more
with a background CPU hog (one busy Python process per ``--hog`` count). The load
average (``os.getloadavg``) is recorded beside every run. Nothing here asserts a
figure: it prints one line per run and writes the JSON.

    python -m benchmarks.bench_timing --runs 5 --pairs 600 --sessions 1 4 --out reports/timing.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from scipy import stats as sstats

from lab.cifar10 import load_cifar10
from lab.counters import parse, total
from lab.distinguisher import one_pixel_copy
from lab.launcher import Lab as Stack
from lab.launcher import SidecarSpec
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.config import Settings
from sidecar.wire.messages import encode_raw

from .stats import emit

DEFAULT, OFF = "default", "off"


def _call(stub, model: str, img: np.ndarray, session: str) -> None:
    stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=model), image=encode_raw(img), session_id=session),
                  timeout=30)


def _session(addresses: dict[str, str], model: str, images: np.ndarray, session: str, chunk: int,
             seed: int) -> dict[str, tuple[list[float], list[float]]]:
    """One client: pairs (new image, then its 1-pixel copy) in ``session``, chunks of
    ``chunk`` pairs going to each sidecar in turn (the order rotating). Returns
    {sidecar: (hit seconds, miss seconds)}."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in addresses}
    channels = {n: grpc.insecure_channel(a) for n, a in addresses.items()}
    try:
        stubs = {n: pb_grpc.ClassifierStub(ch) for n, ch in channels.items()}
        names = list(addresses)
        for k, start in enumerate(range(0, len(images), chunk)):
            for name in names[k % len(names):] + names[:k % len(names)]:
                stub, (hits, misses) = stubs[name], out[name]
                for img in images[start:start + chunk]:
                    copy = one_pixel_copy(img, rng)  # made before the clock starts
                    t0 = time.perf_counter()
                    _call(stub, model, img, session)
                    t1 = time.perf_counter()
                    _call(stub, model, copy, session)
                    t2 = time.perf_counter()
                    misses.append(t1 - t0)
                    hits.append(t2 - t1)
    finally:
        for ch in channels.values():
            ch.close()
    return out


def _compare(hits: list[float], misses: list[float], seed: int = 0) -> dict:
    """KS test and medians of hit vs miss latencies (seconds in, ms out). Beside them: the
    bootstrap standard error of the median difference (how far apart two medians of this
    spread land by chance alone) and the median of the per-pair differences (hit i minus
    the miss just before it: a systematic offset, if any, without the spread)."""
    h, m = np.asarray(hits) * 1e3, np.asarray(misses) * 1e3
    ks = sstats.ks_2samp(h, m)
    rng = np.random.default_rng(seed)
    boot = [np.median(rng.choice(h, h.size)) - np.median(rng.choice(m, m.size)) for _ in range(400)]
    return {"pairs": int(len(h)), "ks_statistic": round(float(ks.statistic), 4), "ks_pvalue": float(ks.pvalue),
            "median_hit_ms": round(float(np.median(h)), 4), "median_miss_ms": round(float(np.median(m)), 4),
            "median_hit_minus_miss_ms": round(float(np.median(h) - np.median(m)), 4),
            "median_difference_bootstrap_se_ms": round(float(np.std(boot)), 4),
            "paired_median_hit_minus_miss_ms": round(float(np.median(h - m)), 4),
            "hit_p99_ms": round(float(np.percentile(h, 99)), 4), "miss_p99_ms": round(float(np.percentile(m, 99)), 4)}


def markdown(result: dict) -> str:
    """One table row per run (for docs/measurements.md)."""
    rows = ["| run | sessions | load 1m before → after | KS D | KS p | median hit − miss | bootstrap s.e. | "
            "paired median | late forwards / hits | padding off: KS p, hit − miss | added to forwards p50 / p99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        d, o, a = r[DEFAULT], r[OFF], r["added_forward_latency_ms"]
        truth = "" if d["ground_truth_ok"] and o["ground_truth_ok"] else " (ground truth differs)"
        rows.append(
            f"| {r['kind']} {r['run']} ({r['started_utc']}) | {r['sessions']} | {r['loadavg_1m_before']:.2f} → "
            f"{r['loadavg_1m_after']:.2f} | {d['ks_statistic']:.4f} | {d['ks_pvalue']:.3g} | "
            f"{d['median_hit_minus_miss_ms']:+.4f} ms | {d.get('median_difference_bootstrap_se_ms', float('nan')):.3f} ms | "
            f"{d.get('paired_median_hit_minus_miss_ms', float('nan')):+.4f} ms | "
            f"{d['late_answers']['forwarded']} / {d['late_answers']['cached']} | {o['ks_pvalue']:.2g}, "
            f"{o['median_hit_minus_miss_ms']:+.2f} ms | {a['p50']:+.1f} / {a['p99']:+.1f} ms{truth} |")
    return "\n".join(rows)


def reanalyse(result: dict) -> dict:
    """Recompute every run's comparison from the raw latencies a ``--raw`` run kept."""
    for r in result["runs"]:
        for name in (DEFAULT, OFF):
            raw = r[name]["raw_ms"]
            r[name].update(_compare(np.asarray(raw["hit"]) / 1e3, np.asarray(raw["miss"]) / 1e3))
    return result


def _late(st: Stack, name: str, model: str) -> dict[str, float]:
    """The sidecar's own count of answers not ready by their release time, by kind."""
    samples = parse(st.counters(name).text())
    return {kind: total(samples, "hashguard_padding_late_total", model=model, cached=flag)
            for kind, flag in (("cached", "true"), ("forwarded", "false"))}


def one_run(st: Stack, model: str, images: np.ndarray, pairs: int, sessions: int, chunk: int, tag: str,
            raw: bool = False, settle: np.ndarray | None = None) -> dict:
    """``settle``: images sent first, unmeasured, at the run's own concurrency, so that the
    release target has followed the change of load (1 -> 4 sessions moves the forwards'
    latency quantile) before anything is timed."""
    addresses = {n: st.sidecar(n).address for n in (DEFAULT, OFF)}
    per = -(-pairs // sessions)
    if settle is not None and len(settle):
        each = -(-len(settle) // sessions)
        with ThreadPoolExecutor(sessions) as pool:
            list(pool.map(lambda i: _session(addresses, model, settle[i * each:(i + 1) * each], f"{tag}-settle{i}",
                                             chunk, seed=i), range(sessions)))
    before = {n: st.counters(n).snapshot(model) for n in addresses}
    late_before = _late(st, DEFAULT, model)
    load_before = os.getloadavg()
    t0 = time.time()
    with ThreadPoolExecutor(sessions) as pool:
        parts = list(pool.map(
            lambda i: _session(addresses, model, images[i * per:(i + 1) * per], f"{tag}-s{i}", chunk,
                               seed=zlib.crc32(f"{tag}-{i}".encode())), range(sessions)))
    wall = time.time() - t0
    out: dict = {"sessions": sessions, "wall_s": round(wall, 1), "loadavg_1m_before": round(load_before[0], 2),
                 "loadavg_1m_after": round(os.getloadavg()[0], 2),
                 "started_utc": time.strftime("%H:%M:%S", time.gmtime(t0))}
    for name in addresses:
        hits = [x for p in parts for x in p[name][0]]
        misses = [x for p in parts for x in p[name][1]]
        after = st.counters(name).snapshot(model)
        truth = {"forwarded": int(after["forwards"] - before[name]["forwards"]),
                 "cached": int(after["cached"] - before[name]["cached"])}
        out[name] = {**_compare(hits, misses), "ground_truth": truth,
                     "ground_truth_ok": truth == {"forwarded": len(misses), "cached": len(hits)}}
        if raw:
            out[name]["raw_ms"] = {"hit": [round(x * 1e3, 4) for x in hits], "miss": [round(x * 1e3, 4) for x in misses]}
    late = _late(st, DEFAULT, model)
    out[DEFAULT]["late_answers"] = {k: int(late[k] - late_before[k]) for k in late}  # left when ready, after their release time
    d, o = out[DEFAULT], out[OFF]
    out["added_forward_latency_ms"] = {  # default vs --padding off, forwarded answers, client side
        "p50": round(d["median_miss_ms"] - o["median_miss_ms"], 4),
        "p99": round(d["miss_p99_ms"] - o["miss_p99_ms"], 4)}
    return out


def _line(label: str, r: dict) -> str:
    d, o, a = r[DEFAULT], r[OFF], r["added_forward_latency_ms"]
    return (f"{label:>8} sessions={r['sessions']} load={r['loadavg_1m_before']:.2f}->{r['loadavg_1m_after']:.2f} | "
            f"default: KS D={d['ks_statistic']:.4f} p={d['ks_pvalue']:.3g} median hit-miss={d['median_hit_minus_miss_ms']:+.4f} ms "
            f"(miss p50 {d['median_miss_ms']:.3f}) late h/m {d['late_answers']['cached']}/{d['late_answers']['forwarded']} truth={'ok' if d['ground_truth_ok'] else d['ground_truth']} | "
            f"off: D={o['ks_statistic']:.4f} p={o['ks_pvalue']:.3g} hit-miss={o['median_hit_minus_miss_ms']:+.4f} ms | "
            f"added to forwards p50 {a['p50']:+.3f} p99 {a['p99']:+.3f} ms")


class Hog:
    """``n`` busy Python processes: a background CPU load for the duration of a ``with``."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> "Hog":
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


def run(models_dir: str = "models", model: str = "cnn", runs: int = 5, pairs: int = 600,
        sessions: tuple[int, ...] = (1, 4), load_runs: int = 1, hog: int = 1, warmup: int = 1000,
        chunk: int = 25, raw: bool = False, sidecar_args: tuple[str, ...] = (), settle: int = 100) -> dict:
    data = load_cifar10()
    pool = np.concatenate([data.x_test, data.x_train])
    default_padding = Settings().padding
    specs = [SidecarSpec(DEFAULT, mode="paper", padding=default_padding, args=tuple(sidecar_args)),
             SidecarSpec(OFF, mode="paper", padding="off")]
    result: dict = {"protocol": "paper mode; per pair a new image (forwarded) then a 1-pixel copy (cached), unary "
                                "Classify over gRPC, client-side perf_counter; KS = scipy.stats.ks_2samp",
                    "default_padding": default_padding, "time_layer_sidecar_args": list(sidecar_args),
                    "pairs_per_run": pairs, "settle_pairs_per_run": settle, "chunk": chunk, "hog_processes": hog,
                    "cpus": os.cpu_count(), "runs": []}
    offset = 0

    def images(n: int) -> np.ndarray:
        nonlocal offset
        idx = (offset + np.arange(n)) % len(pool)
        offset += n
        return pool[idx]

    with Stack(models_dir, [model], sidecars=specs) as st:
        # the model server's first inferences are slow (graph warm-up): through the padding-off
        # sidecar, so they do not sit in the default sidecar's latency window as if forwards were
        _session({OFF: st.sidecar(OFF).address}, model, images(100), "prewarm", chunk, seed=0)
        warm = images(warmup)
        _session({n: st.sidecar(n).address for n in (DEFAULT, OFF)}, model, warm, "warmup", chunk, seed=1)
        plan = [("host", r) for r in range(runs)] + [("load", r) for r in range(load_runs)]
        for kind, r in plan:
            for s in sessions:
                label = f"{kind}#{r + 1}"
                if kind == "load":
                    with Hog(hog):
                        row = one_run(st, model, images(pairs), pairs, s, chunk, f"{label}-{s}", raw, images(settle))
                else:
                    row = one_run(st, model, images(pairs), pairs, s, chunk, f"{label}-{s}", raw, images(settle))
                row.update(kind=kind, run=r + 1)
                result["runs"].append(row)
                print(_line(label, row), file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_timing")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--runs", type=int, default=5, help="runs per session count on the host as it is")
    ap.add_argument("--load-runs", type=int, default=1, help="further runs per session count under a CPU hog")
    ap.add_argument("--hog", type=int, default=1, help="busy processes during load runs")
    ap.add_argument("--pairs", type=int, default=600, help="hit/miss pairs per run (split over the sessions)")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--warmup", type=int, default=1000, help="pairs before the first run (fills the default --padding-window)")
    ap.add_argument("--settle", type=int, default=100, help="unmeasured pairs at each run's own concurrency before it "
                                                            "is timed (the release target follows the load change)")
    ap.add_argument("--sidecar-args", nargs="*", default=[], help="further flags for the time-layer sidecar "
                                                                  "(default: none, i.e. default settings)")
    ap.add_argument("--raw", action="store_true", help="also write every latency (ms) into the JSON")
    ap.add_argument("--out", default="reports/timing.json")
    ap.add_argument("--reanalyse", metavar="JSON", help="no run: recompute the figures of a --raw result file and "
                                                         "print its markdown table")
    a = ap.parse_args()
    if a.reanalyse:
        import json

        with open(a.reanalyse) as f:
            print(markdown(reanalyse(json.load(f))))
        return
    result = run(a.models_dir, a.model, a.runs, a.pairs, tuple(a.sessions), a.load_runs, a.hog, a.warmup, raw=a.raw,
                 sidecar_args=tuple(a.sidecar_args), settle=a.settle)
    emit(result, a.out)
    print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
