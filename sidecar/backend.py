"""Client of the model backend: TensorFlow Serving's PredictionService over grpc.aio."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
from .tfapi import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from .errors import InvalidInput, NotFound, from_backend
from .tensors import to_ndarray, to_proto

DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class ModelKey:
    name: str
    version: int = 0  # 0: the backend's default (highest)
    signature: str = DEFAULT_SIGNATURE


@dataclass(frozen=True)
class Signature:
    input_name: str
    input_shape: tuple[int | None, ...]  # per image, without the batch dimension
    output_name: str
    num_classes: int | None = None


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray  # float32 [num_classes]
    version: int

    @property
    def label(self) -> int:
        return int(np.argmax(self.scores))


class Backend:
    def __init__(self, target: str, timeout_s: float = 10.0, metadata_ttl_s: float = 30.0,
                 max_message_bytes: int = 64 << 20) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.metadata_ttl_s = metadata_ttl_s
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._signatures: dict[ModelKey, tuple[float, Signature]] = {}

    async def close(self) -> None:
        await self.channel.close()

    async def signature(self, key: ModelKey) -> Signature:
        cached = self._signatures.get(key)
        now = time.monotonic()
        if cached and now - cached[0] < self.metadata_ttl_s:
            return cached[1]
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = key.name
        if key.version:
            req.model_spec.version.value = key.version
        try:
            resp = await self.stub.GetModelMetadata(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise from_backend(err) from None
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        resp.metadata["signature_def"].Unpack(sig_map)
        if key.signature not in sig_map.signature_def:
            raise NotFound(f"model {key.name!r} has no signature {key.signature!r}")
        sig = parse_signature(sig_map.signature_def[key.signature], key)
        self._signatures[key] = (now, sig)
        return sig

    async def predict(self, key: ModelKey, batch: np.ndarray) -> tuple[np.ndarray, int]:
        """Scores [n, classes] and the version that answered."""
        sig = await self.signature(key)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = key.name
        req.model_spec.signature_name = key.signature
        if key.version:
            req.model_spec.version.value = key.version
        req.inputs[sig.input_name].CopyFrom(to_proto(batch))
        req.output_filter.append(sig.output_name)
        resp = await self.forward_predict(req)
        if sig.output_name not in resp.outputs:
            raise InvalidInput(f"model {key.name!r} returned no output {sig.output_name!r}")
        scores = to_ndarray(resp.outputs[sig.output_name], "model output").astype(np.float32, copy=False)
        return scores.reshape(len(batch), -1), int(resp.model_spec.version.value)

    async def forward_predict(self, req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        try:
            return await self.stub.Predict(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise from_backend(err) from None

    async def ready(self, timeout_s: float = 1.0) -> bool:
        """True when the channel connects within ``timeout_s``."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
            return True
        except (asyncio.TimeoutError, grpc.aio.AioRpcError):
            return False


def parse_signature(sig, key: ModelKey) -> Signature:
    if len(sig.inputs) != 1:
        raise InvalidInput(f"model {key.name!r} signature {key.signature!r} has {len(sig.inputs)} inputs; "
                           "hashguard judges single-image-input classifiers")
    (in_name, in_info), = sig.inputs.items()
    outputs = dict(sig.outputs)
    out_name = "scores" if "scores" in outputs else next(iter(sorted(outputs)))
    dims = [d.size for d in in_info.tensor_shape.dim]
    if len(dims) != 4:
        raise InvalidInput(f"model {key.name!r} input {in_name!r} has rank {len(dims)}; expected [batch, h, w, c]")
    out_dims = [d.size for d in outputs[out_name].tensor_shape.dim]
    classes = out_dims[-1] if len(out_dims) == 2 and out_dims[-1] > 0 else None
    return Signature(in_name, tuple(None if d < 0 else d for d in dims[1:]), out_name, classes)
