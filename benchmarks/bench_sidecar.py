"""Sidecar figures: judgment time, overhead vs direct TF-Serving-style calls, and
whether padded cache hits can be told apart from misses by their latency.

Every figure is measured here, on this machine, at run time.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from scipy import stats as sstats
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from lab.cifar10 import load_cifar10
from lab.distinguisher import one_pixel_copy
from lab.launcher import Lab as Stack
from lab.launcher import SidecarSpec
from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.images import encode_raw
from sidecar.judgment import Fingerprint, Thresholds, compare
from sidecar.tensors import to_proto

from .stats import summary_ms


def judgment_time(images: np.ndarray, reps: int = 3) -> dict:
    """Per 32x32 image: hash it and compare it with an anchor (what a query costs)."""
    th = Thresholds()
    anchor = Fingerprint.of(images[0])
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for img in images:
            compare(anchor, Fingerprint.of(img), th)
        best = min(best, (time.perf_counter() - t0) / len(images))
    return {"judgment_us_per_image": best * 1e6, "images": int(len(images)), "target_us": 50}


def _direct_call(stub, model: str, img: np.ndarray):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.inputs["image"].CopyFrom(to_proto(img[None].astype(np.float32)))
    return stub.Predict(req, timeout=30)


def _sidecar_call(stub, model: str, img: np.ndarray, session: str):
    return stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=model), image=encode_raw(img), session_id=session), timeout=30)


def _latencies(fn, images: np.ndarray, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(images[i % len(images)])
        out.append(time.perf_counter() - t0)
    return out


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


def overhead(st: Stack, model: str, images: np.ndarray, n: int, seconds: float) -> dict:
    """Distinct images through one session: every call is forwarded (the slow path)."""
    with grpc.insecure_channel(st.backend) as dch, grpc.insecure_channel(st.sidecar("nopad").address) as sch:
        direct = prediction_service_pb2_grpc.PredictionServiceStub(dch)
        side = pb_grpc.ClassifierStub(sch)
        for img in images[:50]:  # warm both paths
            _direct_call(direct, model, img)
            _sidecar_call(side, model, img, "warm")
        d = _latencies(lambda x: _direct_call(direct, model, x), images, n)
        s = _latencies(lambda x: _sidecar_call(side, model, x, "bench"), images, n)
        d_tp = _throughput(lambda x, w: _direct_call(direct, model, x), images, seconds)
        s_tp = _throughput(lambda x, w: _sidecar_call(side, model, x, f"tp{w}"), images, seconds)
    ds, ss = summary_ms(d), summary_ms(s)
    return {
        "direct": {**ds, "throughput_rps": d_tp},
        "sidecar_padding_off": {**ss, "throughput_rps": s_tp},
        "overhead_p50_ms": ss["p50_ms"] - ds["p50_ms"],
        "overhead_p99_ms": ss["p99_ms"] - ds["p99_ms"],
        "throughput_ratio": s_tp / d_tp,
        "targets": {"overhead_p50_ms": 1.0, "throughput_ratio": 0.8},
    }


def _pairs(address: str, model: str, images: np.ndarray, session: str, warmup: int) -> tuple[list, list]:
    rng = np.random.default_rng(abs(hash(session)) % 2**32)
    hits, misses = [], []
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for i, img in enumerate(images):
            t0 = time.perf_counter()
            _sidecar_call(stub, model, img, session)
            miss = time.perf_counter() - t0
            t0 = time.perf_counter()
            _sidecar_call(stub, model, one_pixel_copy(img, rng), session)
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
        parts = list(pool.map(lambda c: _pairs(address, model, c[1], f"load{c[0]}", warmup=60),
                              enumerate(chunks)))
    hits = [h for p in parts for h in p[0]]
    misses = [m for p in parts for m in p[1]]
    ks = sstats.ks_2samp(hits, misses)
    return {"sessions": sessions, "hit": summary_ms(hits), "miss": summary_ms(misses),
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue)}


def run(models_dir: str, model: str, n: int = 1000, seconds: float = 5.0) -> dict:
    data = load_cifar10()
    images = data.x_test
    out = {"judgment": judgment_time(images[:500])}
    specs = [SidecarSpec("nopad", mode="paper", padding="off"),
             SidecarSpec("pad", mode="paper", padding="distribution")]
    with Stack(models_dir, [model], sidecars=specs) as st:
        out["overhead"] = overhead(st, model, images, min(n, 500), seconds)
        out["timing_padding_off"] = timing_channel(st.sidecar("nopad").address, model, images, n)
        out["timing_padding_on"] = timing_channel(st.sidecar("pad").address, model, images, n)
        out["timing_padding_on_concurrent"] = timing_under_load(st.sidecar("pad").address, model, images, n)
    return out
