"""Wiring: the grpc.aio server with the Classifier API, the PredictionService
proxy, health checking, reflection and metrics; backend watching; graceful stop."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from .tfapi import prediction_service_pb2, prediction_service_pb2_grpc

from .api import classifier_pb2, classifier_pb2_grpc
from .backend import Backend
from .auth import load_verifier
from .config import Settings, output_policy, radius_of
from .crosssession import CrossSessionIndex
from .guard import Guard, JudgmentSettings
from .identity import IdentityPolicy
from .judgment import Thresholds
from .metrics import Metrics
from .padding import Padder, PaddingSettings
from .servicer import ClassifierServicer, PredictionProxy
from .sessions import MemorySessionStore

log = logging.getLogger("hashguard.server")

SERVICES = (
    classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
)


def build_guard(settings: Settings, metrics: Metrics) -> Guard:
    backend = Backend(settings.backend, settings.backend_timeout_s, max_message_bytes=settings.max_message_bytes)
    evict = lambda reason: metrics.evictions.labels(reason).inc()  # noqa: E731
    if settings.session_store == "memory":
        store = MemorySessionStore(settings.max_sessions, settings.session_ttl_s, on_evict=evict)
    else:
        from .redis_store import RedisSessionStore

        store = RedisSessionStore.from_url(settings.session_store, ttl_s=settings.session_ttl_s, on_evict=evict)
    padder = Padder(PaddingSettings(settings.padding, settings.padding_target_ms / 1e3,
                                    settings.padding_floor_ms / 1e3, settings.padding_window))
    judgment = JudgmentSettings(settings.mode, Thresholds(settings.threshold, settings.pixel_tolerance),
                                settings.history, settings.max_batch)
    index = None
    if settings.mode == "hardened":
        index = CrossSessionIndex(settings.index_window, settings.index_ttl_s, radius_of(settings))
    return Guard(judgment, backend, store, padder, metrics, index, output_policy(settings))


def identity_policy(settings: Settings) -> IdentityPolicy:
    return IdentityPolicy(settings.session_header, settings.require_session, settings.max_session_id_len,
                          load_verifier(settings.auth_tokens, settings.auth_verifier),
                          client_certs=bool(settings.tls_client_ca))


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    read = lambda p: open(p, "rb").read()  # noqa: E731
    ca = read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(settings.tls_key), read(settings.tls_cert))],
                                       root_certificates=ca, require_client_auth=ca is not None)


class SidecarServer:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.mode)
        self.guard = build_guard(settings, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> int:
        s = self.settings
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
        ])
        identity = identity_policy(s)
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.guard, identity), self._server)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionProxy(self.guard, identity), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        creds = _credentials(s)
        address = f"{s.host}:{s.port}"
        self.port = self._server.add_secure_port(address, creds) if creds else self._server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"cannot bind {s.host}:{s.port}")
        await self._set_health(False)
        await self._server.start()
        self._watch = asyncio.create_task(self._watch_backend())
        log.info("sidecar listening", extra={"port": self.port, "backend": s.backend, "mode": s.mode,
                                             "padding": s.padding})
        return self.port

    async def _set_health(self, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)
        self.metrics.backend_up.set(1 if up else 0)

    async def _watch_backend(self, period_s: float = 0.5) -> None:
        """Health follows the backend channel: NOT_SERVING while it cannot connect."""
        channel = self.guard.backend.channel
        up: bool | None = None
        while True:
            state = channel.get_state(try_to_connect=True)
            now_up = state == grpc.ChannelConnectivity.READY
            if now_up != up:
                up = now_up
                await self._set_health(up)
                log.info("backend " + ("up" if up else "down"), extra={"backend": self.settings.backend})
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), period_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, let in-flight calls finish within the grace period."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        if self._watch:
            self._watch.cancel()
        if self._server:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
        await self.guard.backend.close()
        close = getattr(self.guard.store, "aclose", None)
        if close:
            await close()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
