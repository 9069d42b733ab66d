"""Test helper: the real SidecarServer (gRPC + REST on loopback) over the
official FakeBackend, so routing/auth/REST tests need no model server."""

from __future__ import annotations

import grpc
import numpy as np

from conftest import free_port
from sidecar.config import Settings
from sidecar.server import SidecarServer
from sidecar.testing import FakeBackend


async def start_fake_sidecar(backend: FakeBackend | None = None, rest: bool = True, **kw) -> SidecarServer:
    kw.setdefault("padding", "off")
    kw.setdefault("score_noise", 0.0)
    kw.setdefault("score_precision", 0)
    settings = Settings(backend="127.0.0.1:1", host="127.0.0.1", port=0, metrics_port=0,
                        rest_port=free_port() if rest else 0, **kw)
    server = SidecarServer(settings, backend=backend or FakeBackend())
    await server.start()
    return server


def grpc_channel(server: SidecarServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


def rest_url(server: SidecarServer, path: str) -> str:
    return f"http://127.0.0.1:{server.rest.port}{path}"


def snapshot(server: SidecarServer) -> dict:
    return {k: tuple(id(a) for a in e.anchors) for k, e in server.plane.store._entries.items()}


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def one_pixel(img: np.ndarray, k: int = 0) -> np.ndarray:
    """A copy with one pixel (position from k) nudged by 2 levels in every channel."""
    out = img.copy()
    px = out[k % 32, (3 * k) % 32].astype(int)
    out[k % 32, (3 * k) % 32] = np.where(px > 127, px - 2, px + 2)
    return out


def errors_counted(server: SidecarServer, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value("hashguard_errors_total", {"method": method, "code": code}) or 0.0
