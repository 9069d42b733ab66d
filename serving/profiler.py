"""TensorFlow's ProfilerService on the model server's gRPC port, as in TF Serving.

``profiler_client.trace("host:port", ...)`` (TensorBoard's capture button)
calls ``/tensorflow.ProfilerService/*`` on the serving address. Those calls are
forwarded, as raw bytes, to TensorFlow's own profiler server running in this
process (``tf.profiler.experimental.server.start``), which records this
process's TensorFlow activity. TensorFlow's profiler server binds every
interface on the port it is given; it is started on the first profiler call,
not before.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc

log = logging.getLogger("serving")

SERVICE = "tensorflow.ProfilerService"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProfilerProxy(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._lock = asyncio.Lock()

    async def _upstream(self) -> grpc.aio.Channel:
        async with self._lock:
            if self._channel is None:
                import tensorflow as tf

                port = _free_port()
                tf.profiler.experimental.server.start(port)
                log.info("Profiler service started for this process (TensorFlow's, on port %d)", port)
                self._channel = grpc.aio.insecure_channel(f"localhost:{port}")
            return self._channel

    def service(self, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(f"/{SERVICE}/"):
            return None

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            channel = await self._upstream()
            call = channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out
            try:
                return await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
        return grpc.unary_unary_rpc_method_handler(forward)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
