"""Adaptive attacks on the judgment layer (workbook 06) and the cost of hardening.

An adaptive attacker knows how hashguard works (the paper's algorithm, the
perceptual hash, the thresholds) and shapes its queries around it. Every
strategy here is a ``Predictor`` wrapper: the unchanged attacks of
``lab.attacks`` (One Pixel DE) and ART's HopSkipJump call ``predict`` as usual,
and the wrapper decides how the queries reach the sidecar's gRPC API:

- ``plain``: one session, each ``predict`` one ``ClassifyBatch`` (the paper's attacker);
- ``interleave``: before every candidate an unrelated test image (a decoy) in the
  same ``ClassifyBatch`` (decoy, cand, decoy, cand, ...). Paper mode keeps ONE
  anchor, so the anchor is always the decoy and every candidate reaches the model;
- ``fresh_session``: every candidate in its own call with a new session id (many
  calls in flight at once, ``concurrency``): no session anchor ever applies;
- ``accounts``: N sessions (accounts) share one attack, candidates round-robin,
  each account's share of a ``predict`` one ``ClassifyBatch``, accounts in parallel;
  with ``auth=True`` the accounts are principals of an ``--auth-tokens`` sidecar;
- ``blinding``: every query is a randomly transformed copy of the candidate
  (shift by up to ``max_shift`` px with edge padding, brightness +-``brightness``,
  Gaussian noise ``sigma``). With ``ensure=True`` the attacker checks, with the
  public hash, that each blinded query is farther than the threshold from every
  query it sent before in this attack (hash) and from its recent ones (pixels),
  escalating the transform until it is: it passes the thresholds by construction.

Isolation: every experiment cell (strategy, mode, pixels) runs against a FRESH
sidecar (``LocalSidecar``: the real ``SidecarServer`` with the same flags as the
named sidecar of ``harness.SIDECARS``, in this process, on a loopback port, in
front of the running serving backend), so hardened mode's cross-session memory
starts empty in every cell and cells cannot help each other. The attacker still
sees the sidecar only through gRPC; the in-process server also gives exact
forward/cache counters per cell (the Prometheus registry, never the responses).

Ground truth for every returned adversarial image is the model's own answer
(the ``undefended`` sidecar, ``--mode off``, fresh session).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import grpc
import numpy as np

from sidecar.api import classifier_pb2 as pb
from sidecar.api import classifier_pb2_grpc as pb_grpc
from sidecar.judgment import PAPER_THRESHOLD
from sidecar.phash import HASH_BYTES, hamming, phash, pixel_diff

from .attacks.base import as_batch
from .client import SESSION_HEADER, _scores, encode

STRATEGIES = ("plain", "interleave", "fresh_session", "accounts", "blinding")
MODES = ("off", "paper", "hardened")


# -- fresh sidecars ---------------------------------------------------------------

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _sidecar_loop() -> asyncio.AbstractEventLoop:
    """One event loop thread for every in-process sidecar (grpc.aio wants one loop)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="lab-sidecars", daemon=True).start()
        return _LOOP


class LocalSidecar:
    """A real ``SidecarServer`` (grpc.aio on a loopback port) in this process, on a
    background event loop; built from command-line flags exactly as ``python -m
    sidecar`` would be. ``counters(model)`` reads its metrics registry."""

    def __init__(self, backend: str, mode: str, padding: str = "off", args: Sequence[str] = (),
                 name: str = "local") -> None:
        from sidecar.config import from_args

        argv = ["--backend", backend, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                "--mode", mode, "--padding", padding, "--log-level", "WARNING", *map(str, args)]
        self.name = name
        self.argv = argv
        self.settings = from_args(argv)
        self.mode = mode
        self._loop = _sidecar_loop()
        self._closed = False
        self.server = self._call(self._start())
        self.address = f"127.0.0.1:{self.server.port}"

    async def _start(self):
        import logging

        from sidecar.server import SidecarServer

        logging.getLogger("hashguard").setLevel(logging.WARNING)
        server = SidecarServer(self.settings)
        await server.start()
        return server

    def _call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def counters(self, model: str) -> dict[str, float]:
        """Images judged, forwarded, and answered from a session anchor / the cross-session index."""
        reg = self.server.metrics.registry
        lab = {"model": model, "mode": self.mode}

        def get(name, **extra):
            return reg.get_sample_value(name, {**lab, **extra}) or 0.0

        return {"images": get("hashguard_images_total"), "forwards": get("hashguard_forwards_total"),
                "cache_session": get("hashguard_cache_answers_total", source="session"),
                "cache_lookup": get("hashguard_cache_answers_total", source="lookup")}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._call(self.server.stop(0))

    def __enter__(self) -> "LocalSidecar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Noise key of every fresh sidecar built in this process from a keyed spec, so a
#: defended copy and its ``--mode off`` twin perturb the same query the same way.
LOCAL_NOISE_KEY = os.urandom(16).hex()


def sidecar_flags(ep, name: str) -> tuple[str, str, tuple[str, ...]]:
    """(mode, padding, flags) of the sidecar ``name``: as started (``ep``), else its
    ``harness.SIDECARS`` spec with this process's noise key."""
    from .harness import SIDECARS, spec_args

    if ep is not None and name in ep.sidecars and ep.sidecars[name].get("mode"):
        d = ep.sidecars[name]
        return d["mode"], d.get("padding") or "off", tuple(d.get("args") or ())
    s = SIDECARS[name]
    return s["mode"], s["padding"], spec_args(name, LOCAL_NOISE_KEY)


def fresh_sidecar(ep, name: str, extra_args: Sequence[str] = (), backend: str | None = None) -> LocalSidecar:
    """A fresh in-process sidecar with the flags of ``name`` (see ``sidecar_flags``) in
    front of the running serving backend: empty sessions and cross-session memory."""
    backend = backend or (ep.backend if ep is not None else None)
    if not backend:
        raise ValueError("no serving backend address (endpoints carry none)")
    mode, padding, args = sidecar_flags(ep, name)
    return LocalSidecar(backend, mode, padding, [*args, *extra_args], name=name)


def counter_delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


# -- transport ----------------------------------------------------------------------

class Transport(Protocol):
    """How strategies reach the service: ordered batches in named sessions."""

    def batch(self, session: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One ClassifyBatch in ``session``: (labels, scores), judged in order."""
        ...

    def many(self, calls: Sequence[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several such calls, possibly concurrently; results in call order."""
        ...


class GrpcTransport:
    """``Transport`` over the sidecar's Classifier API. ``tokens`` maps a session name
    to a bearer token (authenticated sidecars, where the principal is the session)."""

    def __init__(self, address: str, model: str, *, concurrency: int = 16, timeout: float = 120.0,
                 num_classes: int = 10, tokens: dict[str, str] | None = None,
                 channel: grpc.Channel | None = None) -> None:
        self.address = address
        self.model = model
        self.concurrency = max(1, int(concurrency))
        self.timeout = timeout
        self.num_classes = num_classes
        self.tokens = tokens or {}
        self._own = channel is None
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self._channel = channel or grpc.insecure_channel(address, options=opts)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self.calls = 0
        self.images = 0

    def _metadata(self, session: str):
        md = [(SESSION_HEADER, session)]
        if session in self.tokens:
            md.append(("authorization", f"Bearer {self.tokens[session]}"))
        return md

    def _request(self, session: str, images: np.ndarray):
        return pb.ClassifyBatchRequest(model=pb.ModelRef(name=self.model), images=[encode(im) for im in images],
                                       session_id=session)

    def _unpack(self, resp, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(resp.results) != n:
            raise RuntimeError(f"sidecar answered {len(resp.results)} of {n} images")
        labels = np.array([c.label for c in resp.results], np.int64)
        scores = np.stack([_scores(c, self.num_classes) for c in resp.results])
        return labels, scores

    def batch(self, session: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = as_batch(images)
        resp = self._stub.ClassifyBatch(self._request(session, images), timeout=self.timeout,
                                        metadata=self._metadata(session))
        self.calls += 1
        self.images += len(images)
        return self._unpack(resp, len(images))

    def many(self, calls: Sequence[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Up to ``concurrency`` calls in flight at once (gRPC futures on one channel)."""
        out: list = [None] * len(calls)
        inflight: list[tuple[int, object, int]] = []

        def drain_one():
            j, fut, n = inflight.pop(0)
            out[j] = self._unpack(fut.result(), n)

        for j, (session, images) in enumerate(calls):
            images = as_batch(images)
            fut = self._stub.ClassifyBatch.future(self._request(session, images), timeout=self.timeout,
                                                  metadata=self._metadata(session))
            self.calls += 1
            self.images += len(images)
            inflight.append((j, fut, len(images)))
            if len(inflight) >= self.concurrency:
                drain_one()
        while inflight:
            drain_one()
        return out

    def close(self) -> None:
        if self._own:
            self._channel.close()


# -- strategies ---------------------------------------------------------------------

def new_session(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Strategy:
    """A ``Predictor`` routing an attack's queries. ``query_count``: images the attack
    asked about; ``sent``: images actually sent (decoys and resamples included)."""

    name = "strategy"

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.query_count = 0
        self.sent = 0
        self.last_labels: np.ndarray | None = None
        self.sessions: set[str] = set()

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = as_batch(images)
        labels, scores = self._route(images)
        self.query_count += len(images)
        self.last_labels = np.asarray(labels, np.int64)
        return np.asarray(scores)

    def _route(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _batch(self, session: str, images: np.ndarray):
        self.sessions.add(session)
        self.sent += len(images)
        return self.transport.batch(session, images)

    def _many(self, calls):
        for s, imgs in calls:
            self.sessions.add(s)
            self.sent += len(as_batch(imgs))
        return self.transport.many(calls)


class Plain(Strategy):
    name = "plain"

    def __init__(self, transport: Transport, session: str | None = None) -> None:
        super().__init__(transport)
        self.session = session or new_session("plain")

    def _route(self, images):
        return self._batch(self.session, images)


class Interleave(Strategy):
    """decoy, candidate, decoy, candidate, ... in ONE ClassifyBatch of one session."""

    name = "interleave"

    def __init__(self, transport: Transport, decoys: np.ndarray, rng: np.random.Generator | int | None = None,
                 session: str | None = None) -> None:
        super().__init__(transport)
        self.decoys = as_batch(decoys)
        if len(self.decoys) == 0:
            raise ValueError("interleave needs decoy images")
        self.rng = np.random.default_rng(rng)
        self.session = session or new_session("interleave")
        self.decoys_sent = 0

    def _route(self, images):
        picks = self.decoys[self.rng.integers(0, len(self.decoys), size=len(images))]
        mixed = np.empty((2 * len(images), *images.shape[1:]), dtype=np.result_type(images, picks))
        mixed[0::2] = picks
        mixed[1::2] = images
        labels, scores = self._batch(self.session, mixed)
        self.decoys_sent += len(images)
        return labels[1::2], scores[1::2]


class FreshSession(Strategy):
    """Every candidate in its own call with a new session id; calls run concurrently."""

    name = "fresh_session"

    def _route(self, images):
        results = self._many([(new_session("fresh"), img[None]) for img in images])
        return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]))


class Accounts(Strategy):
    """``n`` sessions (accounts) split the attack: candidate j goes to account j mod n;
    each account's share of one predict is one ClassifyBatch, the accounts in parallel."""

    name = "accounts"

    def __init__(self, transport: Transport, accounts: Sequence[str]) -> None:
        super().__init__(transport)
        self.accounts = list(accounts)
        if not self.accounts:
            raise ValueError("accounts needs at least one session")
        self._next = 0

    def _route(self, images):
        n = len(self.accounts)
        owner = (self._next + np.arange(len(images))) % n
        self._next = int((self._next + len(images)) % n)
        calls, where = [], []
        for a in range(n):
            idx = np.flatnonzero(owner == a)
            if idx.size:
                calls.append((self.accounts[a], images[idx]))
                where.append(idx)
        results = self._many(calls)
        labels = np.empty(len(images), np.int64)
        scores = np.empty((len(images), results[0][1].shape[1]), np.float32)
        for idx, (lab, sc) in zip(where, results):
            labels[idx] = lab
            scores[idx] = sc
        return labels, scores


# -- query blinding ---------------------------------------------------------------

@dataclass(frozen=True)
class BlindSpec:
    """Random transform per query: shift (edge padding), brightness offset, Gaussian noise."""

    name: str = "blind"
    max_shift: int = 1
    brightness: float = 0.0
    sigma: float = 4.0
    ensure: bool = False  # escalate until the thresholds pass (attacker-side check)
    escalate: float = 1.5  # sigma factor per failed try
    max_sigma: float = 64.0
    max_tries: int = 12

    def as_dict(self) -> dict:
        return {"name": self.name, "max_shift": self.max_shift, "brightness": self.brightness,
                "sigma": self.sigma, "ensure": self.ensure}


def shift_image(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``img`` moved by (dx, dy) pixels, the uncovered border filled by edge padding."""
    p = max(abs(dx), abs(dy))
    if p == 0:
        return img.copy()
    padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return padded[p - dy:p - dy + h, p - dx:p - dx + w].copy()


def blind(img: np.ndarray, rng: np.random.Generator, max_shift: int, brightness: float,
          sigma: float) -> np.ndarray:
    out = np.asarray(img, np.uint8)
    if max_shift > 0:
        dx, dy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        out = shift_image(out, dx, dy)
    f = out.astype(np.float32)
    if brightness > 0:
        f = f + rng.uniform(-brightness, brightness)
    if sigma > 0:
        f = f + rng.normal(0.0, sigma, size=f.shape)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


class HashMemory:
    """The attacker's own record of the hashes it sent (for the ``ensure`` check)."""

    def __init__(self) -> None:
        self._bits = np.zeros((0, HASH_BYTES * 8), bool)

    def __len__(self) -> int:
        return len(self._bits)

    @staticmethod
    def bits(h: bytes) -> np.ndarray:
        return np.unpackbits(np.frombuffer(h, np.uint8)).astype(bool)

    def min_distance(self, h: bytes) -> int:
        if len(self._bits) == 0:
            return HASH_BYTES * 8
        return int((self._bits != self.bits(h)).sum(axis=1).min())

    def add(self, h: bytes) -> None:
        self._bits = np.vstack([self._bits, self.bits(h)[None]])


class Blinding(Strategy):
    """Each candidate is sent as a random transform of itself through ``inner``'s routing
    (default: one session). The attack only sees the answers for the blinded images."""

    name = "blinding"

    def __init__(self, transport: Transport, spec: BlindSpec, rng: np.random.Generator | int | None = None,
                 session: str | None = None, threshold: float = PAPER_THRESHOLD, recent: int = 8,
                 reference: np.ndarray | None = None) -> None:
        super().__init__(transport)
        self.spec = spec
        self.rng = np.random.default_rng(rng)
        self.session = session or new_session("blind")
        self.threshold = threshold
        self.recent = recent
        self.memory = HashMemory()
        self._recent: list[np.ndarray] = []
        self.reference = None if reference is None else np.asarray(reference, np.uint8)
        self.records: list[dict] = []  # per blinded query: distances to the reference and the transform used
        self.last_sent: np.ndarray | None = None
        self.unsafe = 0  # ensure=True: queries sent although no try passed the check

    def reset(self, reference: np.ndarray) -> None:
        """A new attacked image: its clean version and an empty query memory."""
        self.reference = np.asarray(reference, np.uint8)
        self.memory = HashMemory()
        self._recent = []
        self.records = []
        self.unsafe = 0

    def passes(self, img: np.ndarray, h: bytes) -> bool:
        """Farther than the threshold, in hash bits from EVERY earlier query of this attack
        and in differing pixels from the recent ones (an anchor's two measures)."""
        if self.memory.min_distance(h) <= self.threshold:
            return False
        return all(pixel_diff(img, r) > self.threshold for r in self._recent)

    def transform(self, img: np.ndarray) -> tuple[np.ndarray, float, int]:
        s = self.spec
        sigma, tries = s.sigma, 0
        while True:
            tries += 1
            out = blind(img, self.rng, s.max_shift, s.brightness, sigma)
            h = phash(out)
            if not s.ensure or self.passes(out, h):
                break
            if tries >= s.max_tries:
                self.unsafe += 1
                break
            sigma = min(s.max_sigma, sigma * s.escalate)
        self.memory.add(h)
        self._recent = (self._recent + [out])[-self.recent:]
        return out, sigma, tries

    def _route(self, images):
        out = np.empty_like(images, dtype=np.uint8)
        for j, img in enumerate(images):
            b, sigma, tries = self.transform(img)
            out[j] = b
            rec = {"sigma_used": sigma, "tries": tries}
            if self.reference is not None:
                d = b.astype(np.float64) - self.reference.astype(np.float64)
                rec.update(l2=float(np.sqrt((d ** 2).sum())) / 255.0, linf=float(np.abs(d).max()),
                           hash_distance=hamming(phash(b), phash(self.reference)),
                           pixel_distance=pixel_diff(b, self.reference))
            self.records.append(rec)
        self.last_sent = out
        return self._batch(self.session, out)


def make_strategy(kind: str, transport: Transport, *, rng: np.random.Generator, decoys: np.ndarray | None = None,
                  accounts: int = 4, account_names: Sequence[str] | None = None,
                  blind_spec: BlindSpec | None = None) -> Strategy:
    if kind == "plain":
        return Plain(transport)
    if kind == "interleave":
        return Interleave(transport, decoys, rng)
    if kind == "fresh_session":
        return FreshSession(transport)
    if kind == "accounts":
        return Accounts(transport, account_names or [new_session(f"acct{a}") for a in range(accounts)])
    if kind == "blinding":
        return Blinding(transport, blind_spec or BlindSpec(), rng)
    raise ValueError(f"unknown strategy {kind!r}; choose from {STRATEGIES}")


# -- ground truth -------------------------------------------------------------------

def model_labels(ep, model: str, images: np.ndarray, reference: str = "undefended") -> np.ndarray:
    """The model's own labels (``--mode off`` sidecar, a fresh session)."""
    if len(images) == 0:
        return np.zeros(0, np.int64)
    with ep.predictor(reference, model, session_id=new_session("truth")) as p:
        return np.asarray(p.labels(as_batch(images)), np.int64)


def _stable(name: str) -> int:
    return zlib.crc32(name.encode())


def select_images(ep, model: str, x, y, n: int, seed: int, *, decoy_pool: int = 0):
    """Correctly classified test images (random order) and a disjoint pool of decoys."""
    from .harness import UNDEFENDED, select_correct

    rng = np.random.default_rng([seed, _stable(model)])
    with ep.predictor(UNDEFENDED, model, session_id=new_session(f"select-{model}")) as ref:
        idx, stats = select_correct(ref, x, y, n, rng)
    rest = np.setdiff1d(np.arange(len(x)), idx)
    decoys = rng.choice(rest, size=min(decoy_pool, len(rest)), replace=False) if decoy_pool else rest[:0]
    return idx, np.asarray(decoys, np.int64), stats


# -- One Pixel Attack under a strategy ------------------------------------------------

@dataclass
class Cell:
    """One experiment cell: a strategy against one sidecar mode."""

    strategy: str
    mode: str
    sidecar: str  # the SIDECARS entry whose flags the fresh sidecar copies
    variant: str = ""  # e.g. the blinding level's name
    blind: BlindSpec | None = None
    concurrency: int = 16
    accounts: int = 4
    auth: bool = False

    @property
    def label(self) -> str:
        return self.strategy + (f":{self.variant}" if self.variant else "")


def _auth_file(n: int) -> tuple[str, dict[str, str]]:
    """A token file for ``n`` lab principals (throwaway random tokens) and session->token."""
    import os
    import tempfile

    tokens = {f"acct{a}": uuid.uuid4().hex for a in range(n)}
    fd, path = tempfile.mkstemp(prefix="hashguard-lab-tokens-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{tok} {name}\n" for name, tok in tokens.items())
    return path, tokens


def run_onepixel_cells(ep, model: str, x: np.ndarray, y: np.ndarray, cells: Sequence[Cell], *,
                       pixels: Sequence[int], n_images: int, popsize: int, maxiter: int, seed: int = 0,
                       decoy_pool: int = 256, progress: bool = True) -> tuple[list[dict], dict]:
    """Untargeted One Pixel Attack (DE fitness = score of the true label, success = any
    other answer) on ``n_images`` correctly classified images, for every cell and pixel
    count, each cell against a fresh sidecar. Same images and DE seeds in every cell."""
    import os

    from .attacks import onepixel as op_mod
    from .harness import _progress

    idx, decoy_idx, stats = select_images(ep, model, x, y, n_images, seed, decoy_pool=decoy_pool)
    rng = np.random.default_rng([seed, _stable(model), 6])
    seeds = {(int(i), k): int(rng.integers(2**31)) for i in idx for k in pixels}
    cfg = op_mod.DEConfig(popsize=popsize, maxiter=maxiter)
    rows: list[dict] = []
    bar = _progress(len(cells) * len(pixels) * len(idx), f"adaptive one-pixel {model}", progress)
    for k in pixels:
        for cell in cells:
            extra, tokens, token_path = (), None, None
            if cell.auth:
                token_path, tokens = _auth_file(cell.accounts)
                extra = ("--auth-tokens", token_path)
            try:
                with fresh_sidecar(ep, cell.sidecar, extra) as sc:
                    transport = GrpcTransport(sc.address, model, concurrency=cell.concurrency, tokens=tokens)
                    try:
                        rows += _cell_images(ep, model, x, y, idx, decoy_idx, cell, k, cfg, seeds, sc, transport,
                                             op_mod, bar)
                    finally:
                        transport.close()
            finally:
                if token_path:
                    os.unlink(token_path)
    bar.close()
    return rows, stats


def _cell_images(ep, model, x, y, idx, decoy_idx, cell: Cell, k, cfg, seeds, sc, transport, op_mod, bar):
    rows = []
    results = []
    for i in idx:
        i = int(i)
        srng = np.random.default_rng([seeds[(i, k)], 1])
        names = [f"acct{a}" for a in range(cell.accounts)] if cell.strategy == "accounts" else None
        strat = make_strategy(cell.strategy, transport, rng=srng, decoys=x[decoy_idx] if len(decoy_idx) else None,
                              accounts=cell.accounts, account_names=names, blind_spec=cell.blind)
        if isinstance(strat, Blinding):
            strat.reset(x[i])
        before = sc.counters(model)
        t0 = time.perf_counter()
        r = op_mod.attack(strat, x[i], int(y[i]), pixels=k, target=None, criterion="misclassify",
                          config=cfg, rng=seeds[(i, k)])
        delta = counter_delta(sc.counters(model), before)
        row = {
            "strategy": cell.label, "attack": "onepixel_untargeted", "model": model, "pixels": k,
            "mode": cell.mode, "sidecar": cell.sidecar, "variant": cell.variant, "image_index": i,
            "true_label": int(y[i]), "claimed_success": bool(r.success), "answered_label": r.label,
            "queries": strat.query_count, "sent": strat.sent, "generations": r.generations,
            "early_stop": r.early_stop, "forwarded": int(delta["forwards"]),
            "cached_session": int(delta["cache_session"]), "cached_lookup": int(delta["cache_lookup"]),
            "sessions": len(strat.sessions), "concurrency": cell.concurrency if cell.strategy in
            ("fresh_session", "accounts") else 1, "auth": cell.auth,
            "popsize": cfg.popsize, "maxiter": cfg.maxiter, "seconds": time.perf_counter() - t0,
            "candidate": str(np.asarray(r.candidate).tolist()),
        }
        if isinstance(strat, Blinding):
            recs = strat.records
            for key in ("l2", "linf", "hash_distance", "pixel_distance", "sigma_used"):
                vals = np.array([q[key] for q in recs], float)
                row[f"blind_mean_{key}"] = float(vals.mean())
                row[f"blind_max_{key}"] = float(vals.max())
            row["blind_unsafe"] = strat.unsafe
            row["blind_spec"] = str(cell.blind.as_dict()) if cell.blind else ""
            results.append((r.image, strat.last_sent[0] if strat.last_sent is not None else r.image))
        else:
            results.append((r.image, None))
        rows.append(row)
        bar.update()
    # ground truth: the model's own labels of every returned (un-blinded) image, and of the blinded verdicts
    truth = model_labels(ep, model, np.stack([a for a, _ in results]))
    blinded = [b for _, b in results if b is not None]
    truth_b = model_labels(ep, model, np.stack(blinded)) if blinded else None
    for j, row in enumerate(rows):
        row["model_label"] = int(truth[j])
        row["model_fooled"] = bool(truth[j] != row["true_label"])
        row["success"] = row["claimed_success"] and row["model_fooled"]
        if truth_b is not None:
            row["blinded_model_label"] = int(truth_b[j])
            row["blinded_success"] = row["claimed_success"] and bool(truth_b[j] != row["true_label"])
    return rows


def blinding_clean_cost(ep, model: str, x: np.ndarray, y: np.ndarray, idx: np.ndarray, spec: BlindSpec,
                        copies: int = 8, seed: int = 0) -> dict:
    """What blinding costs before any attack: the model's accuracy on ``copies`` blinded
    clean copies of each image (for ``ensure``: a sequence with the attacker's escalation)
    and their distances to the originals."""
    rng = np.random.default_rng(seed)
    imgs, labels, d, sig = [], [], [], []
    for i in idx:
        b = Blinding(_NoTransport(), spec, rng)
        b.reset(x[i])
        for _ in range(copies):
            out, sigma, _ = b.transform(x[i])
            imgs.append(out)
            labels.append(y[i])
            sig.append(sigma)
            diff = out.astype(np.float64) - x[i].astype(np.float64)
            d.append((np.sqrt((diff ** 2).sum()) / 255.0, np.abs(diff).max(), hamming(phash(out), phash(x[i])),
                      pixel_diff(out, x[i])))
    pred = model_labels(ep, model, np.stack(imgs))
    d = np.array(d)
    return {"blind": spec.name, **{k: v for k, v in spec.as_dict().items() if k != "name"},
            "clean_blinded_accuracy": float(np.mean(pred == np.array(labels))),
            "clean_mean_l2": float(d[:, 0].mean()), "clean_max_l2": float(d[:, 0].max()),
            "clean_mean_linf": float(d[:, 1].mean()), "clean_mean_hash_distance": float(d[:, 2].mean()),
            "clean_mean_pixel_distance": float(d[:, 3].mean()), "clean_mean_sigma": float(np.mean(sig)),
            "copies": int(len(imgs))}


class _NoTransport:
    def batch(self, session, images):  # pragma: no cover - never called
        raise RuntimeError("no transport")

    many = batch


MODE_SIDECAR = {"off": "undefended", "paper": "defended", "hardened": "hardened"}


def parse_strategy(entry: str) -> tuple[str, str]:
    """"fresh_session:c1" -> ("fresh_session", "c1")."""
    name, _, variant = entry.partition(":")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    return name, variant


def onepixel_cells(cfg: dict, mode_sidecar: dict[str, str] = MODE_SIDECAR) -> list[Cell]:
    """The experiment cells of a profile's ``adaptive`` section: ``plain`` and every
    blinding level against off/paper/hardened (off: the undefended reference), the other
    strategies against paper and hardened; ``fresh_session:c1`` (one call in flight) only
    against hardened, where concurrency matters (the cross-session index)."""
    cells = []
    for entry in cfg["strategies"]:
        name, variant = parse_strategy(entry)
        conc = 1 if variant == "c1" else int(cfg.get("concurrency", 16))
        if name == "plain":
            cells += [Cell(name, m, mode_sidecar[m]) for m in ("off", "paper", "hardened")]
        elif name == "blinding":
            for b in cfg.get("blinding", []):
                spec = BlindSpec(**b)
                cells += [Cell(name, m, mode_sidecar[m], variant=spec.name, blind=spec)
                          for m in ("off", "paper", "hardened")]
        elif variant == "c1":
            cells.append(Cell(name, "hardened", mode_sidecar["hardened"], variant=variant, concurrency=conc))
        else:
            n_acc = int(cfg.get("accounts", 4))
            cells += [Cell(name, m, mode_sidecar[m], variant=variant, concurrency=conc, accounts=n_acc)
                      for m in ("paper", "hardened")]
            if name == "accounts" and cfg.get("auth_accounts"):
                cells += [Cell(name, m, mode_sidecar[m], variant="auth", concurrency=conc, accounts=n_acc,
                               auth=True) for m in ("paper", "hardened")]
    return cells


def hsj_cells(cfg: dict, mode_sidecar: dict[str, str] = MODE_SIDECAR) -> list[Cell]:
    cells = []
    for entry in cfg["strategies"]:
        name, variant = parse_strategy(entry)
        modes = ("off", "paper", "hardened") if name == "plain" else ("paper", "hardened")
        cells += [Cell(name, m, mode_sidecar[m], variant=variant) for m in modes]
    return cells


# -- HopSkipJump (ART) through the sidecar ---------------------------------------------

class BudgetExhausted(Exception):
    pass


class BudgetedOracle:
    """ART ``BlackBoxClassifier`` predict function over a strategy, with a query budget.
    Remembers the closest query the service called adversarial (the fallback answer
    when the budget runs out mid-attack)."""

    def __init__(self, strategy: Strategy, x: np.ndarray, true_label: int, budget: int) -> None:
        self.strategy = strategy
        self.x = np.asarray(x, np.float32)
        self.true_label = int(true_label)
        self.budget = int(budget)
        self.best: np.ndarray | None = None
        self.best_l2 = np.inf

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.clip(np.asarray(batch, np.float32), 0, 255)
        if self.strategy.query_count + len(batch) > self.budget:
            raise BudgetExhausted
        scores = self.strategy.predict(batch)
        labels = self.strategy.last_labels
        for img, lab in zip(batch, labels):
            if lab != self.true_label:
                l2 = float(np.linalg.norm(img - self.x))
                if l2 < self.best_l2:
                    self.best, self.best_l2 = img.copy(), l2
        onehot = np.zeros_like(scores, dtype=np.float32)
        onehot[np.arange(len(labels)), labels] = 1.0
        return onehot


def hopskipjump(strategy: Strategy, x: np.ndarray, true_label: int, *, max_iter: int, max_eval: int,
                init_eval: int, init_size: int, budget: int, seed: int) -> dict:
    """Untargeted L2 HopSkipJump (ART) on one image through ``strategy``; decision-based
    (labels only). Returns the adversarial image (the original when none was found)."""
    import logging

    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    logging.getLogger("art").setLevel(logging.ERROR)
    oracle = BudgetedOracle(strategy, x, true_label, budget)
    clf = BlackBoxClassifier(oracle, input_shape=tuple(x.shape), nb_classes=10, clip_values=(0.0, 255.0))
    attack = HopSkipJump(clf, targeted=False, norm=2, max_iter=max_iter, max_eval=max_eval, init_eval=init_eval,
                         init_size=init_size, batch_size=max(max_eval, 64), verbose=False)
    np.random.seed(seed % (2**32))
    stop = "max_iter"
    y1 = np.zeros((1, 10), np.float32)
    y1[0, true_label] = 1
    try:
        adv = attack.generate(np.asarray(x, np.float32)[None], y=y1)[0]
    except BudgetExhausted:
        stop = "budget"
        adv = oracle.best if oracle.best is not None else np.asarray(x, np.float32)
    # the attacker believes it has an adversarial when the oracle called some query adversarial
    # and HSJ returned one (ART returns the original image when its initialisation failed)
    claimed = oracle.best is not None and not np.array_equal(np.asarray(adv, np.float32), np.asarray(x, np.float32))
    return {"image": adv, "stop": stop, "queries": strategy.query_count, "claimed": bool(claimed)}


def run_hsj_cells(ep, model: str, x: np.ndarray, y: np.ndarray, cells: Sequence[Cell], *, n_images: int,
                  max_iter: int, max_eval: int, init_eval: int, init_size: int, budget: int, seed: int = 0,
                  progress: bool = True) -> list[dict]:
    from .harness import _progress

    idx, _, _ = select_images(ep, model, x, y, n_images, seed)
    rng = np.random.default_rng([seed, _stable(model), 7])
    seeds = {int(i): int(rng.integers(2**31)) for i in idx}
    rows = []
    bar = _progress(len(cells) * len(idx), f"HopSkipJump {model}", progress)
    for cell in cells:
        with fresh_sidecar(ep, cell.sidecar) as sc:
            transport = GrpcTransport(sc.address, model, concurrency=cell.concurrency)
            advs = []
            try:
                for i in idx:
                    i = int(i)
                    strat = make_strategy(cell.strategy, transport, rng=np.random.default_rng(seeds[i]))
                    before = sc.counters(model)
                    t0 = time.perf_counter()
                    r = hopskipjump(strat, x[i], int(y[i]), max_iter=max_iter, max_eval=max_eval,
                                    init_eval=init_eval, init_size=init_size, budget=budget, seed=seeds[i])
                    delta = counter_delta(sc.counters(model), before)
                    advs.append(r["image"])
                    diff = (np.asarray(r["image"], np.float64) - x[i].astype(np.float64)) / 255.0
                    rows.append({
                        "strategy": cell.label, "attack": "hopskipjump", "model": model, "pixels": None,
                        "mode": cell.mode, "sidecar": cell.sidecar, "variant": cell.variant, "image_index": i,
                        "true_label": int(y[i]), "queries": r["queries"], "sent": strat.sent, "stop": r["stop"],
                        "claimed_success": r["claimed"],
                        "forwarded": int(delta["forwards"]), "cached_session": int(delta["cache_session"]),
                        "cached_lookup": int(delta["cache_lookup"]), "sessions": len(strat.sessions),
                        "concurrency": cell.concurrency if cell.strategy == "fresh_session" else 1,
                        "l2": float(np.sqrt((diff ** 2).sum())), "linf": float(np.abs(diff).max()),
                        "max_iter": max_iter, "max_eval": max_eval, "budget": budget,
                        "seconds": time.perf_counter() - t0,
                    })
                    bar.update()
            finally:
                transport.close()
        n = len(advs)
        truth = model_labels(ep, model, np.stack(advs))
        for row, lab in zip(rows[-n:], truth):
            row["model_label"] = int(lab)
            row["model_fooled"] = bool(lab != row["true_label"])
            row["success"] = row["claimed_success"] and row["model_fooled"]
    bar.close()
    return rows


# -- summaries ----------------------------------------------------------------------

SUMMARY_KEYS = ["strategy", "attack", "model", "pixels", "mode"]


def summarize(rows: list[dict], profile: str):
    """One row per (strategy, attack, model, pixels, mode): ASR (the model really
    misclassifies the returned image), the attacker's own verdict, queries, forwards."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df["pixels"] = df["pixels"].astype("Int64") if "pixels" in df else None
    out = []
    for key, g in df.groupby(SUMMARY_KEYS, sort=False, dropna=False):
        rec = dict(zip(SUMMARY_KEYS, key))
        rec.update({
            "asr": float(g.success.mean()), "n": int(len(g)), "mean_queries": float(g.queries.mean()),
            "successes": int(g.success.sum()), "asr_claimed": float(g.claimed_success.mean()),
            "asr_model": float(g.model_fooled.mean()), "mean_sent": float(g.sent.mean()),
            "forwarded_fraction": float(g.forwarded.sum() / max(1, g.sent.sum())),
            "cached_lookup_fraction": float(g.cached_lookup.sum() / max(1, g.sent.sum())),
            "sidecar": g.sidecar.iloc[0], "variant": g.variant.iloc[0],
        })
        ok = g[g.success]
        if "l2" in g and g["l2"].notna().any():
            rec["median_l2_success"] = float(ok.l2.median()) if len(ok) else float("nan")
            rec["median_linf_success"] = float(ok.linf.median()) if len(ok) else float("nan")
        if "blind_mean_l2" in g and g["blind_mean_l2"].notna().any():
            rec["asr_blinded"] = float(g.blinded_success.mean())
            for c in ("l2", "linf", "hash_distance", "pixel_distance", "sigma_used"):
                rec[f"blind_mean_{c}"] = float(g[f"blind_mean_{c}"].mean())
                rec[f"blind_max_{c}"] = float(g[f"blind_max_{c}"].max())
            rec["blind_unsafe_queries"] = int(g.blind_unsafe.sum())
        rec["profile"] = profile
        out.append(rec)
    return pd.DataFrame(out)


# -- cost of hardening ------------------------------------------------------------------

def stream_answers(transport: GrpcTransport, requests: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Requests (session, image) one unary call each, strictly in order; the answered labels."""
    return np.array([int(transport.batch(s, img[None])[0][0]) for s, img in requests], np.int64)


def jpeg_like(img: np.ndarray, quality: int = 90) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy()


def near_duplicate(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A benign near-duplicate: 1-3 changed pixels, or a JPEG round trip (quality 85-95)."""
    if rng.random() < 0.5:
        out = img.copy()
        k = int(rng.integers(1, 4))
        ys, xs = rng.integers(0, img.shape[0], k), rng.integers(0, img.shape[1], k)
        out[ys, xs] = rng.integers(0, 256, (k, 3))
        return out, f"{k}px"
    return jpeg_like(img, int(rng.integers(85, 96))), "jpeg"


def many_users_stream(x: np.ndarray, users: int, popular: Sequence[int], own: Sequence[Sequence[int]],
                      per_user: int, rng: np.random.Generator, p_popular: float = 0.6, p_near: float = 0.5):
    """Requests of ``users`` users, shuffled in time: each user sends popular images
    (exact, or a near-duplicate with probability ``p_near``) and its own distinct images."""
    reqs = []
    for u in range(users):
        mine = list(own[u])
        for _ in range(per_user):
            if rng.random() < p_popular or not mine:
                src = int(rng.choice(popular))
                if rng.random() < p_near:
                    img, kind = near_duplicate(x[src], rng)
                else:
                    img, kind = x[src].copy(), "exact"
                reqs.append({"user": u, "source": src, "kind": f"popular_{kind}", "image": img})
            else:
                src = mine.pop(0)
                reqs.append({"user": u, "source": int(src), "kind": "own", "image": x[src].copy()})
    order = rng.permutation(len(reqs))
    return [reqs[j] for j in order]


def hardening_cost(ep, model: str, x: np.ndarray, y: np.ndarray, *, modes: Sequence[tuple[str, str]],
                   n_clean: int, users: int, popular: int, per_user: int, seed: int = 0,
                   poison: Sequence[tuple[int, np.ndarray]] = ()) -> tuple[list[dict], list[dict]]:
    """Benign cost of each (mode, sidecar) in ``modes`` on fresh sidecars:

    - ``clean``: the first ``n_clean`` test images, one session, in order;
    - ``many_users``: ``users`` sessions sending popular images, near-duplicates
      and their own images, interleaved in time;
    - ``poisoning``: an attacker session first sends its adversarial near-duplicates
      (``poison``: (image index, adversarial image) pairs), then victims in other
      sessions send the clean originals.

    A cached answer is false when its label differs from the model's own label for
    the exact image sent (ground truth: the ``undefended`` sidecar). Forwarded answers
    are the model's own, so every label difference is a false cached answer.
    """
    rng = np.random.default_rng(seed)
    n_clean = min(n_clean, len(x))
    clean = [(None, int(i), "clean", x[i]) for i in range(n_clean)]
    order = rng.permutation(len(x))
    pop_idx = order[:popular]
    own_pool = order[popular:popular + users * per_user]
    own = [own_pool[u * per_user:(u + 1) * per_user] for u in range(users)]
    mu = many_users_stream(x, users, pop_idx, own, per_user, rng)
    streams = {"clean": [("clean-user", r[1], r[2], r[3]) for r in clean],
               "many_users": [(f"user{r['user']}", r["source"], r["kind"], r["image"]) for r in mu]}
    if len(poison):
        attacker = [("attacker", int(i), "poison", np.asarray(a, np.uint8)) for i, a in poison]
        victims = [(f"victim{j}", int(i), "victim", x[int(i)]) for j, (i, _) in enumerate(poison)]
        streams["poisoning"] = attacker + victims
    truth = {name: model_labels(ep, model, np.stack([r[3] for r in reqs])) for name, reqs in streams.items()}
    summary, per_request = [], []
    for mode, sidecar in modes:
        for name, reqs in streams.items():
            with fresh_sidecar(ep, sidecar) as sc:
                t = GrpcTransport(sc.address, model)
                try:
                    before = sc.counters(model)
                    labels = stream_answers(t, [(s, img) for s, _, _, img in reqs])
                    delta = counter_delta(sc.counters(model), before)
                finally:
                    t.close()
            true_y = np.array([int(y[src]) for _, src, _, _ in reqs])
            wrong_cache = labels != truth[name]
            rec = {"stream": name, "mode": mode, "sidecar": sidecar, "model": model, "n_requests": len(reqs),
                   "accuracy": float(np.mean(labels == true_y)),
                   "model_accuracy": float(np.mean(truth[name] == true_y)),
                   "cached_fraction": float((delta["cache_session"] + delta["cache_lookup"]) / len(reqs)),
                   "cached_lookup_fraction": float(delta["cache_lookup"] / len(reqs)),
                   "false_cached": int(wrong_cache.sum()),
                   "false_cache_rate": float(wrong_cache.mean())}
            kinds = np.array([k for _, _, k, _ in reqs])
            if name == "many_users":
                users_of = np.array([s for s, _, _, _ in reqs])
                rec["users"] = users
                rec["false_cached_popular"] = int(wrong_cache[np.char.startswith(kinds, "popular")].sum())
                rec["false_cached_own"] = int(wrong_cache[kinds == "own"].sum())
                rec["users_with_false_cached"] = int(len(set(users_of[wrong_cache])))
            if name == "poisoning":
                vic = kinds == "victim"
                adv_labels = truth[name][~vic]
                rec["victims"] = int(vic.sum())
                rec["victims_given_adversarial_label"] = int(np.sum(labels[vic] == adv_labels))
                rec["poison_success_rate"] = float(np.mean(labels[vic] == adv_labels)) if vic.any() else float("nan")
            summary.append(rec)
            for (s, src, k, _), lab, tl in zip(reqs, labels, truth[name]):
                per_request.append({"stream": name, "mode": mode, "session": s, "image_index": src, "kind": k,
                                    "answer": int(lab), "model_label": int(tl), "true_label": int(y[src])})
    return summary, per_request


def pooled(rows: list[dict], profile: str):
    """ASR per (strategy, attack, mode), pooled over models and pixel counts."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    for (strategy, attack, mode), g in df.groupby(["strategy", "attack", "mode"], sort=False):
        out.append({"strategy": strategy, "attack": attack, "mode": mode, "asr": float(g.success.mean()),
                    "n": int(len(g)), "successes": int(g.success.sum()),
                    "asr_claimed": float(g.claimed_success.mean()), "asr_model": float(g.model_fooled.mean()),
                    "mean_queries": float(g.queries.mean()),
                    "forwarded_fraction": float(g.forwarded.sum() / max(1, g.sent.sum())), "profile": profile})
    return pd.DataFrame(out)


def projection(rows: list[dict], runs_full: int, max_queries_full: int, max_queries_quick: int) -> dict:
    """Projected time of the full profile from this run's measured seconds per sent image.
    ``upper``: every run uses its whole query budget; ``scaled``: runs use the same share
    of their budget as measured here. Per-image cost of bigger models is not included."""
    import pandas as pd

    df = pd.DataFrame(rows)
    n_cells = int(df.groupby(["strategy", "mode", "model"] + (["pixels"] if "pixels" in df else []), dropna=False).ngroups)
    per_cell = df.groupby(["strategy", "mode"])
    s_per_image = float(df.seconds.sum() / max(1, df.sent.sum()))
    sent_ratio = float(df.sent.sum() / max(1, df.queries.sum()))
    share = float(df.queries.mean() / max(1, max_queries_quick))
    upper = s_per_image * sent_ratio * n_cells * runs_full * max_queries_full
    return {"measured_seconds_per_sent_image": s_per_image, "sent_per_query": sent_ratio,
            "cells": n_cells, "strategy_mode_pairs": int(per_cell.ngroups), "runs_per_cell_full": runs_full,
            "max_queries_per_run_full": max_queries_full, "budget_share_measured": share,
            "projected_hours_upper": upper / 3600, "projected_hours_scaled": upper * share / 3600}


def bar_plot(table, title: str, value: str = "asr", group: str = "strategy", hue: str = "mode",
             hue_order=("off", "paper", "hardened")):
    """Grouped bars of ``value`` per ``group``, one bar per ``hue`` (absent cells left empty)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(table[group]))
    hues = [h for h in hue_order if h in set(table[hue])] + sorted(set(table[hue]) - set(hue_order))
    colors = {"off": "#4477aa", "paper": "#cc3311", "hardened": "#228833"}
    width = 0.8 / max(1, len(hues))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 3.8))
    xs = np.arange(len(groups))
    for j, h in enumerate(hues):
        vals = [table[(table[group] == g) & (table[hue] == h)][value] for g in groups]
        vals = [float(v.iloc[0]) if len(v) else np.nan for v in vals]
        pos = xs + (j - (len(hues) - 1) / 2) * width
        ax.bar(pos, vals, width, label=str(h), color=colors.get(h), edgecolor="black", linewidth=0.3)
        for px, v in zip(pos, vals):  # print the value: a 0 bar is otherwise invisible
            if np.isfinite(v):
                ax.text(px, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(xs, groups, fontsize=7, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(value)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# -- several sidecars in one child process (timing experiments) -------------------------

class SidecarHost:
    """Sidecars ``{name: (mode, padding, flags)}`` as real ``SidecarServer``s in ONE child
    process (``python -m lab.adaptive host``) on loopback ports, in front of ``backend``.

    For timing experiments: the client (this process) and the servers do not share an
    interpreter, as with ``python -m sidecar``, but the child imports TensorFlow's protos
    once for all of them (a process per sidecar costs ~0.7 GB). Calls to different hosted
    sidecars made one after another do not disturb each other. The child exits when its
    stdin closes (also when this process dies)."""

    def __init__(self, backend: str, specs: dict[str, tuple[str, str, Sequence[str]]],
                 startup_timeout: float = 120.0) -> None:
        import json
        import subprocess
        import sys

        self.specs = {n: (m, p, list(a)) for n, (m, p, a) in specs.items()}
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.proc = subprocess.Popen([sys.executable, "-m", "lab.adaptive", "host", "--backend", backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self.proc.stdin.write(json.dumps(self.specs) + "\n")
        self.proc.stdin.flush()
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], startup_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError("sidecar host did not start")
        self.ports = json.loads(line)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(15)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "SidecarHost":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _host_main(backend: str) -> None:
    import json
    import logging
    import sys

    from sidecar.config import from_args
    from sidecar.server import SidecarServer

    logging.getLogger("hashguard").setLevel(logging.WARNING)
    specs = json.loads(sys.stdin.readline())
    servers = {}
    for name, (mode, padding, args) in specs.items():
        settings = from_args(["--backend", backend, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                              "--mode", mode, "--padding", padding, *map(str, args)])
        servers[name] = SidecarServer(settings)
        await servers[name].start()
    print(json.dumps({n: s.port for n, s in servers.items()}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    for s in servers.values():
        await s.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lab.adaptive")
    sub = ap.add_subparsers(dest="cmd", required=True)
    host = sub.add_parser("host", help="serve the sidecars given as JSON on stdin until stdin closes")
    host.add_argument("--backend", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "host":
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the parent
        except Exception:  # noqa: BLE001
            pass
        asyncio.run(_host_main(args.backend))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
