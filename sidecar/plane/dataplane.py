"""The data plane: the one protocol-agnostic place that decides what is
authenticated, judged, forwarded and padded. Transports (``grpc_classifier``,
``grpc_prediction``, ``rest``) only convert wire <-> ``ImageCall``/``Outcome``.

Entry points
- ``authenticate(authorization, cert_names)``: the caller's principal (or None
  on an open deployment); every transport calls it before routing anything.
- ``infer(ImageCall)``: an image classification, judged.
- ``passthrough(method, request)``: metadata/status calls go to the backend
  as they are; methods that make the model compute on caller-chosen input
  without judgment (Classify/Regress/MultiInference of TF Serving) are refused
  unless the operator allowed them with ``--passthrough``.

Order of work per ``infer``, chosen so that bad input and backend failures
never touch session state:
1. resolve the model reference to the SERVED version and its signature
   ("latest", labels and explicit numbers of one served model are one key);
2. validate and stack the images (declared tensor shapes are checked before
   anything is expanded);
3. fingerprint every image (pure);
4. under the session's lock: plan the judgment, forward what must be forwarded
   in ONE backend call, and only when it succeeded commit the new anchors;
5. render every answer through the output policy;
6. outside the lock: release the answer at the deadline the time layer fixed
   when the call arrived (before step 3), through the same await for a cached
   answer and a forwarded one; only what is returned differs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..backend.base import Backend, ModelKey, ModelRef, Prediction, Signature
from ..state.crosssession import CrossSessionIndex
from ..errors import Abandoned, BackendUnavailable, InvalidInput, NotFound, Refused, TooLarge
from .identity import Caller, IdentityPolicy, authenticate, principal_for, session_for
from ..wire.images import MAX_PIXELS, fit_signature
from .images import Images
from ..judge.judgment import Anchor, Fingerprint, PlanStep, Thresholds, compare, fingerprints, plan, resolve
from ..metrics import Metrics
from .padding import Padder
from ..judge.policy import Answer, OutputPolicy, apply, dense
from ..state.sessions import SessionStore
from .methods import OPEN_METHODS, UNPROTECTED, check_passthrough

log = logging.getLogger("hashguard.dataplane")

# Metric label of a model name the backend has not (yet) answered for: callers choose
# names, so only served ones become label values (at most MAX_LABELLED_MODELS of them)
UNKNOWN_MODEL = "_unknown"
MAX_LABELLED_MODELS = 1000


@dataclass(frozen=True)
class JudgmentSettings:
    mode: str = "paper"  # paper | hardened | off
    thresholds: Thresholds = Thresholds()
    history: int = 8  # hardened only; paper keeps exactly one anchor
    max_batch: int = 1024
    cover: bool = False  # time layer: cached answers still send their images to the model (see ``_cover``)

    @property
    def anchors_kept(self) -> int:
        return 1 if self.mode == "paper" else self.history


@dataclass(frozen=True)
class ImageCall:
    """One classification call, as every transport hands it over."""

    method: str  # for metrics and logs: "Classify", "Predict", "rest:predict", ...
    model: ModelRef
    images: Images  # as the transport received them (plane/images.py)
    caller: Caller = Caller()
    session_id: str = ""  # a session id the request itself carries (open deployments)
    input_name: str | None = None  # the input the caller named; must be the signature's


@dataclass(frozen=True)
class Outcome:
    answers: list[Answer]  # what the output policy lets the client see, per image
    key: ModelKey  # the served model that answered
    signature: Signature
    forwarded: int
    seconds: float

    @property
    def version(self) -> int:
        return self.key.version

    def dense(self) -> np.ndarray:
        """[n, classes] float32 for tensor APIs (Predict, REST)."""
        classes = (max(len(a.scores) for a in self.answers) or self.signature.num_classes
                   or 1 + max(a.label for a in self.answers))
        return np.stack([dense(a, classes) for a in self.answers])


def gave_up(caller: Caller | None) -> str:
    """"deadline" or "cancelled" once the caller has given up, else "" (also when it cannot tell)."""
    return caller.gone() if caller is not None and caller.gone is not None else ""


def query_bytes(image: np.ndarray) -> bytes:
    """The exact query, for keyed output noise: same bytes, same answer."""
    return f"{image.dtype.str}{image.shape}".encode() + image.tobytes()


def index_key(key: ModelKey) -> str:
    return f"{key.name}\x1f{key.version}\x1f{key.signature}"


def session_key(session: str, key: ModelKey) -> str:
    """Anchors are per session AND served model: one model's answer never answers another."""
    return f"{session}\x1f{index_key(key)}"


class CrossSessionHook:
    """Hardened mode's ONLY contact with the cross-session index: a finder for
    ``plan`` and the forward that announces images in flight and indexes the
    answers. Without an index both are no-ops. Swap this object to change how
    judgments use memory across sessions."""

    def __init__(self, index: CrossSessionIndex | None) -> None:
        self.index = index

    def finder(self, model_id: str, principal: str = ""):
        return self.index.lookup(model_id, principal) if self.index is not None else None

    async def forward(self, model_id: str, fps: Sequence[Fingerprint],
                      send: Callable[[], Any], principal: str = "") -> list[Prediction]:
        if self.index is None:
            return await send()
        futures = self.index.reserve(model_id, fps, principal)
        try:
            await self.admit(model_id, fps, principal)
            results = await send()
        except BaseException as exc:
            self.index.abandon(model_id, futures, exc if isinstance(exc, Exception) else BackendUnavailable("cancelled"))
            raise
        self.index.complete(model_id, fps, futures, results)
        return results

    async def admit(self, model_id: str, fps: Sequence[Fingerprint], principal: str = "") -> None:
        """Last word before images reserved in the index are sent (a replicated index
        announces them here); one process decided everything in ``plan``."""


class _Route:
    """What every call to one served model shares, made once: its index/session key
    part and its metric children."""

    __slots__ = ("model_id", "_cached", "_requests", "_metrics", "_name", "_mode")

    def __init__(self, key: ModelKey, metrics: Metrics, mode: str) -> None:
        self.model_id = index_key(key)
        self._cached = None  # made with the first cached answer: no series before there is one
        self._requests: dict[str, Any] = {}
        self._metrics, self._name, self._mode = metrics, key.name, mode

    def requests(self, method: str):
        child = self._requests.get(method)
        if child is None:
            child = self._requests[method] = self._metrics.requests.labels(method, self._name, self._mode)
        return child

    def cached_session(self):
        if self._cached is None:
            self._cached = self._metrics.cache_answers.labels(self._name, self._mode, "session")
        return self._cached


class DataPlane:
    def __init__(self, settings: JudgmentSettings, backend: Backend, store: SessionStore, padder: Padder,
                 metrics: Metrics, index: CrossSessionIndex | None = None, policy: OutputPolicy = OutputPolicy(),
                 identity: IdentityPolicy = IdentityPolicy(), passthrough: frozenset[str] = frozenset(),
                 max_image_pixels: int = MAX_PIXELS, max_model_name_len: int = 256) -> None:
        check_passthrough(frozenset(passthrough))  # ValueError for an unknown method
        self.settings = settings
        self.backend = backend
        self.store = store
        self.padder = padder
        self.metrics = metrics
        self.index = index
        self.crossing = CrossSessionHook(index)
        self.policy = policy
        self.identity = identity
        self.allowed = OPEN_METHODS | {UNPROTECTED[m] for m in passthrough}
        self.max_image_pixels = max_image_pixels
        self._routes: dict[ModelKey, _Route] = {}
        self.max_model_name_len = max_model_name_len
        self._served_names: set[str] = set()  # names the backend answered for: metric labels

    # ------------------------------------------------------------------ authentication
    def authenticate(self, authorization: str = "", cert_names: Sequence = ()) -> str | None:
        return authenticate(self.identity, authorization, cert_names)

    # ------------------------------------------------------------------ model names
    def check_model_name(self, name: str) -> None:
        """A name longer than any served model may have is NOT_FOUND without asking the
        backend (TF Serving answers NOT_FOUND for a name it does not serve); checked
        like the session id, before anything else is done for the call."""
        if len(name) > self.max_model_name_len:
            raise NotFound(f"Servable not found for request: a model name of {len(name)} characters "
                           f"(served names have at most {self.max_model_name_len})")

    def served(self, name: str) -> None:
        """The backend answered for ``name``: it may be a metric label from now on."""
        if name not in self._served_names and len(self._served_names) < MAX_LABELLED_MODELS:
            self._served_names.add(name)

    def model_label(self, name: str) -> str:
        return name if name in self._served_names else UNKNOWN_MODEL

    # ------------------------------------------------------------------ pass-through
    async def passthrough(self, method: str, request: Any) -> Any:
        name = getattr(getattr(request, "model_spec", None), "name", "")
        try:
            self.check_model_name(name)
            self.check_allowed(method)
            response = await self.backend.passthrough(method, request)
            if name:
                self.served(name)
            return response
        finally:  # counted once the backend has said whether the name is served
            self.metrics.requests.labels(method, self.model_label(name), self.settings.mode).inc()

    async def require_model(self, ref: ModelRef) -> None:
        """NotFound when the backend serves no such model (version, label).

        TF Serving answers an unknown model with NOT_FOUND ("Servable not found
        ...") before it looks at the inputs, and clients wait for that answer
        (TF Serving's own tests poll for it), so a transport that rejects a
        request's inputs asks this first. Other backend failures are not the
        caller's question here: the input error stands.
        """
        try:
            await self.backend.resolve(ref)
        except NotFound:
            raise
        except Exception:  # noqa: BLE001 - see above
            return

    def check_allowed(self, method: str) -> None:
        if method in self.allowed:
            return
        flag = next((f for f, m in UNPROTECTED.items() if m == method), None)
        if flag is None:
            raise Refused(f"{method} is not served by hashguard")
        raise Refused(f"{method} is refused: it would reach the model unjudged. An operator can allow it, "
                      f"unprotected, with --passthrough {flag}")

    # ------------------------------------------------------------------ judged inference
    async def infer(self, call: ImageCall) -> Outcome:
        started = time.perf_counter()
        self.check_model_name(call.model.name)
        self._check_count(call.images)
        served = self.backend.cached(call.model)  # a cached resolution costs no coroutine
        if served is None:
            served = await self.backend.resolve(call.model)
        key, sig = served.key, served.signature
        self.served(key.name)
        route = self._route(key)
        if call.input_name is not None and call.input_name != sig.input_name:
            raise InvalidInput(f"model {key.name!r} expects input {sig.input_name!r}, got {call.input_name!r}")
        images = await call.images.arrays(sig, self.max_image_pixels)
        if len(images) == 1 and call.images.checked:
            # arrays() checked the image against the signature's shape: fit_signature's stack of one
            batch = images[0].astype(np.float32)[None]
        else:
            batch = fit_signature(images, sig.input_shape)
        # one schedule for hits and misses: fixed before anything is judged
        release_at = self.padder.deadline(started, key.name, len(images))
        session = session_for(self.identity, call.caller, call.session_id)
        principal = principal_for(call.caller)
        route.requests(call.method).inc()
        if self.settings.mode == "off":
            self._check_waiting(call.caller)
            predictions = await self._forward(key, batch)
            forwarded = len(predictions)
        elif len(images) == 1 and self.index is None and self.settings.anchors_kept == 1:
            predictions, forwarded = await self._judge_one(key, route, images[0], batch, session, call.caller)
        else:
            predictions, forwarded = await self._judge(key, images, batch, session, principal, call.caller)
        answers = [apply(self.policy, p.scores, query_bytes(img)) for p, img in zip(predictions, images)]
        await self._release(key.name, len(images), forwarded, started, release_at)
        return Outcome(answers, key, sig, forwarded, time.perf_counter() - started)

    @staticmethod
    def _check_waiting(caller: Caller | None) -> None:
        """Refuse to forward for a caller that has given up: the model would compute an
        answer nobody reads, and (judged) the session would commit anchors for it."""
        reason = gave_up(caller)
        if reason:
            raise Abandoned("the caller gave up (deadline passed or cancelled) before the call was forwarded",
                            cancelled=reason == "cancelled")

    def _check_count(self, images: Images) -> None:
        n = images.count()
        if n is None:
            return  # not a batch of images at all: arrays() says so (INVALID_ARGUMENT), nothing expanded
        if n == 0:
            raise InvalidInput("no images given")
        if n > self.settings.max_batch:
            raise TooLarge(f"{n} images in one call; the limit is {self.settings.max_batch}")

    async def _judge(self, key: ModelKey, images: list[np.ndarray], batch: np.ndarray,
                     session: str, principal: str = "", caller: Caller | None = None) -> tuple[list[Prediction], int]:
        hardened = self.settings.thresholds.lowpass_tau is not None
        fps = fingerprints(images, with_lowpass=hardened, with_invariant=hardened and self.index is not None)
        model_id = index_key(key)
        async with self.store.hold(session_key(session, key)) as slot:
            p = plan(slot.anchors, fps, self.settings.thresholds, self.settings.anchors_kept,
                     self.crossing.finder(model_id, principal))
            picks = [i for i, step in enumerate(p.steps) if step.forward]
            if picks:
                self._check_waiting(caller)  # nothing sent yet, no anchor committed
            results = await self.crossing.forward(model_id, p.forwarded,
                                                  lambda: self._forward_picks(key, batch, picks),
                                                  principal) if picks else []
            if not picks and self.settings.cover:
                await self._cover(key, batch, caller)
            per_step, anchors = resolve(p, results)
            # cross-session hits on images still in flight wait for their answer
            predictions = [await r if isinstance(r, asyncio.Future) else r for r in per_step]
            slot.anchors = anchors
        self._count_sources(key.name, p.steps)
        self._log_decisions(session, key, p.steps)
        return predictions, len(picks)

    async def _judge_one(self, key: ModelKey, route: "_Route", image: np.ndarray, batch: np.ndarray,
                         session: str, caller: Caller = Caller()) -> tuple[list[Prediction], int]:
        """``_judge`` for one image against one anchor and no cross-session index (paper
        mode): ``plan`` with history 1 and no lookup decides exactly this (the last anchor,
        ``compare``, forward when not similar) without building a plan for one step."""
        fp = fingerprints((image,), with_lowpass=self.settings.thresholds.lowpass_tau is not None)[0]
        async with self.store.hold(session + "\x1f" + route.model_id) as slot:
            anchors = slot.anchors
            last = anchors[-1] if anchors else None
            cmp = compare(last.fingerprint, fp, self.settings.thresholds) if last is not None else None
            if last is not None and cmp is not None and cmp.similar:
                anchor = last
                result = anchor.result
                prediction = await result if isinstance(result, asyncio.Future) else result
                if self.settings.cover:
                    await self._cover(key, batch, caller)
                step = PlanStep(False, anchor, cmp, "session")
            else:
                self._check_waiting(caller)  # nothing sent yet, no anchor committed
                prediction = (await self._forward(key, batch))[0]
                anchor = Anchor(fp, prediction)
                step = PlanStep(True, anchor, cmp)
            slot.anchors = (anchor,)
        if not step.forward:
            route.cached_session().inc(1)
        self._log_decisions(session, key, (step,))
        return [prediction], int(step.forward)

    def _route(self, key: ModelKey) -> "_Route":
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) > 4096:  # callers choose model references: keep it bounded
                self._routes.clear()
            route = self._routes[key] = _Route(key, self.metrics, self.settings.mode)
        return route

    async def _forward_picks(self, key: ModelKey, batch: np.ndarray, picks: list[int]) -> list[Prediction]:
        """The model's answers for ``batch[picks]``. With cover on and some images cached,
        the whole batch goes (as for a call with nothing cached) and the cached rows'
        answers are dropped: the backend's work does not depend on the judgment."""
        if len(picks) == len(batch):
            return await self._forward(key, batch)
        if not self.settings.cover:
            return await self._forward(key, batch[picks])
        rows = await self._forward(key, batch)
        self.metrics.cover_forwards.labels(key.name).inc(len(batch) - len(picks))
        return [rows[i] for i in picks]

    async def _cover(self, key: ModelKey, batch: np.ndarray, caller: Caller | None) -> None:
        """The time layer's cover forward: a call answered wholly from caches sends its
        images to the model anyway, before its release, and drops the answer. The
        padding makes a hit leave at a forward's time; this makes the host do a
        forward's work, so nothing the model server and the sidecar leave behind (busy
        cores, cold caches, allocations) tells the next call whether this one was
        cached. Its failure changes nothing: the cached answer stands."""
        if gave_up(caller):
            return  # nobody reads this answer: like a forward, nothing is sent
        try:
            await self._forward(key, batch)
        except Exception as exc:  # noqa: BLE001 - the answer is the cache's; see above
            self.metrics.cover_forwards_failed.labels(key.name).inc(len(batch))
            log.debug("cover forward failed", extra={"model": key.name, "error": type(exc).__name__})
            return
        self.metrics.cover_forwards.labels(key.name).inc(len(batch))

    async def _forward(self, key: ModelKey, batch: np.ndarray) -> list[Prediction]:
        t0 = time.perf_counter()
        scores, version = await self.backend.predict(key, batch)
        self.metrics.backend_latency.labels(key.name).observe(time.perf_counter() - t0)
        return [Prediction(row, version) for row in scores]

    async def _release(self, model: str, n: int, forwarded: int, started: float, release_at: float) -> None:
        """The release point. All the work that differs between a cached and a forwarded
        answer is done before it; after it, both run the same code on the same kind of
        data (metric updates, the Outcome, the transport's rendering)."""
        m = self.metrics
        mode = self.settings.mode
        cached = n - forwarded
        m.images.labels(model, mode).inc(n)
        m.forwards.labels(model, mode).inc(forwarded)
        ready = time.perf_counter()
        if cached == 0:
            self.padder.observe_forward(model, n, ready - started)
        label = "true" if cached else "false"
        if ready > release_at > started:  # not ready by its deadline: leaves when ready
            m.padding_late.labels(model, label).inc()
            m.padding_lateness.labels(model).observe(ready - release_at)
        held = await self.padder.release(release_at)
        m.padding.labels(model).observe(held)
        m.response_latency.labels(model, label).observe(time.perf_counter() - started)
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
            log.debug("judged", extra={"session": session, "model": key.name, "version": key.version, "index": i,
                                        "forward": s.forward, "n_hash": c.n_hash if c else None,
                                        "n_pixel": c.n_pixel if c else None})
