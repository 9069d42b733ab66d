"""Test helpers: the real SidecarServer over real gRPC on loopback, in front of the
session's ``python -m serving`` (the ``backend`` fixture in conftest.py)."""

from __future__ import annotations

import grpc
import numpy as np

from sidecar.api import classifier_pb2 as pb
from sidecar.config import Settings
from sidecar.server import SidecarServer
from sidecar.wire.messages import encode_raw
from sidecar.wire.tensors import to_ndarray, to_proto
from sidecar.wire.tfapi import predict_pb2, prediction_service_pb2_grpc


def perturb(img: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Change k distinct pixels to random colours (a k-pixel attack's query)."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    flat = rng.choice(img.shape[0] * img.shape[1], size=k, replace=False)
    for f in flat:
        y, x = divmod(int(f), img.shape[1])
        new = rng.integers(0, 256, 3, dtype=np.uint8)
        while (new == out[y, x]).all():
            new = rng.integers(0, 256, 3, dtype=np.uint8)
        out[y, x] = new
    return out


async def start_sidecar(target: str, **kw) -> SidecarServer:
    kw.setdefault("padding", "off")
    kw.setdefault("score_noise", 0.0)  # exact scores, so answers can be compared with the model's
    kw.setdefault("score_precision", 0)
    kw.setdefault("rest_port", 0)
    settings = Settings(backend=target, host="127.0.0.1", port=0, metrics_port=0, **kw)
    server = SidecarServer(settings)
    await server.start()
    return server


def channel(server: SidecarServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


def classify_req(img, session="attacker", model="tiny", **kw) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=pb.ModelRef(name=model, **kw), image=encode_raw(img), session_id=session)


class BackendCounter:
    """Counts real calls from the sidecar to the backend's Predict."""

    def __init__(self, server: SidecarServer):
        self.calls = 0
        self.images = 0
        backend = server.plane.backend
        original = backend.predict

        async def counted(key, batch):
            self.calls += 1
            self.images += len(batch)
            return await original(key, batch)

        backend.predict = counted


def direct_scores(target: str, images: np.ndarray, model="tiny") -> np.ndarray:
    with grpc.insecure_channel(target) as ch:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model
        req.inputs["image"].CopyFrom(to_proto(images.astype(np.float32)))
        return to_ndarray(prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(req, timeout=30).outputs["scores"])
