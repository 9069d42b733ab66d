"""gRPC adapters over the data plane: hashguard's Classifier API and a
transparent tensorflow.serving.PredictionService proxy. Errors become statuses
in one place (``errors.status_of``) via ``_rpc``."""

from __future__ import annotations

import functools
import logging

import grpc
import numpy as np
from .tfapi import predict_pb2, prediction_service_pb2_grpc

from .api import classifier_pb2 as pb
from .api import classifier_pb2_grpc as pb_grpc
from .backend import DEFAULT_SIGNATURE, ModelKey
from .errors import InvalidInput, status_of
from .guard import Guard
from .identity import IdentityPolicy, resolve_session
from .images import check_array, decode
from .policy import Answer, dense
from .tensors import to_ndarray, to_proto

log = logging.getLogger("hashguard.servicer")


def _rpc(method):
    """Run a handler; map any failure to its status once, count it, log it."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        name = method.__name__
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the single mapping point
            code, message = status_of(exc)
            self.guard.metrics.errors.labels(name, code.name).inc()
            level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
            log.log(level, "rpc failed", extra={"method": name, "code": code.name, "detail": message},
                    exc_info=code == grpc.StatusCode.INTERNAL)
            await context.abort(code, message)

    return wrapper


def _metadata(context) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def session_of(identity: IdentityPolicy, field_value: str, context) -> str:
    auth = context.auth_context() if identity.client_certs else None
    return resolve_session(identity, field_value, _metadata(context), context.peer(), auth)


def _model_key(ref: pb.ModelRef) -> ModelKey:
    if not ref.name:
        raise InvalidInput("model name is required")
    if ref.version < 0:
        raise InvalidInput("model version must be >= 0 (0 = latest)")
    return ModelKey(ref.name, ref.version, ref.signature_name or DEFAULT_SIGNATURE)


def _classification(a: Answer) -> pb.Classification:
    return pb.Classification(label=a.label, scores=a.scores.tolist(),
                             top_k=[pb.LabelScore(label=i, score=s) for i, s in a.top_k])


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, guard: Guard, identity: IdentityPolicy) -> None:
        self.guard = guard
        self.identity = identity

    def _session(self, field_value: str, context) -> str:
        return session_of(self.identity, field_value, context)

    @_rpc
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        key = _model_key(request.model)
        image = decode(request.image)
        session = self._session(request.session_id, context)
        self.guard.metrics.requests.labels("Classify", key.name, self.guard.settings.mode).inc()
        out = await self.guard.classify(key, [image], session)
        return pb.ClassifyResponse(result=_classification(out.answers[0]), model_name=key.name, model_version=out.version)

    @_rpc
    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest, context) -> pb.ClassifyBatchResponse:
        key = _model_key(request.model)
        images = [decode(img, f"image {i}") for i, img in enumerate(request.images)]
        session = self._session(request.session_id, context)
        self.guard.metrics.requests.labels("ClassifyBatch", key.name, self.guard.settings.mode).inc()
        out = await self.guard.classify(key, images, session)
        return pb.ClassifyBatchResponse(
            results=[_classification(a) for a in out.answers],
            model_name=key.name,
            model_version=out.version,
        )

    async def ClassifyStream(self, request_iterator, context):
        # Requests of one stream are handled in order; a bad one ends the stream
        # with its status, as the unary call would.
        async for request in request_iterator:
            yield await self.Classify(request, context)


class PredictionProxy(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Existing TF Serving clients switch by changing only the address.

    A Predict whose request carries the signature's single image input (rank 4)
    is judged image by image in the caller's session; everything else passes
    through to the backend unchanged.
    """

    def __init__(self, guard: Guard, identity: IdentityPolicy) -> None:
        self.guard = guard
        self.identity = identity
        self.stub = guard.backend.stub

    @_rpc
    async def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        if spec.WhichOneof("version_choice") == "version_label":
            return await self._pass("Predict", request, context)
        key = ModelKey(spec.name, spec.version.value if spec.HasField("version") else 0,
                       spec.signature_name or DEFAULT_SIGNATURE)
        sig = await self.guard.backend.signature(key)
        if set(request.inputs) != {sig.input_name}:
            if sig.input_name not in request.inputs:
                raise InvalidInput(f"model {key.name!r} expects input {sig.input_name!r}, got {sorted(request.inputs)}")
            raise InvalidInput(f"unexpected inputs {sorted(set(request.inputs) - {sig.input_name})}")
        batch = to_ndarray(request.inputs[sig.input_name], f"input {sig.input_name!r}")
        if batch.ndim != 4:
            raise InvalidInput(f"input {sig.input_name!r} must be a batch of images [n, h, w, c], got shape {list(batch.shape)}")
        if batch.dtype not in (np.uint8, np.float32):
            raise InvalidInput(f"input {sig.input_name!r} must be uint8 or float32, got {batch.dtype}")
        images = [check_array(img, f"image {i}") for i, img in enumerate(batch)]
        session = session_of(self.identity, "", context)
        self.guard.metrics.requests.labels("Predict", key.name, self.guard.settings.mode).inc()
        out = await self.guard.classify(key, images, session)
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = key.name
        resp.model_spec.signature_name = key.signature
        resp.model_spec.version.value = out.version
        classes = max(len(a.scores) for a in out.answers) or sig.num_classes or 1 + max(a.label for a in out.answers)
        resp.outputs[sig.output_name].CopyFrom(to_proto(np.stack([dense(a, classes) for a in out.answers])))
        return resp

    async def _pass(self, method: str, request, context):
        call = getattr(self.stub, method)
        return await call(request, timeout=self.guard.backend.timeout_s)

    @_rpc
    async def GetModelMetadata(self, request, context):
        return await self._pass("GetModelMetadata", request, context)

    @_rpc
    async def Classify(self, request, context):
        return await self._pass("Classify", request, context)

    @_rpc
    async def Regress(self, request, context):
        return await self._pass("Regress", request, context)

    @_rpc
    async def MultiInference(self, request, context):
        return await self._pass("MultiInference", request, context)
