"""benchmarks/loadgen.py (the scale suite's load client) and the suite's scale-bound
arithmetic: the composed request bytes are the requests meant, every call is
recorded, and the bound follows from the per-call CPU figures. No timing asserted."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from benchmarks import loadgen
from sidecar.api import classifier_pb2 as pb

pytestmark = pytest.mark.timeout(120)

METHOD = "/hashguard.v1.Classifier/Classify"


class Recorder(grpc.GenericRpcHandler):
    """Parses every request as a ClassifyRequest; answers INVALID_ARGUMENT for session 'bad'."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()

    def service(self, details):
        if details.method != METHOD:
            return None

        def unary(raw: bytes, context):
            req = pb.ClassifyRequest.FromString(raw)
            with self.lock:
                self.seen.append((req.model.name, req.session_id, req.image))
            if req.session_id.endswith("bad"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
            return pb.ClassifyResponse().SerializeToString()

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=None, response_serializer=None)


@pytest.fixture
def server():
    rec = Recorder()
    srv = grpc.server(futures.ThreadPoolExecutor(8))
    srv.add_generic_rpc_handlers((rec,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield rec, f"127.0.0.1:{port}"
    srv.stop(0)


def test_clients_send_the_composed_requests_and_record_every_call(server):
    rec, target = server
    prefix = pb.ClassifyRequest(model=pb.ModelRef(name="cnn")).SerializeToString()
    images = [pb.Image(raw=pb.RawImage(pixels=bytes([i]) * 12, height=2, width=2, channels=3)) for i in range(3)]
    parts = [pb.ClassifyRequest(image=x).SerializeToString() for x in images]
    streams = [loadgen.Stream(prefix, [0, 1, 2, 1], pb.ClassifyRequest(session_id=f"s-{k}").SerializeToString())
               for k in range(3)]
    streams.append(loadgen.Stream(prefix, [0], pb.ClassifyRequest(session_id="s-bad").SerializeToString()))
    start = time.monotonic() + 4.0  # client processes import grpc first: generous on a loaded host
    jobs = [loadgen.Job(target, METHOD, parts, [streams[i] for i in ks], start, start + 0.6)
            for ks in loadgen.split(len(streams), 2)]
    clients = loadgen.Clients(jobs)
    assert len(clients.pids) == 2
    t0, t1, codes = clients.results()
    assert len(t0) == len(rec.seen) > 0  # one record per call the server saw
    assert (t1 >= t0).all() and (t0 >= start).all()
    names = set(loadgen.CODES[c] for c in codes)
    assert names == {"OK", "INVALID_ARGUMENT"}
    by_session: dict[str, list[bytes]] = {}
    for model, session, image in rec.seen:
        assert model == "cnn"
        by_session.setdefault(session, []).append(image)
    assert set(by_session) == {"s-0", "s-1", "s-2", "s-bad"}
    for k in range(3):  # each thread walks its steps in order, from the start
        got = by_session[f"s-{k}"]
        want = [images[i] for i in [0, 1, 2, 1] * (len(got) // 4 + 1)][: len(got)]
        assert got == want
    summary = loadgen.summarize(t0, t1, codes, start, start + 10)
    assert summary["calls"] == len(t0) and summary["codes"]["INVALID_ARGUMENT"] == len(by_session["s-bad"])


def test_split_deals_every_thread_once():
    assert loadgen.split(5, 2) == [[0, 2, 4], [1, 3]]
    assert loadgen.split(1, 3) == [[0]]


def test_scale_bound_arithmetic():
    from benchmarks.bench_scale import scale_bound

    one = {"sidecar_cpu_ms_per_call": 2.0, "throughput_rps": 400.0, "sidecar_cores": 0.8, "cores_ours": 1.0,
           "accounted_cpu_ms_per_call": 3.0}
    two = {"sidecar_cpu_ms_per_call": 2.0, "client_cpu_ms_per_call": 0.5, "model_server_cpu_ms_per_call": 1.0,
           "redis_cpu_ms_per_call": 0.5, "accounted_cpu_ms_per_call": 4.0, "throughput_rps": 480.0}
    b = scale_bound(one, two, cores=2)
    assert b["bound_2S_over_total"] == pytest.approx(1.0)       # 2 * 2.0 / 4.0
    assert b["capacity_2_workers_rps"] == pytest.approx(500.0)  # 2 cores / 4 ms
    assert b["measured_bound"] == pytest.approx(1.25)
    assert b["measured_ratio"] == pytest.approx(1.2)
    assert b["others_ms"] == pytest.approx(2.0)
    assert b["own_cores_ratio"] == pytest.approx(2.0)
    assert b["bound_dedicated_host"] == pytest.approx(1.0)     # (2 / 4.0) / min(1 / 2.0, 2 / 3.0)
    one["accounted_cpu_ms_per_call"] = 8.0                       # one worker limited by the others' CPU
    assert scale_bound(one, two, cores=2)["bound_dedicated_host"] == pytest.approx(2.0)
