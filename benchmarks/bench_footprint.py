"""What a sidecar process costs: idle memory and the time from start to SERVING.

Starts ``python -m sidecar --backend 127.0.0.1:<port>`` as a subprocess in front
of a tiny fake TF Serving (a gRPC PredictionService in its own process, built
on the sidecar's own TF Serving stubs: no TensorFlow anywhere), and measures

* ``start_to_serving_s``: from just before the process is spawned to the first
  gRPC health answer SERVING (health turns SERVING once the backend channel is
  READY, so a reachable backend is part of it); ``start_to_first_health_s``:
  to the first health answer of any status;
* ``idle_rss_mb``: resident memory after SERVING and a short idle pause, and
  ``warm_rss_mb`` after a few Classify calls went through to the backend;
* whether any TensorFlow module or library is mapped into the process.

Each figure is printed and written beside its target (issue 12) as a ratio.

    python -m benchmarks.bench_footprint [--starts 3]
    python -m benchmarks --only footprint
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from benchmarks.stats import emit

TARGETS = {"idle_rss_mb": 100.0, "start_to_serving_s": 1.5}
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _maps_tensorflow(pid: int) -> bool:
    return "site-packages/tensorflow" in Path(f"/proc/{pid}/maps").read_text()  # libtensorflow*, _pywrap_*


# --- the fake backend ------------------------------------------------------------------------------


async def _serve_fake(port: int) -> None:
    import grpc
    import numpy as np

    from sidecar.wire.tensors import to_ndarray, to_proto
    from sidecar.wire.tfapi import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

    class FakeServing(prediction_service_pb2_grpc.PredictionServiceServicer):
        async def GetModelMetadata(self, request, context):  # noqa: N802
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            sig = sig_map.signature_def["serving_default"]
            sig.inputs["image"].dtype = 1  # DT_FLOAT
            for d in (-1, 32, 32, 3):
                sig.inputs["image"].tensor_shape.dim.add(size=d)
            sig.outputs["scores"].dtype = 1
            for d in (-1, 10):
                sig.outputs["scores"].tensor_shape.dim.add(size=d)
            resp = get_model_metadata_pb2.GetModelMetadataResponse()
            resp.model_spec.name = request.model_spec.name
            resp.model_spec.version.value = 1
            resp.metadata["signature_def"].Pack(sig_map)
            return resp

        async def Predict(self, request, context):  # noqa: N802
            x = to_ndarray(request.inputs["image"], "image")
            logits = x.reshape(len(x), -1)[:, :10].astype(np.float64)
            scores = np.exp(logits - logits.max(axis=1, keepdims=True))
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name = request.model_spec.name
            resp.model_spec.version.value = 1
            resp.outputs["scores"].CopyFrom(to_proto((scores / scores.sum(axis=1, keepdims=True)).astype(np.float32)))
            return resp

    server = grpc.aio.server()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(FakeServing(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# --- the measurement -------------------------------------------------------------------------------


def _health(port: int, timeout_s: float = 0.2):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        except grpc.RpcError:
            return None


def _classify(port: int, n: int) -> int:
    import grpc
    import numpy as np

    from sidecar.api import classifier_pb2 as pb
    from sidecar.api import classifier_pb2_grpc as pb_grpc
    from sidecar.wire.messages import encode_raw

    rng = np.random.default_rng(0)
    ok = 0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for i in range(n):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name="cnn"), image=encode_raw(img)),
                          metadata=[("x-session-id", f"bench-{i}")], timeout=10)
            ok += 1
    return ok


def measure_once(backend_port: int, idle_s: float = 1.0, deadline_s: float = 30.0) -> dict:
    from grpc_health.v1 import health_pb2

    port, rest, metrics = _free_port(), _free_port(), _free_port()
    cmd = [sys.executable, "-m", "sidecar", "--backend", f"127.0.0.1:{backend_port}", "--port", str(port),
           "--rest-port", str(rest), "--metrics-port", str(metrics), "--padding", "off", "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = serving = None
    try:
        while time.perf_counter() - t0 < deadline_s:
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            status = _health(port)
            now = time.perf_counter() - t0
            if status is not None and first is None:
                first = now
            if status == health_pb2.HealthCheckResponse.SERVING:
                serving = now
                break
            time.sleep(0.01)
        if serving is None:
            raise RuntimeError(f"sidecar not SERVING within {deadline_s} s")
        time.sleep(idle_s)
        idle = _rss_mb(proc.pid)
        tf_idle = _maps_tensorflow(proc.pid)
        answered = _classify(port, 20)
        time.sleep(0.2)
        return {"start_to_first_health_s": round(first, 3), "start_to_serving_s": round(serving, 3),
                "idle_rss_mb": round(idle, 1), "warm_rss_mb": round(_rss_mb(proc.pid), 1),
                "classify_answered": answered, "tensorflow_mapped": tf_idle or _maps_tensorflow(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _import_seconds() -> float:
    out = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import sidecar.server; "
                          "print(time.perf_counter() - t)"], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return float(out.stdout.strip())


def run(starts: int = 3) -> dict:
    backend_port = _free_port()
    fake = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_footprint", "--serve-fake", str(backend_port)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    try:
        if fake.stdout.readline().strip() != b"ready":
            raise RuntimeError("fake backend did not start")
        runs = [measure_once(backend_port) for _ in range(starts)]
    finally:
        fake.terminate()
        fake.wait(10)
    out: dict = {"backend": "fake PredictionService (benchmarks/bench_footprint.py), separate process",
                 "starts": starts, "import_sidecar_server_s": round(_import_seconds(), 3), "runs": runs}
    for key in ("start_to_first_health_s", "start_to_serving_s", "idle_rss_mb", "warm_rss_mb"):
        values = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}
    for key, target in TARGETS.items():
        out[key]["target"] = target
        out[key]["median_over_target"] = round(out[key]["median"] / target, 3)
        out[key]["max_over_target"] = round(out[key]["max"] / target, 3)
    out["tensorflow_mapped"] = any(r["tensorflow_mapped"] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_footprint")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_fake:
        asyncio.run(_serve_fake(args.serve_fake))
        return
    result = run(args.starts)
    emit(result, args.out)


if __name__ == "__main__":
    main()
