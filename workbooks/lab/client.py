"""The one client every experiment uses: the sidecar's gRPC ``ClassifyBatch``.

``SidecarClient(address, model, session)`` sends uint8 or float32 HWC images
(n, 32, 32, 3) as one ``ClassifyBatch`` per call (chunked at ``max_batch``), in
its session (``session_id`` field and ``x-session-id`` metadata), and returns
the shown scores; ``last_labels`` holds the sidecar's own labels for that call
(a one-hot vector stands in for scores when the output policy hides them).
``queries`` counts images sent, ``calls`` RPCs, ``latencies`` seconds per RPC.
A call the sidecar refuses with ``RESOURCE_EXHAUSTED`` (hardened mode's budget of
near-duplicates across sessions) raises ``grpc.RpcError``; with ``refusals="answer"``
it is an answer instead: uniform scores and label -1 for each of its images, counted in
``refused``, so an attack goes on with no information.

Only answers come back: nothing tells a client whether an answer was cached
(``lab.counters`` reads that ground truth from the sidecar's /metrics).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import grpc
import numpy as np

from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.wire.messages import encode_raw

SESSION_HEADER = "x-session-id"
NUM_CLASSES = 10
_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def new_session_id(prefix: str = "lab") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def encode(image: np.ndarray) -> pb.Image:
    """A raw HWC image: uint8 when every value is a whole number in 0..255, else float32."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        f = img.astype(np.float32)
        whole = bool(np.all(f == np.round(f))) and f.min() >= 0 and f.max() <= 255
        img = f.astype(np.uint8) if whole else f
    return encode_raw(img)


def scores_of(c: pb.Classification, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The shown score vector; one-hot (or top-k scores) when the policy withholds scores."""
    if len(c.scores):
        return np.asarray(c.scores, dtype=np.float32)
    out = np.zeros(num_classes, np.float32)
    for t in c.top_k:
        out[t.label] = t.score
    if not len(c.top_k):
        out[c.label] = 1.0
    return out


def as_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    if images.ndim != 4:
        raise ValueError(f"expected images (n, h, w, c), got shape {images.shape}")
    return images


class SidecarClient:
    """One model and one session of a sidecar, over ``ClassifyBatch``."""

    def __init__(self, address: str, model: str, session: str | None = None, *, timeout: float = 120.0,
                 max_batch: int = 1000, num_classes: int = NUM_CLASSES, token: str | None = None,
                 channel: grpc.Channel | None = None, refusals: str = "raise") -> None:
        if refusals not in ("raise", "answer"):
            raise ValueError("refusals must be 'raise' or 'answer'")
        self.address, self.model, self.timeout, self.refusals = address, model, timeout, refusals
        self.session = session or new_session_id()
        self.max_batch, self.num_classes, self.token = max_batch, num_classes, token
        self._own = channel is None
        self._channel = channel or grpc.insecure_channel(address, options=_OPTIONS)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self.queries = 0
        self.calls = 0
        self.refused = 0
        self.latencies: list[float] = []
        self.last_labels: np.ndarray | None = None

    def with_session(self, session: str | None = None, token: str | None = None) -> "SidecarClient":
        """A client on the same channel with another session (or bearer token)."""
        return SidecarClient(self.address, self.model, session, timeout=self.timeout, max_batch=self.max_batch,
                             num_classes=self.num_classes, token=token, channel=self._channel,
                             refusals=self.refusals)

    def _metadata(self, session: str, token: str | None):
        md = [(SESSION_HEADER, session)]
        if token:
            md.append(("authorization", f"Bearer {token}"))
        return md

    def batch(self, images: np.ndarray, session: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One ClassifyBatch of ``images`` (at most ``max_batch``): (scores (n, k), labels (n,))."""
        session = session or self.session
        req = pb.ClassifyBatchRequest(model=pb.ModelRef(name=self.model), images=[encode(im) for im in images],
                                      session_id=session)
        t0 = time.perf_counter()
        self.calls += 1
        self.queries += len(images)
        try:
            resp = self._stub.ClassifyBatch(req, timeout=self.timeout, metadata=self._metadata(session, self.token))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or self.refusals == "raise":
                raise
            self.latencies.append(time.perf_counter() - t0)
            self.refused += len(images)
            return np.full((len(images), self.num_classes), 1.0 / self.num_classes, np.float32), \
                np.full(len(images), -1, np.int64)
        self.latencies.append(time.perf_counter() - t0)
        if len(resp.results) != len(images):
            raise RuntimeError(f"sidecar answered {len(resp.results)} of {len(images)} images")
        scores = np.stack([scores_of(c, self.num_classes) for c in resp.results]) if len(images) else \
            np.zeros((0, self.num_classes), np.float32)
        return scores, np.asarray([c.label for c in resp.results], np.int64)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Scores of ``images`` in this session, judged in order; labels in ``last_labels``."""
        images = as_batch(images)
        parts = [self.batch(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        if not parts:
            self.last_labels = np.zeros(0, np.int64)
            return np.zeros((0, self.num_classes), np.float32)
        self.last_labels = np.concatenate([p[1] for p in parts])
        return np.concatenate([p[0] for p in parts])

    def labels(self, images: np.ndarray) -> np.ndarray:
        self.predict(images)
        return self.last_labels

    def classify(self, image: np.ndarray) -> tuple[int, np.ndarray, float]:
        """One image as a batch of one: (label, scores, client-side latency in seconds)."""
        scores, labels = self.batch(as_batch(image))
        return int(labels[0]), scores[0], self.latencies[-1]

    def many(self, calls: Sequence[tuple[str, np.ndarray]], concurrency: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several ``(session, images)`` batches in flight at once; answers in call order."""
        if concurrency <= 1 or len(calls) <= 1:
            return [self.batch(im, s) for s, im in calls]
        with ThreadPoolExecutor(min(concurrency, len(calls))) as ex:
            return list(ex.map(lambda c: self.batch(c[1], c[0]), calls))

    def close(self) -> None:
        if self._own:
            self._channel.close()

    def __enter__(self) -> "SidecarClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalClient(SidecarClient):
    """The client's test double and offline stand-in: the same interface over a local
    ``fn(float32 images) -> scores`` (no sidecar, no cache); ``log`` records every
    ``(session, images)`` batch. Labels are the scores' argmax."""

    def __init__(self, fn, session: str | None = None, max_batch: int = 1000, num_classes: int = NUM_CLASSES) -> None:
        self.fn, self.model, self.address, self.timeout, self.token = fn, "local", "local", 0.0, None
        self.refusals = "answer"
        self.session, self.max_batch, self.num_classes = session or new_session_id("local"), max_batch, num_classes
        self.queries, self.calls, self.refused, self.latencies, self.last_labels, self.log = 0, 0, 0, [], None, []
        self._own = False

    def with_session(self, session: str | None = None, token: str | None = None) -> "LocalClient":
        return LocalClient(self.fn, session, self.max_batch, self.num_classes)

    def batch(self, images: np.ndarray, session: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, np.float32)
        t0 = time.perf_counter()
        scores = np.asarray(self.fn(images), np.float32).reshape(len(images), -1)
        self.latencies.append(time.perf_counter() - t0)
        self.log.append((session or self.session, images.copy()))
        self.calls += 1
        self.queries += len(images)
        return scores, scores.argmax(1).astype(np.int64)

    def close(self) -> None:
        pass


def health_status(target: str, service: str = "", timeout: float = 2.0) -> str:
    """The gRPC health status name of ``target`` ("SERVING", ...), or "UNREACHABLE"."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
