"""Per-call cost of each front door over the same data plane: gRPC Classifier,
gRPC PredictionService, REST row format, REST b64 PNG. One sidecar process over
the official FakeBackend (no model time), padding off, every call in a fresh
session (so every call is judged AND forwarded). Client and server share the
process and loop, so absolute numbers include the client; the ratios to the
gRPC Classifier are the point. ``python -m benchmarks.bench_transports [--n 400]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import cv2
import grpc
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_sidecar import start_fake_sidecar  # noqa: E402
from sidecar.api import classifier_pb2 as pb  # noqa: E402
from sidecar.api import classifier_pb2_grpc as pb_grpc  # noqa: E402
from sidecar.wire.messages import encode_raw  # noqa: E402
from sidecar.wire.tensors import to_proto  # noqa: E402
from sidecar.wire.tfapi import predict_pb2, prediction_service_pb2_grpc  # noqa: E402


async def timed(n: int, one) -> dict:
    for i in range(20):
        await one(-1 - i)  # warm-up
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await one(i)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"p50_ms": 1e3 * lat[n // 2], "p99_ms": 1e3 * lat[int(n * 0.99)]}


async def main(n: int, out: str) -> None:
    server = await start_fake_sidecar(score_noise=0.2, score_precision=4)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = base64.b64encode(cv2.imencode(".png", img)[1].tobytes()).decode()
    rows = json.dumps({"instances": [img.tolist()]})
    url = f"http://127.0.0.1:{server.rest.port}/v1/models/m:predict"
    results = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch, httpx.AsyncClient() as http:
            classifier, prediction = pb_grpc.ClassifierStub(ch), prediction_service_pb2_grpc.PredictionServiceStub(ch)
            req = predict_pb2.PredictRequest()
            req.model_spec.name = "m"
            req.inputs["image"].CopyFrom(to_proto(img[None].astype(np.float32)))
            creq = pb.ClassifyRequest(model=pb.ModelRef(name="m"), image=encode_raw(img))
            cases = {
                "grpc_classifier": lambda i: classifier.Classify(creq, metadata=[("x-session-id", f"c{i}")]),
                "grpc_predict": lambda i: prediction.Predict(req, metadata=[("x-session-id", f"p{i}")]),
                "rest_row": lambda i: http.post(url, content=rows, headers={"X-Session-Id": f"r{i}"}),
                "rest_b64_png": lambda i: http.post(url, json={"instances": [{"b64": png}]},
                                                    headers={"X-Session-Id": f"b{i}"}),
            }
            for name, one in cases.items():
                results[name] = await timed(n, one)
    finally:
        await server.stop(0)
    base = results["grpc_classifier"]["p50_ms"]
    for r in results.values():
        r["p50_ratio_to_grpc_classifier"] = r["p50_ms"] / base
    print(json.dumps(results, indent=2))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"n": n, **results}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", default="reports/bench_transports.json")
    args = ap.parse_args()
    asyncio.run(main(args.n, args.out))
