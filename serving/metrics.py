"""Prometheus metrics of the model server, served on the REST port when
``--monitoring_config_file`` enables ``prometheus_config`` (TF Serving's names,
as far as this server has the same things to count)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServingMetrics", "CONTENT_TYPE_LATEST"]


class ServingMetrics:
    """One registry per server (several servers may live in one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_count = Counter(
            ":tensorflow:serving:request_count", "The total number of requests.",
            ["model_name", "status"], registry=self.registry)
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in seconds) for TensorFlow Serving request.",
            ["model_name", "API", "entrypoint"], registry=self.registry)
        self.model_versions = Gauge(
            ":tensorflow:serving:loaded_versions", "Versions loaded and available, per model.",
            ["model_name"], registry=self.registry)

    @contextlib.contextmanager
    def request(self, model: str, api: str, entrypoint: str) -> Iterator[Callable[[str], None]]:
        """``with metrics.request(...) as done: ...; done("OK")`` counts one request and its latency."""
        t0 = time.perf_counter()
        recorded: list[str] = []

        def done(status: str) -> None:
            if not recorded:
                recorded.append(status)
                self.request_count.labels(model, status).inc()
                self.request_latency.labels(model, api, entrypoint).observe(time.perf_counter() - t0)
        try:
            yield done
        finally:
            if not recorded:  # cancelled, or an error that escaped the handler
                done("UNKNOWN")

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
