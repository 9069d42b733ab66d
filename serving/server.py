"""The server: gRPC (TCP and ``--grpc_socket_path``) with PredictionService, ModelService,
health checking and reflection; the REST API (:mod:`serving.rest`); model and config polling.

Programmatic use (tests, benchmarks, the sidecar's embedded backend)::

    server = ServingServer([ModelConfig("tiny", base / "tiny")], port=0)
    port = await server.start()          # loads models, then binds; 0 = any free port
    ...
    await server.stop(grace=1.0)

or, from synchronous code, ``with ServerThread(server) as t: t.target``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (
    model_service_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from .batching import InferenceRunner
from .config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    BatchingConfig,
    ModelConfig,
    ServerConfig,
    check_unique,
    parse_model_config_text,
)
from .core import ServingCore
from .metrics import ServingMetrics
from .profiler import ProfilerProxy
from .rest import RestServer
from .registry import ModelRegistry, RefreshResult
from .servicer import ModelServicer, PredictionServicer

log = logging.getLogger("serving")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class ServingServer:
    """A TF-Serving-compatible gRPC model server over SavedModels.

    ``poll_seconds > 0`` rescans base paths that often for new or removed
    versions (TF Serving's ``--file_system_poll_wait_seconds``); the default 0
    loads once at :meth:`start`.
    """

    def __init__(self, models: Sequence[ModelConfig], host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 batching: BatchingConfig | None = None, num_inference_threads: int = 2,
                 poll_seconds: float = 0.0, rest_port: int | None = None, rest_timeout_ms: int = 30000,
                 grpc_socket_path: str = "", channel_arguments: Sequence[tuple[str, int | str]] = (),
                 model_config_file: str = "", config_poll_seconds: float = 0.0, prometheus_path: str = "",
                 prefer_tflite: bool = False):
        """``rest_port``: None for no REST API, 0 for any free port (TF Serving: 0 means none;
        :meth:`from_config` keeps that meaning)."""
        check_unique(models)
        self.host = host
        self.requested_port = port
        self.max_message_bytes = max_message_bytes
        self.poll_seconds = poll_seconds
        self.rest_requested_port = rest_port
        self.grpc_socket_path = grpc_socket_path
        self.channel_arguments = tuple(channel_arguments)
        self.model_config_file = model_config_file
        self.config_poll_seconds = config_poll_seconds
        self.registry = ModelRegistry(models, prefer_tflite=prefer_tflite)
        self.runner = InferenceRunner(batching or BatchingConfig(), num_inference_threads)
        self.metrics = ServingMetrics()
        self.profiler = ProfilerProxy()
        self.core = ServingCore(self.registry, self.runner, self.metrics)
        self.rest = RestServer(self.core, rest_timeout_ms, prometheus_path, max_message_bytes) \
            if rest_port is not None else None
        self.rest_port: int | None = None
        self._config_text: str | None = None
        self._config_task: asyncio.Task | None = None
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._poll_task: asyncio.Task | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._health_names: set[str] = set()
        self.port: int | None = None

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> "ServingServer":
        return cls(cfg.models, cfg.host, cfg.port, cfg.max_message_bytes, cfg.batching,
                   cfg.num_inference_threads, cfg.poll_seconds, cfg.rest_port or None, cfg.rest_timeout_ms,
                   cfg.grpc_socket_path, cfg.channel_arguments, cfg.model_config_file, cfg.config_poll_seconds,
                   cfg.prometheus_path, cfg.prefer_tflite)

    @property
    def target(self) -> str:
        """Where a client on this machine connects, e.g. ``127.0.0.1:8500``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::", "[::]") else self.host
        return _bind_address(host, self.port or 0)

    async def start(self) -> int:
        """Load every model (fails fast with ModelLoadError), bind, serve; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        loop = asyncio.get_running_loop()
        self._reload_lock = asyncio.Lock()
        await loop.run_in_executor(self._loader, self.registry.refresh, True)

        limit = self.max_message_bytes
        if self.model_config_file:
            self._config_text = _read(self.model_config_file)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *self.channel_arguments,  # --grpc_channel_arguments: later entries win
        ])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(self.core), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.core, self.reload), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_generic_rpc_handlers((self.profiler,))
        reflection.enable_server_reflection((
            prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
            model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ), server)
        address = _bind_address(self.host, self.requested_port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
        if not port:
            raise OSError(f"cannot bind gRPC server to {address}")
        if self.grpc_socket_path:
            _remove_stale_socket(self.grpc_socket_path)
            try:
                bound = server.add_insecure_port(f"unix:{self.grpc_socket_path}")
            except RuntimeError as exc:
                raise OSError(f"cannot bind gRPC server to unix:{self.grpc_socket_path}: {exc}") from exc
            if not bound:
                raise OSError(f"cannot bind gRPC server to unix:{self.grpc_socket_path}")
        await self._update_health()  # before the first RPC can arrive
        await server.start()
        self._server, self.port = server, port
        if self.rest is not None:
            self.rest_port = await self.rest.start(self.host, self.rest_requested_port or 0)
        if self.poll_seconds > 0:
            self._poll_task = loop.create_task(self._poll(), name="model-poll")
        if self.model_config_file and self.config_poll_seconds > 0:
            self._config_task = loop.create_task(self._poll_config(), name="config-poll")
        log.info("Running gRPC ModelServer at %s ... (models: %s; batching: %s; max message %d bytes)",
                 _bind_address(self.host, port), ", ".join(self.registry.model_names()),
                 "on" if self.runner.batching.enabled else "off", limit)
        if self.grpc_socket_path:
            log.info("Running gRPC ModelServer at UNIX socket %s ...", self.grpc_socket_path)
        if self.rest_port:
            log.info("Exporting HTTP/REST API at:%s ...", _bind_address(self.host, self.rest_port))
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for ``grace`` seconds, release everything."""
        for task in (self._poll_task, self._config_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._poll_task = self._config_task = None
        if self.rest is not None:
            await self.rest.stop()
        await self.profiler.close()
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
            log.info("Server stopped")
        await self.runner.close()
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def reload(self, models: Sequence[ModelConfig]) -> None:
        """Serve ``models`` instead of the current list (ModelService.HandleReloadConfigRequest).

        All-or-nothing: if a model cannot be loaded the previous configuration stays.
        """
        check_unique(models)
        assert self._reload_lock is not None, "start() first"
        async with self._reload_lock:
            old = list(self.registry.configs.values())
            self.registry.set_configs(models)
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(self._loader, self.registry.refresh, True)
            except Exception:
                self.registry.set_configs(old)
                raise
            await self._after_refresh(result)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_seconds)
            assert self._reload_lock is not None
            async with self._reload_lock:
                try:
                    result = await loop.run_in_executor(self._loader, self.registry.refresh, False)
                except Exception:  # keep polling whatever happens
                    log.exception("model poll failed")
                    continue
                await self._after_refresh(result)

    async def _poll_config(self) -> None:
        """``--model_config_file_poll_wait_seconds``: apply a changed config file (all or nothing)."""
        while True:
            await asyncio.sleep(self.config_poll_seconds)
            try:
                text = _read(self.model_config_file)
            except OSError as exc:
                log.error("cannot read model config file %s: %s", self.model_config_file, exc)
                continue
            if text == self._config_text:
                continue
            try:
                await self.reload(parse_model_config_text(text))
            except Exception as exc:  # keep serving the previous configuration
                log.error("model config file %s not applied: %s", self.model_config_file, exc)
            else:
                log.info("Applied model config file %s", self.model_config_file)
            self._config_text = text  # a broken file is reported once, not every poll

    async def _after_refresh(self, result: RefreshResult) -> None:
        for name, version in result.unloaded:
            await self.runner.forget(name, version)
        if result.loaded or result.unloaded:
            await self._update_health()

    async def _update_health(self) -> None:
        """Per-model status under the model's name; "" is SERVING while any model is."""
        any_served = False
        names = self.registry.model_names()
        for name in names:
            ok = bool(self.registry.versions(name))
            any_served |= ok
            await self.health.set(name, SERVING if ok else NOT_SERVING)
        for gone in self._health_names - set(names):  # removed by a config reload
            await self.health.set(gone, NOT_SERVING)
        self._health_names |= set(names)
        await self.health.set("", SERVING if any_served else NOT_SERVING)
        for name in names:
            self.metrics.model_versions.labels(name).set(len(self.registry.versions(name)))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _remove_stale_socket(path: str) -> None:
    """A socket file left by an earlier server (TF Serving's tests reuse one path) blocks bind()."""
    import stat

    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class ServerThread:
    """Runs a :class:`ServingServer` on its own event loop in a daemon thread.

    For synchronous callers (tests, benchmarks, notebooks)::

        with ServerThread(ServingServer(models)) as t:
            channel = grpc.insecure_channel(t.target)
    """

    def __init__(self, server: ServingServer, start_timeout: float = 300.0):
        self.server = server
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._grace: float | None = 1.0
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        assert self.server.port is not None, "not started"
        return self.server.port

    @property
    def target(self) -> str:
        return self.server.target

    def start(self) -> int:
        self._thread = threading.Thread(target=self._run, name="serving-server", daemon=True)
        self._thread.start()
        if not self._started.wait(self._start_timeout):
            raise TimeoutError("serving server did not start in time")
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self, grace: float | None = 1.0) -> None:
        if self._thread is None or self._loop is None or self._stop is None:
            return
        if not self._thread.is_alive():  # start failed, loop already gone
            self._thread = None
            return
        self._grace = grace
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "ServerThread":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:  # surfaced to start()'s caller
            self._error = exc
            self._started.set()
            await self.server.stop(0)
            return
        self._started.set()
        await self._stop.wait()
        await self.server.stop(self._grace)
