"""The official test double of the model backend: ``FakeBackend``.

It implements ``sidecar.backend.base.Backend`` in process (no network): models with
versions and labels, deterministic softmax scores per image and version, real
TF Serving response messages for metadata/status pass-through, and a fake
channel whose connectivity tests can switch (the server's health follows it).
Tests count what reached the "model" (``calls``, ``images``), make it fail
(``fail_with``) or slow (``delay_s``), instead of writing their own fakes::

    backend = FakeBackend()
    server = SidecarServer(settings, backend=backend)
    ...
    assert backend.calls["predict"] == 1
"""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from .backend.base import DEFAULT_SIGNATURE, MODEL_METHODS, PREDICTION_METHODS, ModelKey, ModelRef, Served, Signature
from .errors import HashguardError, NotFound, status_of
from google.protobuf import message_factory

from .wire.tfapi import get_model_metadata_pb2, get_model_status_pb2, model_service_pb2, prediction_service_pb2

_SERVICES = {"PredictionService": prediction_service_pb2, "ModelService": model_service_pb2}
_RESPONSES = {
    method: message_factory.GetMessageClass(
        module.DESCRIPTOR.services_by_name[service].methods_by_name[method].output_type)
    for service, module in _SERVICES.items()
    for method in module.DESCRIPTOR.services_by_name[service].methods_by_name
}


@dataclass
class FakeModel:
    versions: tuple[int, ...] = (1, 2)
    labels: dict[str, int] = field(default_factory=lambda: {"stable": 1, "canary": 2})
    image_shape: tuple[int | None, ...] = (32, 32, 3)
    num_classes: int = 10
    input_name: str = "image"
    output_name: str = "scores"

    @property
    def signature(self) -> Signature:
        return Signature(self.input_name, self.image_shape, self.output_name, self.num_classes)


class FakeChannel:
    """Just enough of a grpc.aio channel for the server's backend watch."""

    def __init__(self) -> None:
        self.up = True
        self._changed = asyncio.Event()

    def set_up(self, up: bool) -> None:
        self.up = up
        self._changed.set()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY if self.up else grpc.ChannelConnectivity.TRANSIENT_FAILURE

    async def wait_for_state_change(self, state) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def close(self) -> None:
        pass


def fake_scores(image: np.ndarray, version: int, num_classes: int) -> np.ndarray:
    """Deterministic softmax scores of one image: different bytes, different scores."""
    seed = zlib.crc32(np.ascontiguousarray(image, np.float32).tobytes()) ^ (version * 0x9E3779B1 & 0xFFFFFFFF)
    logits = np.random.default_rng(seed).normal(size=num_classes) * 3
    e = np.exp(logits - logits.max())
    return (e / e.sum()).astype(np.float32)


class FakeBackend:
    def __init__(self, models: dict[str, FakeModel] | None = None, timeout_s: float = 1.0) -> None:
        self.models = models if models is not None else {"m": FakeModel()}
        self.timeout_s = timeout_s
        self.calls: Counter[str] = Counter()  # "resolve", "predict", and every pass-through method
        self.images = 0  # images that reached a model
        self.fail_with: BaseException | None = None  # raised by predict and pass-through
        self.delay_s = 0.0  # before predict answers
        self.channel = FakeChannel()
        self.closed = False

    # -- the Backend interface ---------------------------------------------------------------
    def cached(self, ref: ModelRef) -> Served | None:
        return None  # every resolution is counted in calls["resolve"]

    async def resolve(self, ref: ModelRef) -> Served:
        self.calls["resolve"] += 1
        model = self._model(ref.name)
        if ref.label:
            if ref.label not in model.labels:
                raise NotFound(f"model {ref.name!r} has no version labelled {ref.label!r}")
            version = model.labels[ref.label]
        elif ref.version:
            if ref.version not in model.versions:
                raise NotFound(f"model {ref.name!r} has no version {ref.version}")
            version = ref.version
        else:
            version = max(model.versions)
        if ref.signature != DEFAULT_SIGNATURE:
            raise NotFound(f"model {ref.name!r} has no signature {ref.signature!r}")
        return Served(ModelKey(ref.name, version, ref.signature), model.signature)

    async def predict(self, key: ModelKey, batch: np.ndarray) -> tuple[np.ndarray, int]:
        self.calls["predict"] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        model = self._model(key.name)
        if key.version not in model.versions:
            raise NotFound(f"model {key.name!r} has no version {key.version}")
        self.images += len(batch)
        return np.stack([fake_scores(img, key.version, model.num_classes) for img in batch]), key.version

    async def passthrough(self, method: str, request: Any) -> Any:
        self.calls[method] += 1
        if self.fail_with is not None:
            raise self.fail_with
        if method == "GetModelMetadata":
            return self._metadata(request)
        if method == "GetModelStatus":
            return self._status(request)
        if method in _RESPONSES and method in PREDICTION_METHODS + MODEL_METHODS:
            return _RESPONSES[method]()
        raise NotFound(f"no backend method {method!r}")

    def forget(self, ref: ModelRef | None = None) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    # -- helpers -----------------------------------------------------------------------------
    def _model(self, name: str) -> FakeModel:
        if name not in self.models:
            raise NotFound(f"no model {name!r}")
        return self.models[name]

    def _metadata(self, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
        ref = ModelRef.from_spec(request.model_spec)
        model = self._model(ref.name)
        version = model.labels.get(ref.label) if ref.label else (ref.version or max(model.versions))
        if version not in model.versions:
            raise NotFound(f"model {ref.name!r} has no such version")
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        sig = sig_map.signature_def[DEFAULT_SIGNATURE]
        sig.inputs[model.input_name].dtype = 1  # DT_FLOAT
        for d in (-1, *[s or -1 for s in model.image_shape]):
            sig.inputs[model.input_name].tensor_shape.dim.add(size=d)
        sig.outputs[model.output_name].dtype = 1
        for d in (-1, model.num_classes):
            sig.outputs[model.output_name].tensor_shape.dim.add(size=d)
        resp = get_model_metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.name = ref.name
        resp.model_spec.version.value = version
        resp.metadata["signature_def"].Pack(sig_map)
        return resp

    def _status(self, request) -> get_model_status_pb2.GetModelStatusResponse:
        ref = ModelRef.from_spec(request.model_spec)
        model = self._model(ref.name)
        wanted = [ref.version] if ref.version else ([model.labels[ref.label]] if ref.label in model.labels else list(model.versions))
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v in wanted:
            if v not in model.versions:
                raise NotFound(f"model {ref.name!r} has no version {v}")
            st = resp.model_version_status.add()
            st.version = v
            st.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return resp


class FakeServing:
    """A FakeBackend served over gRPC as TF Serving's PredictionService and
    ModelService, for tests of the real client (deadlines, reconnects, drains)::

        fake = FakeBackend(); fake.delay_s = 5
        serving = await FakeServing(fake).start()   # serving.target = "127.0.0.1:<port>"
    """

    def __init__(self, backend: FakeBackend, host: str = "127.0.0.1") -> None:
        self.backend = backend
        self.host = host
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> "FakeServing":
        from .wire.tfapi import model_service_pb2_grpc, prediction_service_pb2_grpc

        fake = self.backend

        async def run(context, coro):
            try:
                return await coro
            except HashguardError as exc:
                code, message = status_of(exc)
                await context.abort(code, message)

        class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
            async def Predict(self, request, context):
                return await run(context, _predict(fake, request))

            async def GetModelMetadata(self, request, context):
                return await run(context, fake.passthrough("GetModelMetadata", request))

        class Models(model_service_pb2_grpc.ModelServiceServicer):
            async def GetModelStatus(self, request, context):
                return await run(context, fake.passthrough("GetModelStatus", request))

        self._server = grpc.aio.server()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:{port}")
        await self._server.start()
        return self

    async def stop(self, grace_s: float | None = 0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


async def _predict(fake: FakeBackend, request):
    from .wire.tensors import to_ndarray, to_proto
    from .wire.tfapi import predict_pb2

    spec = request.model_spec
    served = await fake.resolve(ModelRef.from_spec(spec))
    sig = served.signature
    scores, version = await fake.predict(served.key, to_ndarray(request.inputs[sig.input_name], "input"))
    resp = predict_pb2.PredictResponse()
    resp.model_spec.name = spec.name
    resp.model_spec.signature_name = served.key.signature
    resp.model_spec.version.value = version
    resp.outputs[sig.output_name].CopyFrom(to_proto(scores))
    return resp
