"""The one counters reader: a sidecar's Prometheus exposition (its /metrics page).

A ``Counters`` reads from an URL (a sidecar process's ``/metrics``) or from a
callable returning the same text (an in-process sidecar's registry rendered by
``prometheus_client.generate_latest``): one parser, one meaning. ``snapshot(model)``
gives the images judged, forwarded and answered from a session anchor or the
cross-session index; subtract two snapshots (``delta``) for one request's or one
cell's ground truth. Clients never see these: they are the experiments' truth.
"""

from __future__ import annotations

import urllib.request
from typing import Callable

IMAGES = "hashguard_images_total"
FORWARDS = "hashguard_forwards_total"
CACHE = "hashguard_cache_answers_total"
FIELDS = ("images", "forwards", "cached", "cache_session", "cache_lookup")


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(sample name, frozenset(labels.items())): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): float(s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class Counters:
    def __init__(self, source: str | Callable[[], str], timeout: float = 5.0) -> None:
        if isinstance(source, str) and not source.endswith("/metrics"):
            source = source.rstrip("/") + "/metrics"
        self.source, self.timeout = source, timeout

    def text(self) -> str:
        if callable(self.source):
            return self.source()
        with urllib.request.urlopen(self.source, timeout=self.timeout) as r:
            return r.read().decode()

    def snapshot(self, model: str) -> dict[str, float]:
        s = parse(self.text())
        session, lookup = total(s, CACHE, model=model, source="session"), total(s, CACHE, model=model, source="lookup")
        return {"images": total(s, IMAGES, model=model), "forwards": total(s, FORWARDS, model=model),
                "cached": total(s, CACHE, model=model), "cache_session": session, "cache_lookup": lookup}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def one_request(counters: "Counters", model: str, before: dict[str, float]) -> tuple[bool, dict[str, float]]:
    """Whether the one request since ``before`` was answered from a cache; the new snapshot.
    Raises when the counters moved by anything but exactly one image (someone else talks to it)."""
    now = counters.snapshot(model)
    d = delta(now, before)
    if d["cached"] + d["forwards"] != 1:
        raise RuntimeError(f"counters moved by {d['cached']} cached + {d['forwards']} forwarded, expected one image")
    return d["cached"] == 1, now
