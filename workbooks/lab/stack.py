"""Start model serving and one or more sidecars as local processes, and stop them.

    with Stack("models", models=["cnn", "lenet"],
               sidecars=[SidecarSpec("defended", mode="paper"), SidecarSpec("undefended", mode="off")]) as st:
        p = st.predictor("defended", "cnn")          # a SidecarPredictor, new session
        st.sidecar("undefended").address           # "127.0.0.1:PORT"
        st.metrics("defended").counters(model="cnn")

Processes: ``python -m serving`` (one process; a TF Serving ``model_config_list``
file when several models are served) and ``python -m sidecar --backend ...`` per
``SidecarSpec``, each on free loopback ports, with stdout/stderr in log files.
``__enter__`` waits until every process answers gRPC health "" with SERVING
(raising ``StackError`` with the process's log tail on timeout or early exit);
``__exit__`` always stops them: SIGTERM, then SIGKILL after ``stop_timeout``,
also on exceptions and KeyboardInterrupt. On Linux the children also get
SIGTERM if this process dies (PR_SET_PDEATHSIG), so nothing outlives a killed
notebook kernel.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .client import Metrics, SidecarPredictor, health_status


class StackError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def model_config_text(models: dict[str, Path]) -> str:
    """TF Serving ``model_config_list`` text proto for ``{name: absolute base path}``."""
    lines = ["model_config_list {"]
    for name, base in models.items():
        lines += ["  config {", f'    name: "{name}"', f'    base_path: "{Path(base).resolve()}"',
                  '    model_platform: "tensorflow"', "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SidecarSpec:
    name: str
    mode: str = "paper"  # paper | hardened | off
    padding: str = "off"  # off | fixed | distribution
    args: tuple[str, ...] = ()  # further command-line flags
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Proc:
    name: str
    argv: list[str]
    address: str
    log: Path
    popen: subprocess.Popen | None = None
    metrics_url: str | None = None
    spec: SidecarSpec | None = None

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def as_dict(self) -> dict:
        d = {"name": self.name, "address": self.address, "metrics_url": self.metrics_url, "log": str(self.log)}
        if self.spec is not None:
            d.update(mode=self.spec.mode, padding=self.spec.padding, args=list(self.spec.args))
        return d


def _pdeathsig():  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Stack:
    """Serving + sidecars on loopback; a context manager (see module docstring)."""

    def __init__(self, models_dir: str | os.PathLike, models: Sequence[str], *, mode: str = "paper",
                 padding: str = "off", sidecars: Sequence[SidecarSpec] | None = None,
                 host: str = "127.0.0.1", startup_timeout: float = 180.0, stop_timeout: float = 10.0,
                 python: str = sys.executable, log_dir: str | os.PathLike | None = None,
                 serving_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 backend: str | None = None, cwd: str | os.PathLike | None = None) -> None:
        """``backend``: use an already running serving at HOST:PORT instead of starting one.
        ``cwd``: working directory of the processes (default: the project root)."""
        self.models_dir = Path(models_dir).resolve()
        self.models = list(models)
        if not self.models:
            raise ValueError("Stack needs at least one model")
        self.specs = list(sidecars) if sidecars is not None else [SidecarSpec(mode, mode=mode, padding=padding)]
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"sidecar names must be unique: {names}")
        self.host = host
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.python = python
        self.serving_args = list(serving_args)
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self._external_backend = backend
        self.cwd = Path(cwd) if cwd else Path(__file__).resolve().parents[2]
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else None
        self.serving: Proc | None = None
        self.sidecars: dict[str, Proc] = {}
        self._procs: list[Proc] = []
        self._started = False

    # -- public ---------------------------------------------------------------
    @property
    def backend(self) -> str:
        if self._external_backend:
            return self._external_backend
        if self.serving is None:
            raise StackError("stack not started")
        return self.serving.address

    def sidecar(self, name: str | None = None) -> Proc:
        if not self.sidecars:
            raise StackError("stack not started")
        if name is None:
            return next(iter(self.sidecars.values()))
        try:
            return self.sidecars[name]
        except KeyError:
            raise KeyError(f"no sidecar {name!r}; have {sorted(self.sidecars)}") from None

    @property
    def address(self) -> str:
        """Address of the first sidecar."""
        return self.sidecar().address

    def predictor(self, name: str | None, model: str, session_id: str | None = None,
                  batch: bool = True, **kw) -> SidecarPredictor:
        return SidecarPredictor(self.sidecar(name).address, model, session_id, batch, **kw)

    def metrics(self, name: str | None = None) -> Metrics:
        url = self.sidecar(name).metrics_url
        if not url:
            raise StackError(f"sidecar {name!r} has no metrics port")
        return Metrics(url)

    def endpoints(self) -> dict:
        """JSON-able description of the running stack (for notebooks' parameters)."""
        return {
            "backend": self.backend,
            "models": self.models,
            "models_dir": str(self.models_dir),
            "sidecars": {n: p.as_dict() for n, p in self.sidecars.items()},
        }

    def endpoints_json(self) -> str:
        return json.dumps(self.endpoints())

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "Stack":
        if self._started:
            return self
        self._started = True
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="hashguard-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            if not self._external_backend:
                self._start_serving()
            for spec in self.specs:
                self._start_sidecar(spec)
            for p in self._procs:
                self._wait_healthy(p)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in reversed(self._procs):
            if p.popen is not None and p.popen.poll() is None:
                try:
                    p.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.stop_timeout
        for p in reversed(self._procs):
            if p.popen is None:
                continue
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)
        self._procs = [p for p in self._procs if p.popen is not None and p.popen.poll() is None]
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], address: str, extra_env: dict | None = None) -> Proc:
        assert self.log_dir is not None
        log = self.log_dir / f"{name}.log"
        proc = Proc(name, argv, address, log)
        env = dict(self.env, **(extra_env or {}))
        with open(log, "wb") as fh:
            proc.popen = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=str(self.cwd),
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
                start_new_session=True,  # Ctrl-C reaches us, we stop them in order
            )
        self._procs.append(proc)
        return proc

    def _start_serving(self) -> None:
        missing = [m for m in self.models if not (self.models_dir / m).is_dir()]
        if missing:
            raise StackError(f"models not found under {self.models_dir}: {missing} (train/export them first)")
        port = free_port(self.host)
        argv = [self.python, "-m", "serving", "--port", str(port)]
        if len(self.models) == 1:
            argv += ["--model_name", self.models[0], "--model_base_path", str(self.models_dir / self.models[0])]
        else:
            assert self.log_dir is not None
            cfg = self.log_dir / "models.config"
            cfg.write_text(model_config_text({m: self.models_dir / m for m in self.models}))
            argv += ["--model_config_file", str(cfg)]
        argv += self.serving_args
        self.serving = self._spawn("serving", argv, f"{self.host}:{port}")

    def _start_sidecar(self, spec: SidecarSpec) -> None:
        port, mport = free_port(self.host), free_port(self.host)
        argv = [self.python, "-m", "sidecar", "--backend", self.backend, "--port", str(port),
                "--mode", spec.mode, "--padding", spec.padding, "--metrics-port", str(mport), *spec.args]
        p = self._spawn(f"sidecar-{spec.name}", argv, f"{self.host}:{port}", spec.env)
        p.metrics_url = f"http://{self.host}:{mport}/metrics"
        p.spec = spec
        self.sidecars[spec.name] = p

    def _wait_healthy(self, p: Proc) -> None:
        deadline = time.monotonic() + self.startup_timeout
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            if p.popen is not None and p.popen.poll() is not None:
                raise StackError(f"{p.name} exited with code {p.popen.returncode} before becoming healthy.\n"
                                 f"command: {' '.join(p.argv)}\n--- log tail ({p.log}) ---\n{p.log_tail()}")
            status = health_status(p.address, timeout=1.0)
            if status == "SERVING":
                return
            time.sleep(0.25)
        raise StackError(f"{p.name} at {p.address} not SERVING after {self.startup_timeout:.0f}s "
                         f"(last status {status}).\ncommand: {' '.join(p.argv)}\n"
                         f"--- log tail ({p.log}) ---\n{p.log_tail()}")

    def cleanup_logs(self) -> None:
        if self._own_log_dir and self.log_dir and self.log_dir.exists():
            shutil.rmtree(self.log_dir, ignore_errors=True)
