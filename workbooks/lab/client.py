"""A black-box client of the sidecar: what an attacker (or any user) sees.

``SidecarPredictor`` implements the attacks' ``Predictor`` protocol over gRPC:
``predict(uint8 images (n, 32, 32, 3)) -> scores (n, num_classes)``, with every
call in the predictor's session (``x-session-id`` metadata and the request's
``session_id`` field). With ``batch=True`` a call is one ``ClassifyBatch`` (the
sidecar judges the images in order within the session); with ``batch=False`` it
is one unary ``Classify`` per image, and ``latencies`` gets one entry per image.

Only answers come back: label and scores (a one-hot vector when the sidecar's
output policy withholds scores). Whether an answer came from the cache is not
visible to clients; ``Metrics`` reads the sidecar's Prometheus counters for the
experiments' ground truth.
"""

from __future__ import annotations

import time
import uuid
import urllib.request
from typing import Iterable

import grpc
import numpy as np

from sidecar.api import classifier_pb2 as pb
from sidecar.images import encode_raw
from sidecar.api import classifier_pb2_grpc as pb_grpc

SESSION_HEADER = "x-session-id"
FORWARDS = "hashguard_forwards_total"
CACHE_ANSWERS = "hashguard_cache_answers_total"


def new_session_id(prefix: str = "lab") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def encode(image: np.ndarray) -> pb.Image:
    """A raw HWC image: uint8 when the values are whole numbers in 0..255, else float32."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        f = img.astype(np.float32)
        whole = np.all(f == np.round(f)) and f.min() >= 0 and f.max() <= 255
        img = f.astype(np.uint8) if whole else f
    return encode_raw(img)


def _scores(c: pb.Classification, num_classes: int | None) -> np.ndarray:
    if len(c.scores):
        return np.asarray(c.scores, dtype=np.float32)
    n = num_classes or max([c.label + 1, *[t.label + 1 for t in c.top_k]])
    out = np.zeros(n, np.float32)
    if len(c.top_k):
        for t in c.top_k:
            out[t.label] = t.score
    else:
        out[c.label] = 1.0
    return out


class SidecarPredictor:
    """gRPC predictor bound to one model and one session of a sidecar."""

    def __init__(self, target: str, model: str, session_id: str | None = None, batch: bool = True,
                 *, version: int = 0, timeout: float = 120.0, max_batch: int = 1000,
                 num_classes: int | None = 10, channel: grpc.Channel | None = None) -> None:
        self.target = target
        self.model = model
        self.session_id = session_id or new_session_id()
        self.batch = batch
        self.version = version
        self.timeout = timeout
        self.max_batch = max_batch
        self.num_classes = num_classes
        self._own_channel = channel is None
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self._channel = channel or grpc.insecure_channel(target, options=opts)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self.query_count = 0  # images classified
        self.call_count = 0  # RPCs
        self.latencies: list[float] = []  # seconds per RPC, as the client saw them
        self.last_labels: np.ndarray | None = None

    # -- sessions -------------------------------------------------------------
    def new_session(self, session_id: str | None = None) -> "SidecarPredictor":
        """A predictor on the same channel and model with a fresh session."""
        return SidecarPredictor(self.target, self.model, session_id, self.batch, version=self.version,
                                timeout=self.timeout, max_batch=self.max_batch,
                                num_classes=self.num_classes, channel=self._channel)

    @property
    def _metadata(self):
        return ((SESSION_HEADER, self.session_id),)

    @property
    def _ref(self) -> pb.ModelRef:
        return pb.ModelRef(name=self.model, version=self.version)

    # -- calls ----------------------------------------------------------------
    def classify(self, image: np.ndarray) -> tuple[int, np.ndarray, float]:
        """One unary Classify: (label, scores, client-side latency in seconds)."""
        req = pb.ClassifyRequest(model=self._ref, image=encode(image), session_id=self.session_id)
        t0 = time.perf_counter()
        resp = self._stub.Classify(req, timeout=self.timeout, metadata=self._metadata)
        dt = time.perf_counter() - t0
        self.latencies.append(dt)
        self.call_count += 1
        self.query_count += 1
        return int(resp.result.label), _scores(resp.result, self.num_classes), dt

    def _batch(self, images: np.ndarray) -> list[pb.Classification]:
        req = pb.ClassifyBatchRequest(model=self._ref, images=[encode(im) for im in images],
                                      session_id=self.session_id)
        t0 = time.perf_counter()
        resp = self._stub.ClassifyBatch(req, timeout=self.timeout, metadata=self._metadata)
        self.latencies.append(time.perf_counter() - t0)
        self.call_count += 1
        self.query_count += len(images)
        if len(resp.results) != len(images):
            raise RuntimeError(f"sidecar answered {len(resp.results)} of {len(images)} images")
        return list(resp.results)

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if self.batch:
            results: list[pb.Classification] = []
            for i in range(0, len(images), self.max_batch):
                results.extend(self._batch(images[i:i + self.max_batch]))
            rows = [_scores(c, self.num_classes) for c in results]
            labels = [c.label for c in results]
        else:
            rows, labels = [], []
            for im in images:
                label, s, _ = self.classify(im)
                rows.append(s)
                labels.append(label)
        self.last_labels = np.asarray(labels, dtype=np.int64)
        return np.stack(rows) if rows else np.zeros((0, self.num_classes or 0), np.float32)

    def labels(self, images: np.ndarray) -> np.ndarray:
        """The sidecar's labels (not argmax of scores) for ``images``."""
        self.predict(images)
        return self.last_labels

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> "SidecarPredictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- health and metrics -------------------------------------------------------

def health_status(target: str, service: str = "", timeout: float = 2.0) -> str:
    """The gRPC health status name of ``target`` ("SERVING", ...), or "UNREACHABLE"."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(sample name, frozenset(labels.items())): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


class Metrics:
    """Scrapes a sidecar's ``/metrics`` and sums counters over matching labels."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url if url.endswith("/metrics") else url.rstrip("/") + "/metrics"
        self.timeout = timeout

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(self.url, timeout=self.timeout) as r:
            return parse_metrics(r.read().decode())

    @staticmethod
    def total(samples: dict, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))

    def counters(self, names: Iterable[str] = (FORWARDS, CACHE_ANSWERS), **labels: str) -> dict[str, float]:
        samples = self.scrape()
        return {n: self.total(samples, n, **labels) for n in names}
