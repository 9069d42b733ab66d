"""A hostile client against real processes (issue 25): the REST front door,
decoding, connections and metric labels.

A ``python -m sidecar`` process in front of a fake TF Serving process
(``sidecar.testing.FakeServing``: model "m" 32x32x3, model "dyn" any size),
both on loopback. While every hostile case runs, this process

* probes the sidecar's gRPC health every 10 ms from a thread: the longest
  health answer during a case bounds how long the sidecar's event loop stalled
  (health is served by that loop);
* samples the sidecar's resident memory (``/proc/<pid>/status``) every 10 ms:
  the peak over the corpus against the idle RSS after warm-up.

Phases: ``corpus`` (each case ``reps`` times: status and time to status),
``concurrent`` (8 PNG bombs at once and a normal request beside them),
``large_valid`` (for reference, a valid 1024-image JSON body: what parsing
costs the loop), ``deadlines`` (1 ms deadlines: client-side DEADLINE_EXCEEDED, counted errors,
forwards), ``labels`` (/metrics size after N requests for distinct unknown
model names, over gRPC and REST), ``connections`` (N idle TCP connections to
the REST port, held by helper processes, then new REST and gRPC clients; and
the same against the gRPC port; ``grpc_lockout``: the gRPC port with a
handshake timeout longer than the run, so only its connection cap acts). Figures are measured at run time.

``python -m benchmarks.bench_hostile [--out reports/bench_hostile.json]
[--idle 20000] [--names 10000] [--reps 3] [--phases corpus ...]``, or
``python -m benchmarks --only hostile``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import badinput as bad  # noqa: E402
from benchmarks.stats import emit  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- processes


def _serve_fake(port: int) -> None:
    from sidecar.testing import FakeBackend, FakeModel, FakeServing

    async def main():
        fake = FakeBackend({"m": FakeModel(), "dyn": FakeModel(image_shape=(None, None, 3))})
        serving = await FakeServing(fake).start(port)
        print("ready", flush=True)

        def answer_counts():  # each line on stdin: the images that reached the model so far
            for _ in sys.stdin:
                print(json.dumps({"predicts": fake.calls["predict"], "images": fake.images}), flush=True)

        threading.Thread(target=answer_counts, daemon=True).start()
        await asyncio.Event().wait()
        await serving.stop()

    asyncio.run(main())


def _hold_idle(port: int, n: int) -> None:
    """Open ``n`` TCP connections to ``port`` and hold them, sending nothing; report
    how many opened and, on stdin EOF, how many the server has closed meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, failed = [], 0
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    print(json.dumps({"opened": len(socks), "failed": failed}), flush=True)
    sys.stdin.readline()
    closed = 0
    for s in socks:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print(json.dumps({"closed_by_server": closed}), flush=True)


class Sidecar:
    def __init__(self, **flags) -> None:
        self.fake_port, self.port, self.rest, self.metrics = free_port(), free_port(), free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.fake = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_hostile", "--serve-fake",
                                      str(self.fake_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)
        assert self.fake.stdout.readline().strip() == "ready"
        args = [sys.executable, "-m", "sidecar", f"--backend=127.0.0.1:{self.fake_port}", "--host=127.0.0.1",
                f"--port={self.port}", f"--rest-port={self.rest}", f"--metrics-port={self.metrics}",
                "--padding=off", "--log-level=WARNING"] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.health_req = health_pb2.HealthCheckRequest()
        self.health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.health.Check(self.health_req, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                time.sleep(0.1)
        else:
            raise RuntimeError("sidecar did not become SERVING: " + self.proc.stderr.read()[-2000:])

    def model_images(self) -> int:
        """Images that reached the (fake) model: counted by the model process itself."""
        self.fake.stdin.write("\n")
        self.fake.stdin.flush()
        return json.loads(self.fake.stdout.readline())["images"]

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def metrics_text(self) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics, timeout=30)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read()
        conn.close()
        return body

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for line in self.metrics_text().decode().splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> str:
        self.channel.close()
        self.proc.terminate()
        err = self.proc.communicate(timeout=30)[1]  # the sidecar first, then its backend
        self.fake.terminate()
        self.fake.communicate(timeout=30)
        return err


class Probe:
    """Health latency every ``period`` s and RSS every ``period`` s, from threads."""

    def __init__(self, sidecar: Sidecar, period: float = 0.01) -> None:
        self.sidecar, self.period = sidecar, period
        self.health: list[tuple[float, float, bool]] = []  # (start, latency, ok)
        self.rss: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._health, daemon=True),
                         threading.Thread(target=self._rss, daemon=True)]
        for t in self._threads:
            t.start()

    def _health(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                ok = self.sidecar.health.Check(self.sidecar.health_req, timeout=10).status == 1
            except grpc.RpcError:
                ok = False
            self.health.append((t0, time.monotonic() - t0, ok))
            time.sleep(self.period)

    def _rss(self) -> None:
        while not self._stop.is_set():
            self.rss.append((time.monotonic(), self.sidecar.rss_mb()))
            time.sleep(self.period)

    def window(self, t0: float, t1: float) -> dict:
        lat = [(lt, ok) for s, lt, ok in self.health if s + lt >= t0 and s <= t1]
        rss = [r for t, r in self.rss if t0 <= t <= t1]
        return {"health_max_ms": round(max(lt for lt, _ in lat) * 1e3, 1) if lat else None,
                "health_probes": len(lat), "health_failed": sum(1 for _, ok in lat if not ok),
                "rss_peak_mb": round(max(rss), 1) if rss else None}

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


# ----------------------------------------------------------------------------- requests


def rest(sidecar: Sidecar, method: str, path: str, body: bytes = b"", headers: dict | None = None,
         timeout: float = 60) -> tuple[int, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.rest, timeout=timeout)
    conn.request(method, path, body=body, headers={"X-Session-Id": "attacker", **(headers or {})})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.monotonic() - t0


def grpc_call(fn, req, timeout: float = 60, **kw) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        fn(req, timeout=timeout, **kw)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    return code, time.monotonic() - t0


def _stubs(sidecar: Sidecar):
    from sidecar.api import classifier_pb2_grpc as pb_grpc
    from sidecar.wire.tfapi import prediction_service_pb2_grpc

    return pb_grpc.ClassifierStub(sidecar.channel), prediction_service_pb2_grpc.PredictionServiceStub(sidecar.channel)


def _classify(model: str, data: bytes | None = None, raw: np.ndarray | None = None, session: str = "attacker"):
    from sidecar.api import classifier_pb2 as pb
    from sidecar.wire.images import encode_raw

    image = pb.Image(encoded=data) if data is not None else encode_raw(raw)
    return pb.ClassifyRequest(model=pb.ModelRef(name=model), image=image, session_id=session)


def _metadata(name: str):
    from sidecar.wire.tfapi import get_model_metadata_pb2

    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = name
    return req


def _predict(name: str, img: np.ndarray):
    from sidecar.wire.tensors import to_proto
    from sidecar.wire.tfapi import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.inputs["image"].CopyFrom(to_proto(img[None].astype(np.float32)))
    return req


def cases(sidecar: Sidecar, max_message: int) -> dict:
    classifier, predict = _stubs(sidecar)
    rows = json.dumps(np.zeros((32, 32, 3), np.uint8).tolist()).encode()
    tiny = b"[[[0]]]"
    at_limit = (max_message - 20) // (len(tiny) + 1)
    idat = bad.png_idat_bomb(32, 32, 1 << 30)
    long = "x" * 8000

    def instances(n: int) -> bytes:
        return b'{"instances": [' + b",".join([tiny] * n) + b"]}"

    bodies = {
        "rest_1e6_tiny_instances": instances(10**6),
        "rest_tiny_instances_at_body_limit": instances(at_limit),
        "rest_gzip_bomb_1MiB_to_1GiB": bad.gzip_bomb(1 << 30),
        "rest_deflate_bomb_to_1GiB": bad.zeros_zlib(1 << 30),
        "rest_b64_png_32x32_idat_1GiB": json.dumps({"instances": [{"b64": base64.b64encode(idat).decode()}]}).encode(),
        "rest_json_nested_5000": b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "rest_5000_digit_integer": b'{"instances": [[[[' + b"9" * 5000 + b"]]]]}",
        "rest_1e400": b'{"instances": [[[[1e400]]]]}',
        "rest_model_name_8000": b'{"instances": [' + rows + b"]}",
    }
    out = {name: ("POST", "/v1/models/m:predict", body, {}) for name, body in bodies.items()}
    out["rest_gzip_bomb_1MiB_to_1GiB"] = ("POST", "/v1/models/m:predict", bodies["rest_gzip_bomb_1MiB_to_1GiB"],
                                          {"Content-Encoding": "gzip"})
    out["rest_deflate_bomb_to_1GiB"] = ("POST", "/v1/models/m:predict", bodies["rest_deflate_bomb_to_1GiB"],
                                        {"Content-Encoding": "deflate"})
    out["rest_model_name_8000"] = ("POST", f"/v1/models/{long}:predict", bodies["rest_model_name_8000"], {})
    grpc_cases = {
        "grpc_png_32x32_idat_1GiB": (classifier.Classify, _classify("m", idat)),
        "grpc_dyn_png_32x32_idat_1GiB": (classifier.Classify, _classify("dyn", idat)),
        "grpc_model_name_8000_classify": (classifier.Classify, _classify(long, raw=np.zeros((32, 32, 3), np.uint8))),
        "grpc_model_name_8000_predict": (predict.Predict, _predict(long, np.zeros((32, 32, 3), np.uint8))),
        "grpc_model_name_8000_metadata": (predict.GetModelMetadata, _metadata(long)),
    }
    return {"rest": out, "grpc": grpc_cases, "sizes": {k: len(v) for k, v in bodies.items()} | {"png_idat_bomb": len(idat)}}


# ----------------------------------------------------------------------------- phases


def phase_corpus(sidecar: Sidecar, probe: Probe, reps: int, max_message: int) -> dict:
    corpus = cases(sidecar, max_message)
    result = {"body_bytes": corpus["sizes"], "cases": {}}
    for name, (method, path, body, headers) in corpus["rest"].items():
        t0 = time.monotonic()
        runs = [rest(sidecar, method, path, body, headers) for _ in range(reps)]
        result["cases"][name] = {"status": sorted({s for s, _ in runs}),
                                 "time_to_status_max_ms": round(max(t for _, t in runs) * 1e3, 1),
                                 **probe.window(t0, time.monotonic())}
    for name, (fn, req) in corpus["grpc"].items():
        t0 = time.monotonic()
        runs = [grpc_call(fn, req) for _ in range(reps)]
        result["cases"][name] = {"status": sorted({s for s, _ in runs}),
                                 "time_to_status_max_ms": round(max(t for _, t in runs) * 1e3, 1),
                                 **probe.window(t0, time.monotonic())}
    return result


def phase_concurrent(sidecar: Sidecar, probe: Probe) -> dict:
    classifier, _ = _stubs(sidecar)
    idat = _classify("m", bad.png_idat_bomb(32, 32, 1 << 30))
    normal = _classify("m", bad.png(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                       session="bystander")
    grpc_call(classifier.Classify, normal)  # the bystander's anchor
    t0 = time.monotonic()
    futures = [classifier.Classify.future(idat, timeout=60) for _ in range(8)]
    code, dt = grpc_call(classifier.Classify, normal)
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    return {"png_idat_bombs_at_once": 8, "bomb_status": sorted(set(codes)), "bystander_status": code,
            "bystander_ms": round(dt * 1e3, 1), **probe.window(t0, time.monotonic())}


def phase_large_valid(sidecar: Sidecar, probe: Probe, reps: int) -> dict:
    """Not hostile, for reference: a VALID row-format body of 1024 32x32x3 images (about
    12 MiB of pixel lists), which is parsed by json.loads on the event loop."""
    imgs = np.random.default_rng(5).integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)
    body = json.dumps({"instances": imgs.tolist()}).encode()
    t0 = time.monotonic()
    runs = [rest(sidecar, "POST", "/v1/models/m:predict", body) for _ in range(reps)]
    return {"body_bytes": len(body), "status": sorted({st for st, _ in runs}),
            "time_to_answer_max_ms": round(max(t for _, t in runs) * 1e3, 1), **probe.window(t0, time.monotonic())}


def phase_deadlines(sidecar: Sidecar, n: int = 300) -> dict:
    classifier, _ = _stubs(sidecar)
    rng = np.random.default_rng(7)
    errors0 = sidecar.metric("hashguard_errors_total", method="Classify", code="DEADLINE_EXCEEDED")
    forwards0 = sidecar.metric("hashguard_forwards_total")
    model0 = sidecar.model_images()
    codes: dict[str, int] = {}
    for i in range(n):
        req = _classify("m", raw=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), session=f"d{i % 8}")
        code, _ = grpc_call(classifier.Classify, req, timeout=0.001)
        codes[code] = codes.get(code, 0) + 1
    time.sleep(1.0)
    return {"calls": n, "client_codes": codes,
            "counted_deadline_exceeded": sidecar.metric("hashguard_errors_total", method="Classify",
                                                        code="DEADLINE_EXCEEDED") - errors0,
            "forwards_counted_by_sidecar": sidecar.metric("hashguard_forwards_total") - forwards0,
            "images_that_reached_the_model": sidecar.model_images() - model0}


def phase_labels(sidecar: Sidecar, names: int) -> dict:
    classifier, predict = _stubs(sidecar)
    before = len(sidecar.metrics_text())
    img = np.zeros((32, 32, 3), np.uint8)
    for i in range(names):
        name = f"made-up-model-{i}"
        if i % 4 == 0:
            rest(sidecar, "GET", f"/v1/models/{name}")
        elif i % 4 == 1:
            rest(sidecar, "GET", f"/v1/models/{name}/metadata")
        elif i % 4 == 2:
            grpc_call(predict.GetModelMetadata, _metadata(name))
        else:
            grpc_call(classifier.Classify, _classify(name, raw=img))
    return {"distinct_unknown_names": names, "metrics_bytes_before": before,
            "metrics_bytes_after": len(sidecar.metrics_text()), "rss_mb_after": round(sidecar.rss_mb(), 1)}


def phase_connections(sidecar: Sidecar, idle: int, port_kind: str) -> dict:
    """``idle`` connections to the REST (or gRPC) port from helper processes, each
    under its own descriptor limit; then a new REST and a new gRPC client."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = sidecar.rest if port_kind == "rest" else sidecar.port
    per = 6000
    helpers = []
    opened = failed = 0
    fds0 = sidecar.fds()
    t0 = time.monotonic()
    for k in range(0, idle, per):
        p = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_hostile", "--hold-idle", str(port),
                              str(min(per, idle - k))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        report = json.loads(p.stdout.readline())
        opened += report["opened"]
        failed += report["failed"]
        helpers.append(p)
    opening_s = time.monotonic() - t0
    fds_held = sidecar.fds()
    new = {}
    status, dt = rest(sidecar, "GET", "/v1/models/m", timeout=30)
    new["rest_status"] = {"status": status, "ms": round(dt * 1e3, 1)}
    classifier, _ = _stubs(sidecar)
    t1 = time.monotonic()
    tries = []
    while True:  # a fresh channel (a new connection) each try, until served or 60 s
        ch = grpc.insecure_channel(f"127.0.0.1:{sidecar.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            tries.append(health_pb2.HealthCheckResponse.ServingStatus.Name(h.status))
        except grpc.RpcError as exc:
            tries.append(exc.code().name)
        ch.close()
        if tries[-1] == "SERVING" or time.monotonic() - t1 > 60:
            break
        time.sleep(1.0)
    new["grpc_new_channel_health"] = {"first_status": tries[0], "tries": len(tries), "last_status": tries[-1],
                                      "s_until_last": round(time.monotonic() - t1, 1)}
    closed = 0
    for p in helpers:
        p.stdin.write("\n")
        p.stdin.flush()
        closed += json.loads(p.stdout.readline())["closed_by_server"]
        p.wait(timeout=60)
    return {"port": port_kind, "idle_requested": idle, "opened": opened, "connect_failed": failed,
            "opening_s": round(opening_s, 1), "sidecar_fds_before": fds0, "sidecar_fds_while_held": fds_held,
            "closed_by_server_when_checked": closed, "new_clients": new}


def run(reps: int = 3, idle: int = 20000, names: int = 10000, phases: list[str] | None = None) -> dict:
    phases = phases or ["corpus", "concurrent", "deadlines", "labels", "connections"]
    max_message = 16 << 20
    sidecar = Sidecar()
    out: dict = {"sidecar_pid_nofile": None}
    try:
        with open(f"/proc/{sidecar.proc.pid}/limits") as f:
            out["sidecar_pid_nofile"] = next(line.split()[3:5] for line in f if line.startswith("Max open files"))
        out["this_process_nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
        classifier, predict = _stubs(sidecar)
        warm = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for _ in range(3):  # warm-up: one good call on every path
            rest(sidecar, "POST", "/v1/models/m:predict", json.dumps({"instances": [warm.tolist()]}).encode())
            grpc_call(classifier.Classify, _classify("m", bad.png(warm)))
            grpc_call(predict.Predict, _predict("m", warm))
        probe = Probe(sidecar)
        time.sleep(1.0)
        t_idle = time.monotonic()
        out["idle"] = probe.window(t_idle - 1.0, t_idle)
        out["idle_rss_mb"] = round(sidecar.rss_mb(), 1)
        if "corpus" in phases:
            t0 = time.monotonic()
            out["corpus"] = phase_corpus(sidecar, probe, reps, max_message)
            out["corpus"]["whole"] = probe.window(t0, time.monotonic())
        if "concurrent" in phases:
            out["concurrent"] = phase_concurrent(sidecar, probe)
        if "large_valid" in phases:
            out["large_valid"] = phase_large_valid(sidecar, probe, reps)
        probe.stop()
        out["rss_mb_after_corpus"] = round(sidecar.rss_mb(), 1)
        if "deadlines" in phases:
            out["deadlines"] = phase_deadlines(sidecar)
        if "labels" in phases:
            out["labels"] = phase_labels(sidecar, names)
    finally:
        err = sidecar.stop()
    runs = []
    if "connections" in phases:  # REST port: idle timeout far above the run, so only the cap acts
        runs += [("rest", {"http_idle_timeout_s": 600}), ("grpc", {})]
    if "grpc_lockout" in phases:  # gRPC port with a handshake timeout far above the run: the cap alone
        runs += [("grpc", {"http_idle_timeout_s": 600})]
    if runs:
        out["connections"] = []
        for port_kind, flags in runs:
            sc = Sidecar(**flags)
            try:
                out["connections"].append({"flags": flags, **phase_connections(sc, idle, port_kind)})
            finally:
                err += sc.stop()
    out["sidecar_stderr_tracebacks"] = err.count("Traceback")
    if err.count("Traceback"):
        out["sidecar_stderr_first_traceback"] = err[err.index("Traceback"):][:3000]
    out["targets"] = {"time_to_status_ms_below": 500, "health_max_ms_below": 100, "rss_over_idle_mb_below": 50,
                      "metrics_bytes_below": 100_000}
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-fake":
        return _serve_fake(int(sys.argv[2]))
    if len(sys.argv) > 3 and sys.argv[1] == "--hold-idle":
        return _hold_idle(int(sys.argv[2]), int(sys.argv[3]))
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_hostile")
    ap.add_argument("--out", default="reports/bench_hostile.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle", type=int, default=20000)
    ap.add_argument("--names", type=int, default=10000)
    ap.add_argument("--phases", nargs="*")
    args = ap.parse_args()
    emit(run(args.reps, args.idle, args.names, args.phases), args.out)


if __name__ == "__main__":
    main()
