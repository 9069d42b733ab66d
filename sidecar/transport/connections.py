"""Connections and file descriptors: how many a port may hold, and what happens
at the limit.

Every accepted connection is a file descriptor, and the process has a limit
(RLIMIT_NOFILE) shared by the REST port, the gRPC port, the backend channel,
the session store and every file. Before this module, connections that never
finished their headers were never closed: about 20,000 of them used every
descriptor, and then new REST *and* gRPC clients timed out (accept fails with
EMFILE, asyncio and gRPC back off and retry).

* ``raise_nofile()`` raises the soft limit to the hard limit at start (what a
  container runtime grants), and ``connection_cap`` keeps each port's cap
  below half of what is left after ``RESERVED_FDS``, so REST and gRPC
  together never exhaust it.
* ``CappedConnections`` wraps aiohttp's server: at the cap, a new REST
  connection closes the OLDEST connection that has no request in progress
  (idle keep-alive, or still sending its head), so a flood of idle
  connections cannot lock out new clients; when every connection is busy,
  the new one is closed instead. Idle connections are also closed by the
  header/idle timeout (aiohttp's ``keepalive_timeout``, which runs from the
  moment a connection opens).
* gRPC: ``grpc_options`` sets grpc core's own connection cap
  (``grpc.max_allowed_incoming_connections``), the time a new connection has
  to complete its HTTP/2 handshake (``grpc.server_handshake_timeout_ms``)
  and the concurrent streams per connection.
"""

from __future__ import annotations

import logging
import resource
from collections import OrderedDict

log = logging.getLogger("hashguard.connections")

RESERVED_FDS = 1024  # backend channel, session store, metrics, files, logs: never used by client connections
MAX_CONCURRENT_STREAMS = 100  # per gRPC connection, as most HTTP/2 servers default


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    big = 1 << 20
    if soft == resource.RLIM_INFINITY:
        return big
    target = big if hard == resource.RLIM_INFINITY else hard
    if soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the file-descriptor limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
        return soft


def connection_cap(configured: int, nofile: int) -> int:
    """Connections ONE port may hold: ``configured``, lowered so that two ports at
    their caps leave ``RESERVED_FDS`` descriptors."""
    return max(1, min(configured, (nofile - RESERVED_FDS) // 2))


def grpc_options(cap: int, handshake_timeout_s: float) -> list[tuple[str, int]]:
    return [
        ("grpc.max_allowed_incoming_connections", cap),
        ("grpc.server_handshake_timeout_ms", int(handshake_timeout_s * 1000)),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
    ]


class CappedConnections:
    """At most ``cap`` connections on an aiohttp ``web.Server``; the oldest idle
    one makes room for a new one. ``busy(protocol)`` / ``idle(protocol)`` are
    called around every request by the REST adapter."""

    def __init__(self, server, cap: int, on_evict=None) -> None:
        self.cap = cap
        self.on_evict = on_evict
        self._open: OrderedDict = OrderedDict()  # protocol -> transport, oldest first
        self._busy: set = set()
        self.evicted = 0
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler, transport):
            made(handler, transport)
            self._open[handler] = transport
            if len(self._open) > self.cap:
                self._make_room(handler)

        def connection_lost(handler, exc=None):
            self._open.pop(handler, None)
            self._busy.discard(handler)
            lost(handler, exc)

        server.connection_made = connection_made
        server.connection_lost = connection_lost

    def __len__(self) -> int:
        return len(self._open)

    def busy(self, handler) -> None:
        if handler in self._open:
            self._busy.add(handler)
            self._open.move_to_end(handler)

    def idle(self, handler) -> None:
        self._busy.discard(handler)

    def _make_room(self, newcomer) -> None:
        victim = next((h for h in self._open if h is not newcomer and h not in self._busy), newcomer)
        transport = self._open.pop(victim, None)
        self.evicted += 1
        if self.on_evict:
            self.on_evict()
        if transport is not None:
            transport.close()
