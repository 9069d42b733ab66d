"""Benchmark ``serving`` against calling the SavedModel in-process.

``run(model_base, model_name, n)`` starts ``python -m serving`` on loopback (its
own process, as in production), then measures with a stock
``PredictionServiceStub``:

- sequential Predict latency (p50/p99/mean ms) and throughput (req/s, images/s)
  for batch 1 and batch 64; each timed call includes the client's
  ``tf.make_tensor_proto`` and ``tf.make_ndarray``, i.e. what a user pays;
- the same for the in-process ``signatures['serving_default']`` call (with its
  numpy -> tensor -> numpy conversions);
- ``overhead_ratio`` = serving p50 / in-process p50 per batch size;
- batch-1 throughput with ``clients`` concurrent callers (dynamic batching at work).

``python -m benchmarks.bench_serving --model_base models/cnn --model cnn --out reports/serving.json``
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from benchmarks.stats import emit

BATCHES = (1, 64)
REPO = Path(__file__).resolve().parents[1]


def _has_versions(path: Path) -> bool:
    return path.is_dir() and any(p.name.isdigit() and (p / "saved_model.pb").exists() for p in path.iterdir())


def resolve_base_path(model_base: Path, model_name: str) -> Path:
    """Accept either the model's base path (``models/cnn``) or its parent (``models``)."""
    model_base = Path(model_base)
    for cand in (model_base, model_base / model_name):
        if _has_versions(cand):
            return cand.resolve()
    raise FileNotFoundError(f"no <version>/saved_model.pb under {model_base} or {model_base / model_name}")


def _images(count: int) -> tuple[np.ndarray, str]:
    try:
        from lab.cifar10 import load_cifar10

        x = load_cifar10().x_test[:count]
        if len(x) >= count:
            return np.asarray(x, np.float32), "cifar10"
    except Exception:
        pass
    return np.random.RandomState(0).uniform(0, 255, (count, 32, 32, 3)).astype(np.float32), "random"


def _summary(seconds: list[float], batch: int) -> dict:
    a = np.asarray(seconds, np.float64)
    mean = float(a.mean())
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50) * 1e3),
            "p99_ms": float(np.percentile(a, 99) * 1e3), "mean_ms": mean * 1e3,
            "req_per_s": 1.0 / mean, "images_per_s": batch / mean}


def _time(fn, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(model_base: Path, model_name: str, n: int = 300, clients: int = 8, extra_args: tuple[str, ...] = ()) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    base = resolve_base_path(Path(model_base), model_name)
    version = max(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists())
    x_all, source = _images(max(BATCHES))
    warmup = max(5, n // 20)
    result: dict = {"model": model_name, "model_base_path": str(base), "version": version, "n": n,
                    "images": source, "timing": "client-side, incl. make_tensor_proto + make_ndarray",
                    "serving": {}, "in_process": {}, "overhead_ratio": {}}

    # -- serving, in its own process on loopback (the lab's launcher)
    from lab.launcher import Serving

    log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    server = Serving(base.parent, {model_name: base}, log_dir, args=extra_args).start()
    target = server.address
    try:
        with grpc.insecure_channel(target) as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)

            def predict(x: np.ndarray) -> np.ndarray:
                req = predict_pb2.PredictRequest()
                req.model_spec.name = model_name
                req.inputs["image"].CopyFrom(tf.make_tensor_proto(x))
                return tf.make_ndarray(stub.Predict(req, timeout=60).outputs["scores"])

            for b in BATCHES:
                x = x_all[:b]
                result["serving"][f"batch_{b}"] = _summary(_time(lambda: predict(x), n, warmup), b)

            x1 = x_all[:1]
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda _: predict(x1), range(warmup * clients)))
                t0 = time.perf_counter()
                list(pool.map(lambda _: predict(x1), range(n)))
                dt = time.perf_counter() - t0
            result["serving_concurrent"] = {"clients": clients, "batch": 1, "requests": n,
                                            "req_per_s": n / dt, "images_per_s": n / dt}
    finally:
        server.stop()
        shutil.rmtree(log_dir, ignore_errors=True)

    # -- in-process SavedModel call, same inputs (server process is gone: no CPU sharing)
    fn = tf.saved_model.load(str(base / str(version))).signatures["serving_default"]
    for b in BATCHES:
        x = x_all[:b]
        summ = _summary(_time(lambda: fn(image=tf.constant(x))["scores"].numpy(), n, warmup), b)
        result["in_process"][f"batch_{b}"] = summ
        result["overhead_ratio"][f"batch_{b}"] = result["serving"][f"batch_{b}"]["p50_ms"] / summ["p50_ms"]
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_base", required=True, help="model base path (models/cnn) or its parent (models)")
    ap.add_argument("--model", required=True, help="model name")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    res = run(Path(args.model_base), args.model, args.n, args.clients)
    emit(res, args.out)


if __name__ == "__main__":
    main()
