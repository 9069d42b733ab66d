"""The one launcher: model serving and sidecars, as processes or in this process.

    with Lab("models", ["cnn"], [SidecarSpec("defended", mode="paper")]) as lab:
        c = lab.client("defended", "cnn")            # lab.client.SidecarClient, new session
        lab.counters("defended").snapshot("cnn")     # lab.counters.Counters
        fresh = lab.add(SidecarSpec("cell", mode="hardened"))   # a fresh sidecar, empty state
        lab.serving.stop(); lab.serving.start()      # the backend down and up on the same port

``Serving`` runs ``python -m serving`` (TF Serving's flags) on a fixed port and can
be stopped and started again there. A sidecar runs as ``python -m sidecar FLAGS``
(``inprocess=False``) or as ``sidecar.server.SidecarServer(from_args(FLAGS))`` on a
background event loop here (``inprocess=True``): the same flags either way. Every
process waits for gRPC health SERVING (``LaunchError`` with the log tail if not)
and is stopped on exit, also on errors; children get SIGTERM if we die (Linux).
``Lab.attach(endpoints)`` joins servers another ``Lab`` started (``endpoints()``
is their JSON), without owning them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .client import SidecarClient, health_status
from .counters import Counters
from .paths import project_root


class LaunchError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def model_config_text(models: dict[str, Path]) -> str:
    """TF Serving ``model_config_list`` text proto for ``{name: base path}``."""
    lines = ["model_config_list {"]
    for name, base in models.items():
        lines += ["  config {", f'    name: "{name}"', f'    base_path: "{Path(base).resolve()}"',
                  '    model_platform: "tensorflow"', "  }"]
    return "\n".join(lines + ["}"]) + "\n"


def _pdeathsig():  # in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


class Process:
    """One server child process with a log file; ``start`` waits for health SERVING."""

    def __init__(self, name: str, argv: list[str], address: str, log: Path, env: dict | None = None,
                 timeout: float = 180.0) -> None:
        self.name, self.argv, self.address, self.log, self.timeout = name, argv, address, log, timeout
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        with open(self.log, "ab") as fh:
            self.popen = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, cwd=str(project_root()), start_new_session=True,
                                          preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)
        deadline, status = time.monotonic() + self.timeout, "UNREACHABLE"
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise LaunchError(f"{self.name} exited with {self.popen.returncode}\n{self.tail()}")
            status = health_status(self.address, timeout=1.0)
            if status == "SERVING":
                return self
            time.sleep(0.2)
        self.stop()
        raise LaunchError(f"{self.name} at {self.address} not SERVING after {self.timeout:.0f}s ({status})\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        p, self.popen = self.popen, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


class Serving(Process):
    """``python -m serving`` for ``models`` under ``models_dir`` (or ``{name: base path}``) on
    one port, restartable there."""

    def __init__(self, models_dir: str | os.PathLike, models: Sequence[str] | dict, log_dir: Path,
                 port: int | None = None, host: str = "127.0.0.1", args: Sequence[str] = ()) -> None:
        base = Path(models_dir).resolve()
        paths = dict(models) if isinstance(models, dict) else {m: base / m for m in models}
        missing = [m for m, p in paths.items() if not Path(p).is_dir()]
        if missing:
            raise LaunchError(f"models not found under {base}: {missing} (train/export them first)")
        port = port or free_port(host)
        cfg = Path(log_dir) / f"models-{port}.config"
        cfg.write_text(model_config_text(paths))
        argv = [sys.executable, "-m", "serving", "--host", host, "--port", str(port), "--model_config_file", str(cfg),
                *args]
        super().__init__("serving", argv, f"{host}:{port}", Path(log_dir) / f"serving-{port}.log")


@dataclass(frozen=True)
class SidecarSpec:
    name: str
    mode: str = "paper"          # paper | hardened | off
    padding: str = "off"         # off | fixed | distribution
    args: tuple[str, ...] = ()   # further sidecar flags
    env: dict = field(default_factory=dict)

    def flags(self, backend: str, port: int, metrics_port: int) -> list[str]:
        return ["--backend", backend, "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                str(metrics_port), "--rest-port", "0", "--mode", self.mode, "--padding", self.padding, *map(str, self.args)]


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    """One event-loop thread for every in-process sidecar (grpc.aio servers need a running loop)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="lab-sidecars", daemon=True).start()
        return _LOOP


class Sidecar:
    """A running sidecar: ``address``, ``counters``, ``client(model)``; ``stop()``."""

    def __init__(self, spec: SidecarSpec, backend: str, inprocess: bool, log_dir: Path | None = None) -> None:
        self.spec, self.inprocess = spec, inprocess
        self._server = self._proc = None
        port = free_port()
        if inprocess:
            from sidecar.config import from_args

            self.settings = from_args(spec.flags(backend, port, 0) + ["--log-level", "WARNING"])
            self._server = self._call(self._start_server())
            self.address = f"127.0.0.1:{self._server.port}"
            self.metrics_url = None
        else:
            mport = free_port()
            argv = [sys.executable, "-m", "sidecar", *spec.flags(backend, port, mport)]
            self._proc = Process(f"sidecar-{spec.name}", argv, f"127.0.0.1:{port}",
                                 Path(log_dir or tempfile.gettempdir()) / f"sidecar-{spec.name}-{port}.log",
                                 env=spec.env).start()
            self.address, self.metrics_url = self._proc.address, f"http://127.0.0.1:{mport}/metrics"

    @staticmethod
    def _call(coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, _loop()).result(timeout)

    async def _start_server(self):
        import logging

        from sidecar.server import SidecarServer

        logging.getLogger("hashguard").setLevel(logging.WARNING)
        server = SidecarServer(self.settings)
        await server.start()
        return server

    @property
    def counters(self) -> Counters:
        if self._server is not None:
            from prometheus_client import generate_latest

            registry = self._server.metrics.registry
            return Counters(lambda: generate_latest(registry).decode())
        return Counters(self.metrics_url)

    def client(self, model: str, session: str | None = None, **kw) -> SidecarClient:
        return SidecarClient(self.address, model, session, **kw)

    def describe(self) -> dict:
        return {"name": self.spec.name, "address": self.address, "metrics_url": self.metrics_url,
                "mode": self.spec.mode, "padding": self.spec.padding, "args": list(self.spec.args)}

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            self._call(server.stop(0))
        if self._proc is not None:
            self._proc.stop()

    def __enter__(self) -> "Sidecar":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Attached:
    """A sidecar another Lab started: address and /metrics only."""

    def __init__(self, d: dict) -> None:
        self.spec = SidecarSpec(d["name"], d.get("mode", "paper"), d.get("padding", "off"), tuple(d.get("args", ())))
        self.address, self.metrics_url, self.inprocess = d["address"], d.get("metrics_url"), False
        self.counters = Counters(self.metrics_url) if self.metrics_url else None

    client = Sidecar.client
    describe = Sidecar.describe

    def stop(self) -> None:
        pass


class Lab:
    """Serving (``models`` under ``models_dir``, or an existing ``backend``) plus named sidecars."""

    def __init__(self, models_dir: str | os.PathLike = "models", models: Sequence[str] = (),
                 sidecars: Sequence[SidecarSpec] = (), *, inprocess: bool = False, backend: str | None = None,
                 log_dir: str | os.PathLike | None = None, serving_args: Sequence[str] = ()) -> None:
        self.models_dir, self.models, self.inprocess = Path(models_dir), list(models), inprocess
        self.specs = list(sidecars)
        if len({s.name for s in self.specs}) != len(self.specs):
            raise ValueError(f"sidecar names must be unique: {[s.name for s in self.specs]}")
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="hashguard-lab-"))
        self._backend, self._serving_args = backend, list(serving_args)
        self.serving: Serving | None = None
        self.sidecars: dict[str, Sidecar | _Attached] = {}
        self._extra: list[Sidecar] = []

    @classmethod
    def attach(cls, endpoints: str | dict) -> "Lab":
        d = json.loads(endpoints) if isinstance(endpoints, str) else endpoints
        lab = cls(d.get("models_dir", "models"), d.get("models", ()), backend=d["backend"],
                  inprocess=d.get("inprocess", False))
        lab.sidecars = {n: _Attached(s) for n, s in d["sidecars"].items()}
        return lab

    @property
    def backend(self) -> str:
        if self._backend:
            return self._backend
        if self.serving is None:
            raise LaunchError("serving not started")
        return self.serving.address

    def start(self) -> "Lab":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self._backend and self.serving is None:
                self.serving = Serving(self.models_dir, self.models, self.log_dir, args=self._serving_args).start()
            for spec in self.specs:
                if spec.name not in self.sidecars:
                    self.sidecars[spec.name] = Sidecar(spec, self.backend, self.inprocess, self.log_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def add(self, spec: SidecarSpec, inprocess: bool | None = None) -> Sidecar:
        """A fresh sidecar on this backend (stopped with the Lab, or earlier by the caller)."""
        sc = Sidecar(spec, self.backend, self.inprocess if inprocess is None else inprocess, self.log_dir)
        self._extra.append(sc)
        return sc

    def sidecar(self, name: str) -> Sidecar | _Attached:
        try:
            return self.sidecars[name]
        except KeyError:
            raise KeyError(f"no sidecar {name!r}; have {sorted(self.sidecars)}") from None

    def client(self, name: str, model: str, session: str | None = None, **kw) -> SidecarClient:
        return self.sidecar(name).client(model, session, **kw)

    def counters(self, name: str) -> Counters:
        return self.sidecar(name).counters

    def endpoints(self) -> dict:
        return {"backend": self.backend, "models": self.models, "models_dir": str(self.models_dir.resolve()),
                "sidecars": {n: s.describe() for n, s in self.sidecars.items()}}

    def stop(self) -> None:
        for sc in [*self._extra, *self.sidecars.values()][::-1]:
            sc.stop()
        self._extra.clear()
        if self.serving is not None:
            self.serving.stop()

    def __enter__(self) -> "Lab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
