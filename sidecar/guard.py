"""The data plane: validate, judge, forward, commit, pad. Protocol-agnostic;
``servicer.py`` adapts it to gRPC.

Order of work per call, chosen so that bad input and backend failures never
touch session state:
1. resolve the model's signature (unknown model/signature -> NOT_FOUND);
2. validate and stack the images (-> INVALID_ARGUMENT / RESOURCE_EXHAUSTED);
3. fingerprint every image (pure);
4. under the session's lock: plan the judgment, forward what must be forwarded
   in ONE backend call, and only when it succeeded commit the new anchors;
5. outside the lock: hold the answer as the time layer says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from .backend import Backend, ModelKey, Prediction
from .errors import BackendUnavailable, InvalidInput, TooLarge
from .images import fit_signature
from .crosssession import CrossSessionIndex
from .judgment import Fingerprint, Thresholds, plan, resolve
from .metrics import Metrics
from .padding import Padder
from .policy import Answer, OutputPolicy, apply
from .sessions import SessionStore

log = logging.getLogger("hashguard.guard")


@dataclass(frozen=True)
class JudgmentSettings:
    mode: str = "paper"  # paper | hardened | off
    thresholds: Thresholds = Thresholds()
    history: int = 8  # hardened only; paper keeps exactly one anchor
    max_batch: int = 1024

    @property
    def anchors_kept(self) -> int:
        return 1 if self.mode == "paper" else self.history


@dataclass(frozen=True)
class Outcome:
    answers: list[Answer]  # what the output policy lets the client see, per image
    version: int
    forwarded: int
    seconds: float


def query_bytes(image: np.ndarray) -> bytes:
    """The exact query, for keyed output noise: same bytes, same answer."""
    return f"{image.dtype.str}{image.shape}".encode() + image.tobytes()


class Guard:
    def __init__(self, settings: JudgmentSettings, backend: Backend, store: SessionStore,
                 padder: Padder, metrics: Metrics, index: CrossSessionIndex | None = None,
                 policy: OutputPolicy = OutputPolicy()) -> None:
        self.settings = settings
        self.policy = policy
        self.index = index
        self.backend = backend
        self.store = store
        self.padder = padder
        self.metrics = metrics

    async def classify(self, key: ModelKey, images: list[np.ndarray], session: str) -> Outcome:
        started = time.perf_counter()
        if not images:
            raise InvalidInput("no images given")
        if len(images) > self.settings.max_batch:
            raise TooLarge(f"{len(images)} images in one call; the limit is {self.settings.max_batch}")
        sig = await self.backend.signature(key)
        batch = fit_signature(images, sig.input_shape)
        mode = self.settings.mode
        if mode == "off":
            predictions = await self._forward(key, batch)
            forwarded = len(predictions)
        else:
            fps = [Fingerprint.of(img) for img in images]
            model_id = index_key(key)
            async with self.store.hold(session_key(session, key)) as slot:
                lookup = self.index.lookup(model_id) if self.index is not None else None
                p = plan(slot.anchors, fps, self.settings.thresholds, self.settings.anchors_kept, lookup)
                picks = [i for i, step in enumerate(p.steps) if step.forward]
                results = await self._forward_indexed(model_id, key, batch, picks, p.forwarded)
                per_step, anchors = resolve(p, results)
                # cross-session hits on images still in flight wait for their answer
                predictions = [await r if isinstance(r, asyncio.Future) else r for r in per_step]
                slot.anchors = anchors
            forwarded = len(picks)
            self._count_sources(key.name, p.steps)
            self._log_decisions(session, key, p.steps)
        answers = [apply(self.policy, p.scores, query_bytes(img)) for p, img in zip(predictions, images)]
        await self._pad(key.name, len(images), forwarded, started)
        return Outcome(answers, predictions[0].version, forwarded, time.perf_counter() - started)

    async def _forward_indexed(self, model_id: str, key: ModelKey, batch: np.ndarray, picks: list[int],
                               forwarded) -> list[Prediction]:
        """Forward ``batch[picks]``; in hardened mode announce them to the
        cross-session index first and index them once answered."""
        if not picks:
            return []
        if self.index is None:
            return await self._forward(key, batch[picks])
        futures = self.index.reserve(model_id, forwarded)
        try:
            results = await self._forward(key, batch[picks])
        except BaseException as exc:
            self.index.abandon(model_id, futures, exc if isinstance(exc, Exception) else BackendUnavailable("cancelled"))
            raise
        self.index.complete(model_id, forwarded, futures, results)
        return results

    async def _forward(self, key: ModelKey, batch: np.ndarray) -> list[Prediction]:
        t0 = time.perf_counter()
        scores, version = await self.backend.predict(key, batch)
        self.metrics.backend_latency.labels(key.name).observe(time.perf_counter() - t0)
        return [Prediction(row, version) for row in scores]

    async def _pad(self, model: str, n: int, forwarded: int, started: float) -> None:
        m = self.metrics
        mode = self.settings.mode
        cached = n - forwarded
        m.images.labels(model, mode).inc(n)
        m.forwards.labels(model, mode).inc(forwarded)
        elapsed = time.perf_counter() - started
        if cached == 0:
            self.padder.observe_forward(model, n, elapsed)
        slept = await self.padder.hold(started, self.padder.target(model, n, cached=cached > 0))
        m.padding.labels(model).observe(slept)
        m.response_latency.labels(model, str(cached > 0).lower()).observe(time.perf_counter() - started)
        m.sessions.set(len(self.store))

    def _count_sources(self, model: str, steps) -> None:
        for source in ("session", "lookup"):
            n = sum(1 for s in steps if s.source == source)
            if n:
                self.metrics.cache_answers.labels(model, self.settings.mode, source).inc(n)

    def _log_decisions(self, session: str, key: ModelKey, steps) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        for i, s in enumerate(steps):
            c = s.comparison
            log.debug("judged", extra={"session": session, "model": key.name, "index": i, "forward": s.forward,
                                        "n_hash": c.n_hash if c else None, "n_pixel": c.n_pixel if c else None})


def index_key(key: ModelKey) -> str:
    return f"{key.name}\x1f{key.version}\x1f{key.signature}"


def session_key(session: str, key: ModelKey) -> str:
    """Anchors are per session AND model: one model's answer never answers another."""
    return f"{session}\x1f{index_key(key)}"
