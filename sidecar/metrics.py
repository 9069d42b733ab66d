"""Prometheus metrics. Cache decisions are visible here and in logs only, never
in a response."""

from __future__ import annotations

import threading
from typing import cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

_LAT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self, mode: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.mode = mode
        self.requests = Counter("hashguard_requests", "RPCs handled", ["method", "model", "mode"], registry=r)
        self.images = Counter("hashguard_images", "Images judged", ["model", "mode"], registry=r)
        self.forwards = Counter("hashguard_forwards", "Images forwarded to the model", ["model", "mode"], registry=r)
        self.cache_answers = Counter("hashguard_cache_answers", "Images answered from an anchor", ["model", "mode", "source"], registry=r)
        self.backend_latency = Histogram("hashguard_backend_latency_seconds", "Backend Predict latency", ["model"], buckets=_LAT_BUCKETS, registry=r)
        self.response_latency = Histogram("hashguard_response_latency_seconds", "Latency of answers after padding", ["model", "cached"], buckets=_LAT_BUCKETS, registry=r)
        self.padding = Histogram("hashguard_padding_seconds", "Time added by the time layer", ["model"], buckets=_LAT_BUCKETS, registry=r)
        self.padding_late = Counter("hashguard_padding_late", "Answers not ready by the release time the time layer fixed at arrival (they leave when ready)", ["model", "cached"], registry=r)
        self.padding_lateness = Histogram("hashguard_padding_lateness_seconds", "How far past its release time a late answer was ready", ["model"], buckets=_LAT_BUCKETS, registry=r)
        self.cover_forwards = Counter("hashguard_cover_forwards", "Cached images sent to the model anyway, answer dropped (time layer: --cover-forwards)", ["model"], registry=r)
        self.cover_forwards_failed = Counter("hashguard_cover_forwards_failed", "Cover forwards the backend did not answer (the cached answer was given)", ["model"], registry=r)
        self.sessions = Gauge("hashguard_sessions", "Sessions held", registry=r)
        self.evictions = Counter("hashguard_session_evictions", "Sessions evicted", ["reason"], registry=r)
        self.errors = Counter("hashguard_errors", "Failed RPCs by status", ["method", "code"], registry=r)
        self.backend_up = Gauge("hashguard_backend_up", "1 while the backend channel is ready", registry=r)
        self.store_up = Gauge("hashguard_store_up", "1 while the session store answers", registry=r)
        self.near_duplicate_budget = Counter("hashguard_near_duplicate_budget_answers", "Hardened: queries answered from their principal's own nearest earlier answer because its near-duplicate budget for that image was spent (nothing is refused)", ["model"], registry=r)
        self.index_replication_lag = Histogram("hashguard_index_replication_lag_seconds", "Hardened, shared index: from another replica's announcement to this replica's background reader applying it", buckets=_LAT_BUCKETS, registry=r)
        self.store_resets = Counter("hashguard_store_resets", "Times the shared session store was found to have lost its data", registry=r)
        self.info = Gauge("hashguard_mode", "Judgment mode of this deployment", ["mode"], registry=r)
        self.info.labels(mode).set(1)
        for family in (self.requests, self.images, self.forwards, self.cache_answers, self.backend_latency,
                       self.response_latency, self.padding, self.padding_late, self.padding_lateness, self.errors):
            _cache_children(family)

        self._httpd: WSGIServer | None = None
        self._serving = False

    def bind(self, port: int, host: str = "127.0.0.1") -> int:
        """Bind the /metrics port without serving yet (start-up checks every port first).
        Raises OSError when the port is taken. Returns the bound port."""
        self._httpd = http_server(make_wsgi_app(self.registry), host, port)
        return self._httpd.server_port

    def serve_bound(self) -> None:
        assert self._httpd is not None, "bind() first"
        self._serving = True
        threading.Thread(target=self._httpd.serve_forever, name="hashguard-metrics", daemon=True).start()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        bound = self.bind(port, host)
        self.serve_bound()
        return bound

    def close(self) -> None:
        if self._httpd is not None:
            if self._serving:  # shutdown() waits for serve_forever: only when it runs
                self._httpd.shutdown()
            self._serving = False
            self._httpd.server_close()
            self._httpd = None


def _cache_children(family, limit: int = 4096) -> None:
    """Make ``family.labels(*values)`` a dict lookup once a child exists: prometheus_client
    takes a lock and rebuilds the label tuple on every call, about 3 us, six times a call
    on the hot path. Bounded: the cache starts over past ``limit`` label sets (the
    family itself keeps every child, as before)."""
    make, cache = family.labels, cast(dict[tuple, object], {})

    def labels(*values, **kw):
        if kw:
            return make(*values, **kw)
        child = cache.get(values)
        if child is None:
            if len(cache) >= limit:
                cache.clear()
            child = cache[values] = make(*values)
        return child

    family.labels = labels


def http_server(app, host: str, port: int) -> WSGIServer:
    """The /metrics HTTP server (threaded, no access log), bound but not serving yet.
    Raises OSError when the port is taken."""
    return make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)


class _QuietHandler(WSGIRequestHandler):
    # a scrape that does not send its request in this time is dropped: each connection
    # holds one thread of the ThreadingWSGIServer, so an idle one must not hold it forever
    timeout = 10

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass
