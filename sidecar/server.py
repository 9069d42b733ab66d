"""Wiring: the grpc.aio server with the Classifier API, the PredictionService
proxy, health checking, reflection and metrics; backend watching; graceful stop."""

from __future__ import annotations

import asyncio
import logging
import ssl

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from .wire.tfapi import (ReflectionPool, model_service_pb2, model_service_pb2_grpc, prediction_service_pb2,
                    prediction_service_pb2_grpc)

from .api import classifier_pb2, classifier_pb2_grpc
from .backend.base import Backend
from .backend.tfserving import GrpcBackend
from .backend.coalesce import CoalescingBackend
from .plane.auth import load_verifier
from .config import Settings, output_policy, passthrough_methods
from .state.crosssession import CrossSessionIndex
from .health import HealthWatch
from .plane.dataplane import DataPlane, JudgmentSettings
from .transport.grpc_classifier import ClassifierAdapter
from .transport.grpc_gate import Gate
from .transport.grpc_prediction import ModelAdapter, PredictionAdapter
from .plane.identity import IdentityPolicy
from .judge.judgment import Thresholds
from .metrics import Metrics
from .plane.padding import Padder, PaddingSettings
from .transport.connections import connection_cap, grpc_options, raise_nofile
from .transport.rest import RestAdapter
from .state.sessions import MemorySessionStore, SessionStore
from .startup import StartupError

log = logging.getLogger("hashguard.server")

SERVICES = (
    classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


def build_plane(settings: Settings, metrics: Metrics, backend: Backend | None = None) -> DataPlane:
    """The data plane with its backend (the real gRPC client unless one is given,
    e.g. ``sidecar.testing.FakeBackend``)."""
    if backend is None:
        backend = GrpcBackend(settings.backend, settings.backend_timeout_s, max_message_bytes=settings.max_message_bytes)
    if settings.backend_inflight:
        backend = CoalescingBackend(backend, settings.backend_inflight, settings.max_batch)
    store: SessionStore
    evict = lambda reason: metrics.evictions.labels(reason).inc()  # noqa: E731
    if settings.session_store == "memory":
        store = MemorySessionStore(settings.max_sessions, settings.session_ttl_s, on_evict=evict)
    else:
        from .state.redis_store import RedisSessionStore

        store = RedisSessionStore.from_url(settings.session_store, ttl_s=settings.session_ttl_s, on_evict=evict,
                                           on_reset=metrics.store_resets.inc)
    padder = Padder(PaddingSettings(settings.padding, settings.padding_target_ms / 1e3,
                                    settings.padding_floor_ms / 1e3, settings.padding_window,
                                    settings.padding_quantile, settings.padding_margin_ms / 1e3))
    tau = settings.lowpass_threshold if settings.mode == "hardened" else None
    judgment = JudgmentSettings(settings.mode, Thresholds(settings.threshold, settings.pixel_tolerance, tau),
                                settings.history, settings.max_batch,
                                cover=settings.cover_forwards and settings.padding != "off")
    index = None
    if settings.mode == "hardened":
        index = CrossSessionIndex(settings.index_window, settings.index_ttl_s, settings.index_radius,
                                  settings.cluster_budget, history=settings.principal_history,
                                  max_principals=settings.max_principals,
                                  on_budget=lambda model_id: metrics.near_duplicate_budget.labels(model_id.split("\x1f")[0]).inc())
    return DataPlane(judgment, backend, store, padder, metrics, index, output_policy(settings),
                     identity_policy(settings), passthrough_methods(settings),
                     max_image_pixels=settings.max_image_pixels, max_model_name_len=settings.max_model_name_len)


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


def _rest_ssl(settings: Settings) -> ssl.SSLContext | None:
    """The REST port uses the gRPC port's certificate (and client CA, for mTLS)."""
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        ctx.load_verify_locations(settings.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class SidecarServer:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, backend: Backend | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.mode)
        self.plane = build_plane(settings, self.metrics, backend)
        from .state.index_replication import replication_for  # hardened + Redis: one cross-session index

        self.replication = replication_for(settings, self.plane, self.metrics)
        self.rest: RestAdapter | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None
        self.watch: HealthWatch | None = None

    async def start(self) -> int:
        s = self.settings
        nofile = raise_nofile()  # REST and gRPC caps stay below it (sidecar/transport/connections.py)
        self.connection_cap = connection_cap(s.max_connections, nofile)
        log.info("connection limits", extra={"nofile": nofile, "per_port": self.connection_cap})
        self._server = grpc.aio.server(options=[
            *grpc_options(self.connection_cap, s.http_idle_timeout_s),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # a second replica on this port must fail, not share it; --workers N shares it (sidecar/workers.py)
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ], interceptors=[Gate(self.plane)])  # authentication + error mapping for every method
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierAdapter(self.plane), self._server)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionAdapter(self.plane), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelAdapter(self.plane), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server,
                                             pool=ReflectionPool())
        creds = _credentials(s)
        address = f"{s.host}:{s.port}"
        try:
            self.port = self._server.add_secure_port(address, creds) if creds else self._server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise StartupError(f"gRPC port {address} (--port): cannot bind (address in use?)")
        if s.rest_port:
            self.rest = RestAdapter(self.plane, s.max_message_bytes, s.http_idle_timeout_s, s.http_body_timeout_s,
                                    self.connection_cap)
            try:
                await self.rest.start(s.host, s.rest_port, _rest_ssl(s), reuse_port=s.workers > 1)
            except OSError as exc:
                raise StartupError(f"REST port {s.host}:{s.rest_port} (--rest-port): cannot bind ({exc.strerror or exc})") from None
        await self._set_health(False, False, False)
        if self.replication:
            await self.replication.start()
        await self._server.start()
        self.watch = HealthWatch(self.plane.backend.channel, self.plane.store, self._set_health)
        self._watch = asyncio.create_task(self.watch.run())
        log.info("sidecar listening", extra={"port": self.port, "backend": s.backend, "mode": s.mode,
                                             "padding": s.padding})
        return self.port

    async def _set_health(self, up: bool, backend_up: bool, store_up: bool) -> None:
        """Health is SERVING only while the backend AND the session store can be used."""
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)
        self.metrics.backend_up.set(1 if backend_up else 0)
        self.metrics.store_up.set(1 if store_up else 0)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, let in-flight calls finish within the grace period."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        if self._watch:
            self._watch.cancel()
        if self._server:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
        if self.replication:
            await self.replication.stop()
        if self.rest:
            await self.rest.stop()
        await self.plane.backend.close()
        self.plane.padder.close()  # the release timer (a timerfd on Linux)
        await self.plane.store.aclose()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
