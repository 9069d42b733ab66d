"""How fast hostile inputs are refused, and what they cost everyone else (issue 11).

An in-process sidecar over the official fake backend (model "m": 32x32x3, model
"dyn": any height and width). For each bomb (a 380 KiB PNG declaring 20000x20000,
a JPEG declaring 30000x30000, a 46-byte-payload Predict tensor declaring
[100000, 32, 32, 3]): the time to its status over gRPC on loopback (median and
max of ``reps``), the resident-memory growth over all of them, and the latency
of a small Classify of another session sent while bombs are in flight, beside
the same Classify on a quiet server. Figures are measured here at run time.

``python -m benchmarks.bench_bombs [--out reports/bench_bombs.json]``, or
``python -m benchmarks --only bombs``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.config import Settings
from sidecar.wire.messages import encode_raw
from sidecar.server import SidecarServer
from sidecar.testing import FakeBackend, FakeModel
from sidecar.wire.tfapi import predict_pb2, prediction_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import badinput as bad  # noqa: E402  - the bombs the bad-input corpus uses
from benchmarks.stats import emit


def _rss_mb() -> float:
    return bad.rss_mb()


def _tensor_bomb() -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "m"
    t = req.inputs["image"]
    t.dtype = 1  # DT_FLOAT
    for d in (100000, 32, 32, 3):
        t.tensor_shape.dim.add(size=d)
    t.float_val.append(1.0)
    return req


async def _run(reps: int) -> dict:
    backend = FakeBackend({"m": FakeModel(), "dyn": FakeModel(image_shape=(None, None, 3))})
    settings = Settings(backend="127.0.0.1:1", host="127.0.0.1", port=0, metrics_port=0, rest_port=0, padding="off")
    server = SidecarServer(settings, backend=backend)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    classifier = pb_grpc.ClassifierStub(channel)
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    jpeg = bad.jpeg_declaring(bad.jpeg(np.zeros((32, 32, 3), np.uint8)), 30000, 30000)
    png = bad.png_bomb()
    bombs = {
        "png_20000x20000_fixed_model": lambda: classifier.Classify(pb.ClassifyRequest(
            model=pb.ModelRef(name="m"), image=pb.Image(encoded=png), session_id="attacker")),
        "png_20000x20000_any_size_model": lambda: classifier.Classify(pb.ClassifyRequest(
            model=pb.ModelRef(name="dyn"), image=pb.Image(encoded=png), session_id="attacker")),
        "jpeg_30000x30000_fixed_model": lambda: classifier.Classify(pb.ClassifyRequest(
            model=pb.ModelRef(name="m"), image=pb.Image(encoded=jpeg), session_id="attacker")),
        "tensor_100000x32x32x3_declared": lambda: predict.Predict(_tensor_bomb(), metadata=(("x-session-id", "attacker"),)),
    }
    small = pb.ClassifyRequest(model=pb.ModelRef(name="m"), session_id="bystander",
                               image=encode_raw(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)))

    async def timed(call) -> tuple[float, str]:
        t0 = time.perf_counter()
        try:
            await call()
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        return time.perf_counter() - t0, code

    for _ in range(3):  # warm up the channel and the bystander's session
        await classifier.Classify(small)
    quiet = [(await timed(lambda: classifier.Classify(small)))[0] for _ in range(reps)]
    gc.collect()
    rss0 = _rss_mb()
    predicts0 = backend.calls["predict"]
    out: dict = {"bombs": {}, "png_bomb_bytes": len(png), "jpeg_bomb_bytes": len(jpeg)}
    for name, call in bombs.items():
        times, codes = [], set()
        for _ in range(reps):
            dt, code = await timed(call)
            times.append(dt)
            codes.add(code)
        out["bombs"][name] = {"status": sorted(codes), "median_ms": statistics.median(times) * 1e3,
                              "max_ms": max(times) * 1e3}
    under_fire = []
    for _ in range(reps):  # a bystander's small call while every kind of bomb is in flight
        flying = [asyncio.ensure_future(call()) for call in bombs.values()]
        under_fire.append((await timed(lambda: classifier.Classify(small)))[0])
        await asyncio.gather(*flying, return_exceptions=True)
    out["rss_growth_mb"] = _rss_mb() - rss0
    out["bystander_classify_ms"] = {"quiet_median": statistics.median(quiet) * 1e3,
                                    "under_bombs_median": statistics.median(under_fire) * 1e3,
                                    "under_bombs_max": max(under_fire) * 1e3}
    out["backend_predicts_meanwhile"] = backend.calls["predict"] - predicts0  # bombs: none; bystander: cached
    out["targets"] = {"refusal_ms_below": 1000, "rss_growth_mb_below": 50}
    await channel.close()
    await server.stop(0)
    return out


def run(reps: int = 10) -> dict:
    return asyncio.run(_run(reps))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_bombs")
    ap.add_argument("--out", default="reports/bench_bombs.json")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    emit(run(args.reps), args.out)


if __name__ == "__main__":
    main()
