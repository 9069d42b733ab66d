"""``--workers N``: N sidecar processes on one host, one event loop each.

One Python process is CPU-bound well below what the model server can answer, so
a host runs several. The supervisor (this module, the process started as
``hashguard-sidecar --workers N``) does no judging:

* it checks that the gRPC (and REST) port is free, binds the metrics port, then
  starts N worker processes (``multiprocessing`` *spawn*: fresh interpreters,
  no forked event loop or gRPC state);
* every worker runs the ordinary one-process sidecar (``cli.serve``) on the SAME
  port: gRPC servers bind with SO_REUSEPORT (gRPC's default on Linux,
  ``grpc.so_reuseport``), so the kernel spreads new connections over the
  workers. A client's connection stays on one worker; its calls are judged
  there;
* workers share sessions only through the session store, so N > 1 requires
  ``--session-store redis://...`` (checked in ``Settings``);
* metrics: prometheus_client's multiprocess mode. The supervisor points
  ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start;
  each worker's counters and histograms are written there and the supervisor
  serves their sum on ``--metrics-port``. Gauges keep one sample per worker
  (label ``pid``): ``hashguard_backend_up``, ``hashguard_sessions``, ... read
  per worker, aggregate with ``min``/``max``. A dead worker's gauge file is
  removed, its counters stay in the sums (they never go backwards);
* a worker that dies is started again (after ``RESTART_DELAY_S``); a
  supervisor that dies (even SIGKILL) takes its workers with it (PDEATHSIG);
* SIGTERM or SIGINT to the supervisor is passed to every worker, each drains
  its in-flight calls (``--grace-s``); a worker still alive ``KILL_MARGIN_S``
  after that is killed. The supervisor exits 0 when every worker exited 0.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable, Coroutine

from .config import Settings
from .startup import StartupError, reserve_port

log = logging.getLogger("hashguard.workers")

RESTART_DELAY_S = 1.0
KILL_MARGIN_S = 5.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_settings(settings: Settings, port: int) -> Settings:
    """What one worker runs: the same settings on the shared port and no metrics
    server of its own (the supervisor serves the sum). ``workers`` stays N: it
    tells the server to bind with SO_REUSEPORT and start-up checks that sibling
    workers hold the port."""
    return dataclasses.replace(settings, port=port, metrics_port=0)


def prepare_multiproc_dir() -> str:
    """A clean directory for the workers' metric files: the operator's
    ``PROMETHEUS_MULTIPROC_DIR`` (emptied of a previous run's files) or a new one."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for f in glob.glob(os.path.join(path, "*.db")):
            os.remove(f)
    else:
        path = tempfile.mkdtemp(prefix="hashguard-metrics-")
    os.environ[MULTIPROC_ENV] = path  # inherited by the spawned workers
    return path


def forget_worker_gauges(path: str, pid: int) -> None:
    """A dead worker's gauges are not current any more; its counters stay summed."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)
    for f in glob.glob(os.path.join(path, f"gauge_*_{pid}.db")):
        os.remove(f)


def _serve_metrics(path: str, port: int, host: str):
    import threading

    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    from .metrics import http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    try:
        httpd = http_server(make_wsgi_app(registry), host, port)
    except OSError as exc:
        raise StartupError(f"metrics port {host}:{port} (--metrics-port): {exc.strerror or exc}") from None
    threading.Thread(target=httpd.serve_forever, name="hashguard-metrics", daemon=True).start()
    return httpd


def _die_with(supervisor_pid: int) -> None:
    """A worker must not outlive its supervisor, even one that was SIGKILLed: the
    kernel sends SIGTERM when the parent dies (Linux), and a parent already gone
    ends the worker at once."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != supervisor_pid:
        os._exit(0)


Target = Callable[[Settings], Coroutine[Any, Any, None]]


def _worker_main(target: Target, settings: Settings, index: int, supervisor_pid: int) -> None:  # in a spawned process
    import asyncio

    from . import logs

    _die_with(supervisor_pid)
    logs.setup(settings.log_level)
    log.info("worker started", extra={"worker": index, "pid": os.getpid(), "port": settings.port})
    asyncio.run(target(settings))


class Supervisor:
    """Runs ``target(settings)`` (a module-level coroutine function, e.g. ``cli.serve``) in N
    spawned worker processes; it never imports the CLI."""

    def __init__(self, settings: Settings, target: Target) -> None:
        self.settings = settings
        self.target = target
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, BaseProcess] = {}
        self.stopping = False
        self.port = 0
        self.metrics_dir = ""
        self._own_dir = False
        self._httpd = None
        self.exit_codes: list[int | None] = []

    def _start(self, index: int) -> None:
        p = self.ctx.Process(target=_worker_main,
                             args=(self.target, worker_settings(self.settings, self.port), index, os.getpid()),
                             name=f"hashguard-worker-{index}", daemon=False)
        p.start()
        self.procs[index] = p

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if not self.stopping:
            log.info("draining workers", extra={"signal": signal.Signals(signum).name,
                                                "grace_s": self.settings.grace_s})
        self.stopping = True
        for p in self.procs.values():
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    def start(self) -> None:
        s = self.settings
        self.port = reserve_port(s.host, s.port, "port", "gRPC")
        if s.rest_port:
            reserve_port(s.host, s.rest_port, "rest_port", "REST")
        self._own_dir = not os.environ.get(MULTIPROC_ENV)
        self.metrics_dir = prepare_multiproc_dir()
        if s.metrics_port:
            self._httpd = _serve_metrics(self.metrics_dir, s.metrics_port, s.metrics_host)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for i in range(s.workers):
            self._start(i)
        log.info("supervisor started", extra={"workers": s.workers, "port": self.port,
                                              "metrics_dir": self.metrics_dir})

    def run(self) -> int:
        """Until every worker has exited after a stop signal; restarts crashed workers."""
        deadline = None
        while self.procs:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.settings.grace_s + KILL_MARGIN_S
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            wait([p.sentinel for p in self.procs.values()], timeout)
            for index, p in list(self.procs.items()):
                if p.is_alive():
                    continue
                p.join()
                if p.pid is not None:
                    forget_worker_gauges(self.metrics_dir, p.pid)
                if self.stopping:
                    self.procs.pop(index)
                    self.exit_codes.append(p.exitcode)
                    continue
                log.warning("worker died, starting it again", extra={"worker": index, "pid": p.pid,
                                                                     "exitcode": p.exitcode})
                time.sleep(RESTART_DELAY_S)
                if not self.stopping:
                    self._start(index)
            if deadline is not None and time.monotonic() >= deadline:
                for p in self.procs.values():
                    if p.is_alive():
                        log.warning("worker did not drain in time, killing it", extra={"pid": p.pid})
                        p.kill()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._own_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        # -SIGTERM: a worker stopped before it had installed its handlers (still starting, nothing in flight)
        return 0 if all(code in (0, -signal.SIGTERM) for code in self.exit_codes) else 1


def supervise(settings: Settings, target: Target) -> int:
    sup = Supervisor(settings, target)
    try:
        sup.start()
    except StartupError as exc:
        print(f"hashguard-sidecar: {exc}", file=sys.stderr)
        return 2
    return sup.run()
