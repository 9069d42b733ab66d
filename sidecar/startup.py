"""Start-up checks: everything that can stop a start is found before any port is served.

``preflight(settings)`` checks the files the flags name and that every port the
sidecar will listen on (gRPC, REST, metrics) is free. A failure is a
``StartupError`` with one line a person can act on; ``hashguard-sidecar``
prints it and exits with status 2. Values themselves are checked earlier, by
``Settings`` (``ValueError``).
"""

from __future__ import annotations

import errno
import socket

from .config import Settings, check_files

PORT_FLAGS = (("port", "gRPC"), ("rest_port", "REST"), ("metrics_port", "metrics"))


class StartupError(Exception):
    """The sidecar cannot start as configured (one line, no traceback)."""


def probe_port(host: str, port: int) -> tuple[int, str | None]:
    """Bind ``host:port`` as a server binds (SO_REUSEADDR, no SO_REUSEPORT) and let go.
    Returns (the bound port, None), a free port when ``port`` is 0, or (port, why not)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return port, f"cannot resolve host {host!r}: {exc.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return port, "address already in use (another sidecar or service is listening there)"
            return port, exc.strerror or str(exc)
        return s.getsockname()[1], None


def reserve_port(host: str, port: int, flag: str, what: str) -> int:
    """``port`` (or a free one for 0) if it can be bound, else ``StartupError``."""
    bound, problem = probe_port(host, port)
    if problem:
        raise StartupError(f"{what} port {host}:{port} (--{flag.replace('_', '-')}): {problem}")
    return bound


def check_ports(settings: Settings) -> None:
    """Every port is free. A worker of ``--workers N`` shares the gRPC and REST ports
    with its siblings (SO_REUSEPORT): the supervisor checked those before starting it."""
    seen: dict[int, str] = {}
    shared = settings.workers > 1
    for name, what in PORT_FLAGS:
        port = getattr(settings, name)
        if not port or (shared and name != "metrics_port"):
            continue
        if port in seen:
            raise StartupError(f"--{name.replace('_', '-')} {port}: the same port as the {seen[port]} port")
        seen[port] = what
        host = getattr(settings, "metrics_host", settings.host) if name == "metrics_port" else settings.host
        reserve_port(host, port, name, what)


def preflight(settings: Settings) -> None:
    try:
        check_files(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    check_ports(settings)


MMAP_THRESHOLD = 128 << 10


def return_large_buffers() -> bool:
    """Make glibc give every buffer above 128 KiB back to the system when it is freed.

    By default glibc raises its mmap threshold to the size of the largest block it
    has freed (up to 32 MiB), so after one 16 MiB request body every later body,
    inflated stream or decoded image is carved from the heap and stays resident:
    measured over the hostile corpus (``benchmarks/bench_hostile.py``), RSS grew
    63 MB above idle and stayed there; with a fixed threshold the peak was 30 MB
    above idle. Same as MALLOC_MMAP_THRESHOLD_=131072. False where not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD; also ends the dynamic threshold
    except (OSError, AttributeError):
        return False
