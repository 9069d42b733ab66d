"""The floor of any Python sidecar: a grpc.aio proxy that passes TF Serving's Predict
bytes through untouched (no parsing, no judgment, no metrics).

``bench_sidecar.overhead`` measures it beside the sidecar in the same rounds, so the
JSON shows how much of the sidecar's overhead is one more Python gRPC hop and how much
is hashguard's own work.

    python -m benchmarks.noop_proxy --backend 127.0.0.1:8500 --port 8650
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "tensorflow.serving.PredictionService"


async def serve(backend: str, port: int) -> None:
    channel = grpc.aio.insecure_channel(backend)
    predict = channel.unary_unary(f"/{SERVICE}/Predict")  # bytes in, bytes out

    async def handler(request: bytes, context) -> bytes:
        return await predict(request)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Predict": grpc.unary_unary_rpc_method_handler(handler)}),))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.noop_proxy")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.backend, args.port))


if __name__ == "__main__":
    main()
