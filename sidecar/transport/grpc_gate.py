"""The gRPC front gate: one server interceptor that, for EVERY method of every
hashguard service (health and reflection stay open),

1. authenticates the caller through the data plane before anything else runs,
   not even request parsing (a call without a valid credential gets
   UNAUTHENTICATED and reaches no backend);
2. parses the request bytes itself, so malformed protobuf is INVALID_ARGUMENT
   (grpc's own deserializer would answer UNKNOWN, uncounted);
3. makes the ``Caller`` available to the adapters (``current_caller()``);
4. maps any failure to its status ONCE (``errors.status_of``), counts it in
   ``hashguard_errors_total{method,code}`` and logs it; a call the client
   abandoned (its deadline passed or it cancelled: grpc cancels the handler)
   is counted too, as DEADLINE_EXCEEDED or CANCELLED. The ``Caller`` tells the
   data plane when the client has given up, so such a call is not forwarded.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from ..plane.dataplane import DataPlane
from ..errors import InvalidInput, report
from ..plane.identity import Caller

log = logging.getLogger("hashguard.grpc")

OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("hashguard_caller")


def current_caller() -> Caller:
    """The authenticated caller of the call being handled (set by the gate)."""
    return _CALLER.get()


def _gone(context) -> str:
    """"deadline" once the call's deadline has passed, else "" (a cancellation reaches
    the handler as asyncio.CancelledError)."""
    remaining = context.time_remaining()
    return "deadline" if remaining is not None and remaining <= 0 else ""


def _parse(deserializer: Callable | None, raw):
    if deserializer is None or not isinstance(raw, (bytes, bytearray, memoryview)):
        return raw
    try:
        return deserializer(bytes(raw))
    except (DecodeError, ValueError, TypeError) as exc:
        raise InvalidInput(f"malformed request message: {exc}") from None


class Gate(grpc.aio.ServerInterceptor):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # per registered method, built once

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        wrapped = self._wrapped.get(details.method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler  # unknown methods are not remembered: the table holds registered ones only
        wrapped = self._wrapped[details.method] = self._wrap(handler, details.method.rsplit("/", 1)[-1])
        return wrapped

    def _caller(self, context) -> Caller:
        identity = self.plane.identity
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        certs = (context.auth_context() or {}).get("x509_common_name") or () if identity.client_certs else ()
        principal = self.plane.authenticate(md.get("authorization", ""), certs)
        return Caller(principal, md.get(identity.header.lower(), ""), context.peer() or "unknown",
                      gone=lambda: _gone(context))

    def _abandoned(self, method: str, context) -> None:
        code = "DEADLINE_EXCEEDED" if _gone(context) == "deadline" else "CANCELLED"
        self.plane.metrics.errors.labels(method, code).inc()
        log.info("rpc abandoned by the client", extra={"method": method, "code": code})

    async def _fail(self, method: str, exc: Exception, context) -> None:
        code, message = report(exc, method, self._count, log)
        await context.abort(code, message)

    def _count(self, method: str, code: str) -> None:
        self.plane.metrics.errors.labels(method, code).inc()

    def _wrap(self, handler, method: str):
        deser = handler.request_deserializer
        gate = self

        def prepare(request, context):
            token = _CALLER.set(gate._caller(context))  # authentication first
            if handler.request_streaming:
                async def parsed(it=request):
                    async for raw in it:
                        yield _parse(deser, raw)
                return token, parsed()
            return token, _parse(deser, request)

        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            async def streaming(request, context):
                token = None
                try:
                    token, request = prepare(request, context)
                    async for item in inner(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    gate._abandoned(method, context)
                    raise
                except Exception as exc:  # noqa: BLE001 - the single mapping point
                    await gate._fail(method, exc, context)
                finally:
                    if token is not None:
                        _CALLER.reset(token)
        else:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request, context):
                token = None
                try:
                    token, request = prepare(request, context)
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    gate._abandoned(method, context)
                    raise
                except Exception as exc:  # noqa: BLE001 - the single mapping point
                    await gate._fail(method, exc, context)
                finally:
                    if token is not None:
                        _CALLER.reset(token)

        behavior = streaming if handler.response_streaming else unary
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(behavior, request_deserializer=None, response_serializer=handler.response_serializer)
