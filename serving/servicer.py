"""gRPC servicers: thin adapters from RPCs to :class:`serving.core.ServingCore`.

Every handler goes through :func:`_rpc`, which turns whatever the core raises
into a status with :func:`serving.errors.grpc_status`: that is the only place
exceptions meet status codes.
"""

from __future__ import annotations

import functools
import logging
from typing import Awaitable, Callable, Sequence

import grpc
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from .config import ModelConfig, models_from_proto
from .core import ServingCore
from .errors import Unimplemented, grpc_status

log = logging.getLogger("serving")


def _model_name(request) -> str:
    if hasattr(request, "model_spec"):
        return request.model_spec.name
    tasks = getattr(request, "tasks", None)
    return tasks[0].model_spec.name if tasks else ""


def _rpc(handler):
    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        with self._core.metrics.request(_model_name(request), handler.__name__, "GRPC") as done:
            try:
                response = await handler(self, request, context)
            except Exception as exc:
                code, message = grpc_status(exc)
                done(code.name)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", handler.__name__)
                await context.abort(code, message)
            done("OK")
            return response
    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServingCore):
        self._core = core

    @_rpc
    async def Predict(self, request, context):
        return await self._core.predict(request)

    @_rpc
    async def GetModelMetadata(self, request, context):
        return self._core.get_model_metadata(request)

    @_rpc
    async def Classify(self, request, context):
        return await self._core.classify(request)

    @_rpc
    async def Regress(self, request, context):
        return await self._core.regress(request)

    @_rpc
    async def MultiInference(self, request, context):
        return await self._core.multi_inference(request)


Reload = Callable[[Sequence[ModelConfig]], Awaitable[None]]


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServingCore, reload: Reload | None = None):
        self._core = core
        self._reload = reload

    @_rpc
    async def GetModelStatus(self, request, context):
        return self._core.get_model_status(request)

    @_rpc
    async def HandleReloadConfigRequest(self, request, context):
        """Replace the served models (TF Serving semantics); errors come back in ``status``."""
        if self._reload is None:
            raise Unimplemented("HandleReloadConfigRequest is disabled on this server")
        resp = model_management_pb2.ReloadConfigResponse()
        try:
            await self._reload(models_from_proto(request.config))
        except Exception as exc:
            code, message = grpc_status(exc)
            resp.status.error_code = code.value[0]
            resp.status.error_message = message
        return resp
