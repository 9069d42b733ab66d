"""How an adaptive attacker's queries reach the sidecar: routers in front of one client.

A router is a ``predict(images) -> scores`` (with ``last_labels``) that an ART
estimator (``lab.estimators.black_box``) calls; the attack itself is unchanged, the
router decides the sessions and what is actually sent:

* ``Plain``: one session, each predict one ``ClassifyBatch`` (the paper's attacker);
* ``Interleave``: an unrelated image (decoy) before every candidate in the same batch,
  so paper mode's single anchor is always the decoy;
* ``FreshSession``: every candidate its own call with a new session, calls in flight at once;
* ``Accounts``: n sessions share the attack, candidates round-robin;
* ``Blinding``: every query a random transform of the candidate (shift with edge padding,
  brightness, Gaussian noise); ``ensure`` escalates the noise until the attacker's own
  hash check says the query passes the thresholds against everything it sent before;
* ``Resample`` (OARS-style, after Feng et al. 2023): wraps a router; an answer the
  ``replay`` detector calls cached (byte-identical to an earlier answer to a different
  query) is asked again
  through ever larger random transforms, up to ``max_resamples``.

``sent`` counts the images really sent (decoys and resamples included).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

import numpy as np

from .client import SidecarClient, as_batch

STRATEGIES = ("plain", "interleave", "fresh_session", "accounts", "blinding")


def _sid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Router:
    name = "router"

    def __init__(self, client: SidecarClient) -> None:
        self.client, self.sent, self.last_labels, self.sessions = client, 0, None, set()

    def predict(self, images: np.ndarray) -> np.ndarray:
        scores, labels = self.route(as_batch(images))
        self.last_labels = np.asarray(labels, np.int64)
        return np.asarray(scores, np.float32)

    def route(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _batch(self, session: str, images: np.ndarray):
        self.sessions.add(session)
        self.sent += len(images)
        out = [self.client.batch(images[i:i + self.client.max_batch], session)
               for i in range(0, len(images), self.client.max_batch)]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _many(self, calls, concurrency: int = 16):
        for s, im in calls:
            self.sessions.add(s)
            self.sent += len(im)
        return self.client.many(calls, concurrency)


class Plain(Router):
    name = "plain"

    def __init__(self, client: SidecarClient, session: str | None = None) -> None:
        super().__init__(client)
        self.session = session or client.session

    def route(self, images):
        return self._batch(self.session, images)


class Interleave(Plain):
    name = "interleave"

    def __init__(self, client: SidecarClient, decoys: np.ndarray, seed: int = 0) -> None:
        super().__init__(client)
        self.decoys, self.rng = as_batch(decoys), np.random.default_rng(seed)

    def route(self, images):
        mixed = np.empty((2 * len(images), *images.shape[1:]), np.float32)
        mixed[0::2] = self.decoys[self.rng.integers(0, len(self.decoys), len(images))]
        mixed[1::2] = images
        scores, labels = self._batch(self.session, mixed)
        return scores[1::2], labels[1::2]


class FreshSession(Router):
    name = "fresh_session"

    def __init__(self, client: SidecarClient, concurrency: int = 16) -> None:
        super().__init__(client)
        self.concurrency = concurrency

    def route(self, images):
        res = self._many([(_sid("fresh"), im[None]) for im in images], self.concurrency)
        return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])


class Accounts(Router):
    name = "accounts"

    def __init__(self, client: SidecarClient, n: int = 4) -> None:
        super().__init__(client)
        self.accounts, self._next = [_sid(f"acct{a}") for a in range(n)], 0

    def route(self, images):
        n = len(self.accounts)
        owner = (self._next + np.arange(len(images))) % n
        self._next = int((self._next + len(images)) % n)
        parts = [(a, np.flatnonzero(owner == a)) for a in range(n) if (owner == a).any()]
        res = self._many([(self.accounts[a], images[idx]) for a, idx in parts], n)
        scores = np.empty((len(images), res[0][0].shape[1]), np.float32)
        labels = np.empty(len(images), np.int64)
        for (_, idx), (s, lab) in zip(parts, res):
            scores[idx], labels[idx] = s, lab
        return scores, labels


@dataclass(frozen=True)
class BlindSpec:
    name: str = "blind"
    max_shift: int = 1
    brightness: float = 0.0
    sigma: float = 4.0
    ensure: bool = False
    escalate: float = 1.5
    max_sigma: float = 64.0
    max_tries: int = 12


def shift_image(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``img`` moved by (dx, dy) pixels, the uncovered border filled by edge padding."""
    p = max(abs(dx), abs(dy))
    if p == 0:
        return np.array(img, copy=True)
    padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return padded[p - dy:p - dy + h, p - dx:p - dx + w].copy()


def blind(img: np.ndarray, rng: np.random.Generator, max_shift: int, brightness: float, sigma: float) -> np.ndarray:
    out = np.clip(np.round(np.asarray(img, np.float32)), 0, 255).astype(np.uint8)
    if max_shift > 0:
        out = shift_image(out, *(int(v) for v in rng.integers(-max_shift, max_shift + 1, 2)))
    f = out.astype(np.float32)
    if brightness > 0:
        f = f + rng.uniform(-brightness, brightness)
    if sigma > 0:
        f = f + rng.normal(0.0, sigma, f.shape)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


class Blinding(Plain):
    """Each candidate sent as a random transform of itself, in one session."""

    name = "blinding"

    def __init__(self, client: SidecarClient, spec: BlindSpec, seed: int = 0, threshold: float | None = None,
                 recent: int = 8) -> None:
        from sidecar.judge.judgment import PAPER_THRESHOLD

        super().__init__(client)
        self.spec, self.rng = spec, np.random.default_rng(seed)
        self.threshold = PAPER_THRESHOLD if threshold is None else threshold
        self.recent, self.hashes, self._recent, self.unsafe = recent, [], [], 0

    def passes(self, img: np.ndarray, bits: np.ndarray) -> bool:
        """Farther than the threshold in hash bits from every earlier query, and in
        differing pixels from the recent ones (an anchor's two measures)."""
        from sidecar.judge.phash import pixel_diff

        if self.hashes and int((np.stack(self.hashes) != bits).sum(1).min()) <= self.threshold:
            return False
        return all(pixel_diff(img, r) > self.threshold for r in self._recent)

    def transform(self, img: np.ndarray) -> np.ndarray:
        from sidecar.judge.phash import phash

        s, sigma = self.spec, self.spec.sigma
        for tries in range(1, s.max_tries + 1):
            out = blind(img, self.rng, s.max_shift, s.brightness, sigma)
            bits = np.unpackbits(np.frombuffer(phash(out), np.uint8)).astype(bool)
            if not s.ensure or self.passes(out, bits):
                break
            if tries == s.max_tries:
                self.unsafe += 1
            sigma = min(s.max_sigma, sigma * s.escalate)
        self.hashes.append(bits)
        self._recent = (self._recent + [out])[-self.recent:]
        return out

    def route(self, images):
        return self._batch(self.session, np.stack([self.transform(im) for im in images]))


def ladder(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Resample transform of growing size: level 1-2 shift 1-2 px, then added noise sigma 4, 8, 16, ..."""
    if level <= 2:
        return blind(img, rng, level, 0.0, 0.0)
    return blind(img, rng, 1, 0.0, 4.0 * 2 ** (level - 3))


class Resample(Router):
    """OARS-style: an answer judged cached (``replay``: same bytes as an earlier answer) is asked
    again through a larger random transform until judged fresh or ``max_resamples`` is reached."""

    name = "oars"

    def __init__(self, inner: Router, max_resamples: int = 6, seed: int = 0) -> None:
        super().__init__(inner.client)
        self.inner, self.max_resamples, self.rng = inner, max_resamples, np.random.default_rng(seed)
        self.seen: dict[bytes, bytes] = {}  # answer bytes -> the query that first got them
        self.detected = self.resamples = 0

    def _cached(self, scores: np.ndarray, image: np.ndarray) -> bool:
        """Replay detector: these answer bytes came before for a DIFFERENT query."""
        key, query = np.asarray(scores, np.float32).tobytes(), np.asarray(image, np.float32).tobytes()
        return self.seen.setdefault(key, query) != query

    def route(self, images):
        scores, labels = self.inner.route(images)
        for j in range(len(images)):
            level, asked = 0, images[j]
            while self._cached(scores[j], asked) and level < self.max_resamples:
                self.detected += level == 0
                level += 1
                self.resamples += 1
                asked = ladder(images[j], level, self.rng)
                s, lab = self.inner.route(asked[None])
                scores[j], labels[j] = s[0], lab[0]
        self.sent = self.inner.sent
        return scores, labels


def make(kind: str, client: SidecarClient, *, decoys: np.ndarray | None = None, seed: int = 0, accounts: int = 4,
         concurrency: int = 16, blind_spec: dict | None = None) -> Router:
    if kind == "plain":
        return Plain(client)
    if kind == "interleave":
        return Interleave(client, decoys, seed)
    if kind == "fresh_session":
        return FreshSession(client, concurrency)
    if kind == "accounts":
        return Accounts(client, accounts)
    if kind == "blinding":
        return Blinding(client, BlindSpec(**(blind_spec or {})), seed)
    raise ValueError(f"unknown strategy {kind!r}; choose from {STRATEGIES}")


def spec_dict(spec: BlindSpec) -> dict:
    return asdict(spec)
