"""Side channels (workbook 07): can an attacker tell a cached answer from a fresh one,
and can it exploit that? An OARS-style adaptive attack.

1. Distinguisher grid (``distinguisher_grid``): ``lab.distinguisher``'s protocol
   (pairs x, then a 1-pixel copy x'; hits from a defended sidecar, misses from its
   ``--mode off`` twin with the same output policy and noise key; hit and miss
   observations interleaved in small chunks so machine load drifts alike) for
   every output policy x padding setting, on fresh sidecar processes per policy
   (as deployed: timing depends on it). Accuracy 0.5 = coin flip.

2. OARS-style attack (after Feng et al., "Stateful Defenses for Machine Learning
   Models Are Not Yet Secure Against Black-box Attacks", CCS 2023: oracle-guided
   adaptive rejection sampling). The base attack is a score-based Linf Square
   Attack (Andriushchenko et al. 2020; random square updates at the vertices of
   the eps-ball, accepted when the margin loss drops), written here so every query
   is one unary ``Classify`` in one attacker session. The adaptive version asks a
   detector after every answer whether it came from the cache; if so it resends
   the SAME candidate through a random transform one step larger on a ladder
   (shift 1 px, shift 2 px, then Gaussian noise 4, 8, 16, 32 on top) until the
   detector judges the answer fresh (at most ``max_resamples`` times), and steps
   the ladder back down after a fresh answer. Detectors:

   - ``replay``: an answer byte-identical (label and shown scores) to an earlier
     answer of this attack is cached. Exact for exact scores; blind when the
     output policy adds keyed noise (every query gets its own noise);
   - ``oracle``: the sidecar's own counters (not visible to a real client): an
     upper bound, what OARS could do with a perfect distinguisher.

   An answer about a transformed copy only steers the search (its margin); the
   attacker claims success only when an answer judged fresh for the candidate
   ITSELF (untransformed, inside the eps-ball) is a wrong label (after a wrong
   label on a transformed copy it spends one untransformed query to check).
   Success = claimed AND the model itself (``--mode off``) misclassifies the
   returned candidate.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .adaptive import GrpcTransport, LocalSidecar, counter_delta, fresh_sidecar, model_labels, new_session, \
    select_images, shift_image
from .distinguisher import Observation, accuracy, observe

# -- distinguisher grid ---------------------------------------------------------------


def interleaved(hit_address: str, miss_address: str, model: str, images: np.ndarray, chunk: int = 10,
                seed: int = 0) -> tuple[list[Observation], list[Observation]]:
    """Hits and misses in alternating chunks (as ``benchmarks/bench_distinguisher``);
    a hit and a miss never share an image."""
    hits, misses = [], []
    for i in range(0, len(images), 2 * chunk):
        hits += observe(hit_address, model, images[i:i + chunk], True, seed=seed + i)
        misses += observe(miss_address, model, images[i + chunk:i + 2 * chunk], False, seed=seed + i + 1)
    return hits, misses


def grid_cells(grid: dict, paddings: Sequence[str] = ("on", "off")) -> list[tuple[str, str, str, str, str]]:
    """(policy, padding, hit mode, hit sidecar, miss sidecar) for every cell of ``grid``."""
    cells = []
    for policy, g in grid.items():
        for pad in paddings:
            if pad in g["hit"]:
                cells.append((policy, pad, "paper", g["hit"][pad], g["miss"]))
        for pad, name in g.get("hardened", {}).items():
            if pad in paddings:
                cells.append((policy, pad, "hardened", name, g["miss"]))
    return cells


def distinguisher_grid(ep, model: str, x: np.ndarray, grid: dict, *, n: int, warmup: int, chunk: int = 10,
                       seed: int = 0, paddings: Sequence[str] = ("on", "off"), isolation: str = "process",
                       progress: bool = True) -> list[dict]:
    """Accuracy of the hit/miss distinguisher per (policy, padding, hit mode).

    ``grid``: ``harness.DISTINGUISHER_GRID``-shaped: policy -> {"hit": {padding: sidecar},
    "miss": sidecar, optional "hardened": {padding: sidecar}}. The sidecars of one policy
    are started fresh together, each as its own ``python -m sidecar`` process
    (``isolation="process"``, as deployed; the latencies of in-process or co-hosted
    sidecars are measurably different) or all in one child process (``"host"``,
    cheaper). ``n`` observations per class (2n images), ``warmup`` forwarded images per
    hit sidecar first (fills the padding's latency distribution)."""
    from .harness import _progress

    rng = np.random.default_rng(seed)
    cells = grid_cells(grid, paddings)
    rows = []
    bar = _progress(len(cells), "distinguisher", progress)
    for policy in dict.fromkeys(c[0] for c in cells):
        mine = [c for c in cells if c[0] == policy]
        names = sorted({c[3] for c in mine} | {c[4] for c in mine})
        with _sidecars(ep, names, isolation, model) as address:
            rows += _grid_cells(address, mine, model, x, rng, n=n, warmup=warmup, chunk=chunk, seed=seed, bar=bar)
    bar.close()
    return rows


@contextlib.contextmanager
def _sidecars(ep, names: Sequence[str], isolation: str, model: str):
    """Fresh sidecars ``names``: one process each (``process``, as deployed) or all in one
    child process (``host``); yields name -> address."""
    from .adaptive import SidecarHost, sidecar_flags

    if isolation == "host":
        with SidecarHost(ep.backend, {nm: sidecar_flags(ep, nm) for nm in names}) as host:
            yield host.address
        return
    from .stack import SidecarSpec, Stack

    specs = []
    for nm in names:
        mode, padding, args = sidecar_flags(ep, nm)
        specs.append(SidecarSpec(nm, mode=mode, padding=padding, args=tuple(args)))
    with Stack(ep.models_dir, [model], sidecars=specs, backend=ep.backend) as st:  # serving: the running one
        yield lambda nm: st.sidecar(nm).address
        st.cleanup_logs()


def _grid_cells(address, cells, model, x, rng, *, n, warmup, chunk, seed, bar) -> list[dict]:
    rows = []
    for policy, pad, mode, hit_name, miss_name in cells:
        order = rng.permutation(len(x))
        warm, imgs = x[order[:warmup]], x[order[warmup:warmup + 2 * n]]
        t0 = time.perf_counter()
        # Paper mode: a miss is the same 1-pixel copy in a fresh session of the SAME
        # sidecar (same process and code path: only the cache differs). Hardened mode
        # would answer that from its cross-session index, so its misses come from
        # the undefended twin with the same output policy and noise key.
        hit = address(hit_name)
        if mode == "paper":
            miss_name = hit_name
        miss = address(miss_name)
        if warmup:
            observe(hit, model, warm, True, seed=seed)
            observe(miss, model, warm[: max(1, warmup // 4)], False, seed=seed)
        hits, misses = interleaved(hit, miss, model, imgs, chunk, seed=seed)
        obs = hits + misses
        both = accuracy(obs, ("content", "timing"), seed=seed)
        content = accuracy(obs, ("content",), seed=seed)
        timing = accuracy(obs, ("timing",), seed=seed)
        lat = lambda o: np.median([v.latency_s for v in o]) * 1e3  # noqa: E731
        rows.append({
            "policy": policy, "padding": pad, "hit_mode": mode, "hit_sidecar": hit_name,
            "miss_sidecar": miss_name, "model": model, "n_hits": len(hits), "n_misses": len(misses),
            "accuracy": both["accuracy"], "rule_accuracy": both["rule_accuracy"],
            "logreg_accuracy": both["logreg_accuracy"], "content_accuracy": content["accuracy"],
            "timing_accuracy": timing["logreg_accuracy"],
            "median_hit_latency_ms": float(lat(hits)), "median_miss_latency_ms": float(lat(misses)),
            "seconds": time.perf_counter() - t0,
        })
        bar.update()
    return rows


# -- Square Attack with OARS-style resampling ---------------------------------------------

#: The resampling ladder: (max shift in px, Gaussian noise sigma) per level; level 0 = as is.
LADDER: tuple[tuple[int, float], ...] = ((0, 0.0), (1, 0.0), (2, 0.0), (2, 4.0), (2, 8.0), (2, 16.0), (2, 32.0))


def ladder_transform(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    shift, sigma = LADDER[level]
    out = np.asarray(img, np.uint8)
    if shift:
        dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
        if dx == 0 and dy == 0:  # a transform that does nothing would only repeat the query
            dx = int(rng.choice([-1, 1]))
        out = shift_image(out, dx, dy)
    if sigma:
        out = np.clip(np.round(out.astype(np.float32) + rng.normal(0, sigma, out.shape)), 0, 255).astype(np.uint8)
    return out


class ReplayDetector:
    """Cached iff the answer (label and shown scores) repeats an earlier answer byte for byte."""

    name = "replay"

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, label: int, scores: np.ndarray, image: np.ndarray) -> bool:
        key = int(label).to_bytes(2, "little") + np.asarray(scores, np.float32).tobytes()
        hit = key in self.seen
        self.seen.add(key)
        return hit


class OracleDetector:
    """Ground truth from the sidecar's counters (an upper bound; no client can do this)."""

    name = "oracle"

    def __init__(self, sidecar: LocalSidecar, model: str) -> None:
        self.sidecar = sidecar
        self.model = model
        self._last = sidecar.counters(model)

    def __call__(self, label: int, scores: np.ndarray, image: np.ndarray) -> bool:
        now = self.sidecar.counters(self.model)
        d = counter_delta(now, self._last)
        self._last = now
        return d["forwards"] == 0


def margin(scores: np.ndarray, y: int) -> float:
    """log score[y] - max other log score (negative: misclassified). Works for shown top-k
    (absent classes count as ~0)."""
    logp = np.log(np.clip(np.asarray(scores, np.float64), 1e-12, None))
    other = np.delete(logp, y)
    return float(logp[y] - other.max())


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """The Square Attack's schedule of the square's area fraction (the authors' code)."""
    it = int(it / max(1, n_iters) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


@dataclass
class SquareResult:
    image: np.ndarray  # the returned candidate (inside the eps-ball, untransformed)
    claimed: bool
    queries: int
    detected_hits: int
    abandoned_steps: int
    mean_level: float
    final_margin: float


def square_attack(classify: Callable[[np.ndarray], tuple[int, np.ndarray]], x: np.ndarray, y: int, *,
                  eps: float, budget: int, p_init: float = 0.05, rng: np.random.Generator,
                  detector: Callable | None = None, max_resamples: int = 6) -> SquareResult:
    """Untargeted Linf Square Attack; with ``detector`` the OARS-style resampling."""
    x = np.asarray(x, np.uint8)
    h, w, c = x.shape
    xf = x.astype(np.float32)
    state = {"queries": 0, "hits": 0, "level": 0, "levels": []}

    def ask(cand: np.ndarray, level: int | None = None, resample: bool = True):
        """(label, scores, judged_fresh, level) for ``cand``, resampled up the ladder
        while the detector judges the answer cached."""
        level = (state["level"] if detector else 0) if level is None else level
        for attempt in range(max_resamples + 1):
            img = cand if level == 0 else ladder_transform(cand, level, rng)
            label, scores = classify(img)
            state["queries"] += 1
            state["levels"].append(level)
            cached = bool(detector(label, scores, img)) if detector else False
            if not cached:
                if resample:
                    state["level"] = max(0, level - 1)
                return label, scores, True, level
            state["hits"] += 1
            if not resample or attempt == max_resamples or state["queries"] >= budget:
                break
            level = min(level + 1, len(LADDER) - 1)
        if resample:
            state["level"] = level
        return label, scores, False, level

    def confirmed(cand: np.ndarray, label: int, fresh: bool, level: int) -> bool:
        """A success counts only for the candidate itself: an answer about a transformed
        copy is checked with one untransformed query (which must be judged fresh)."""
        if not fresh or label == y:
            return False
        if level == 0:
            return True
        if state["queries"] >= budget:
            return False
        label0, _, fresh0, _ = ask(cand, level=0, resample=False)
        return fresh0 and label0 != y

    def to_img(delta: np.ndarray) -> np.ndarray:
        return np.clip(np.round(xf + delta), 0, 255).astype(np.uint8)

    delta = eps * rng.choice([-1.0, 1.0], size=(1, w, c)).astype(np.float32)
    delta = np.broadcast_to(delta, (h, w, c)).copy()
    best = to_img(delta)
    label, scores, fresh, level = ask(best)
    # margins of the current best per ladder level: a candidate is compared with the best
    # as measured through the same kind of transform (a shift moves the margin by itself)
    best_at: dict[int, float] = {level: margin(scores, y)} if fresh else {}
    claimed = confirmed(best, label, fresh, level)
    abandoned = 0
    it = 0
    while not claimed and state["queries"] < budget:
        p = p_selection(p_init, it, budget)
        s = int(min(max(round(np.sqrt(p * h * w)), 1), h - 1))
        r0, c0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        new = delta.copy()
        for _ in range(10):  # a window that actually changes
            new[r0:r0 + s, c0:c0 + s, :] = eps * rng.choice([-1.0, 1.0], size=(1, 1, c))
            if not np.array_equal(new[r0:r0 + s, c0:c0 + s], delta[r0:r0 + s, c0:c0 + s]):
                break
        cand = to_img(new)
        label, scores, fresh, level = ask(cand)
        it += 1
        if not fresh:
            abandoned += 1
            continue
        m = margin(scores, y)
        ref = best_at.get(level, best_at.get(0, min(best_at.values(), default=np.inf)))
        if m < ref or label != y:
            delta, best, best_at = new, cand, {level: m}
            claimed = confirmed(cand, label, fresh, level)
        elif level not in best_at:
            best_at[level] = max(m, ref)  # first look at the best's neighbourhood through this transform
    return SquareResult(best, bool(claimed), state["queries"], state["hits"], abandoned,
                        float(np.mean(state["levels"])) if state["levels"] else 0.0,
                        float(best_at.get(0, min(best_at.values(), default=np.inf))))


@dataclass(frozen=True)
class OarsCell:
    mode: str  # off | paper | hardened
    policy: str  # scores_exact | scores_default | ...
    sidecar: str
    attack: str  # "square" | "square+oars"
    detector: str | None = None  # replay | oracle (square+oars only)

    @property
    def label(self) -> str:
        return self.attack + (f"[{self.detector}]" if self.detector else "")


def run_oars(ep, model: str, x: np.ndarray, y: np.ndarray, cells: Sequence[OarsCell], *, n_images: int,
             budget: int, eps: float, p_init: float = 0.05, max_resamples: int = 6, seed: int = 0,
             progress: bool = True) -> list[dict]:
    """Every cell on ``n_images`` correctly classified images, each cell on a fresh
    sidecar, one attacker session per image; same images and seeds in every cell."""
    from .harness import _progress

    idx, _, _ = select_images(ep, model, x, y, n_images, seed)
    rng0 = np.random.default_rng([seed, 8])
    seeds = {int(i): int(rng0.integers(2**31)) for i in idx}
    rows = []
    bar = _progress(len(cells) * len(idx), f"OARS {model}", progress)
    for cell in cells:
        with fresh_sidecar(ep, cell.sidecar) as sc:
            t = GrpcTransport(sc.address, model)
            returned = []
            try:
                for i in idx:
                    i = int(i)
                    session = new_session(f"oars-{cell.mode}")

                    def classify(img, session=session):
                        labels, scores = t.batch(session, img[None])
                        return int(labels[0]), scores[0]

                    det = None
                    if cell.detector == "replay":
                        det = ReplayDetector()
                    elif cell.detector == "oracle":
                        det = OracleDetector(sc, model)
                    before = sc.counters(model)
                    t0 = time.perf_counter()
                    r = square_attack(classify, x[i], int(y[i]), eps=eps, budget=budget, p_init=p_init,
                                      rng=np.random.default_rng(seeds[i]), detector=det,
                                      max_resamples=max_resamples)
                    d = counter_delta(sc.counters(model), before)
                    returned.append(r.image)
                    diff = r.image.astype(np.int32) - x[i].astype(np.int32)
                    rows.append({
                        "attack": cell.label, "mode": cell.mode, "policy": cell.policy, "sidecar": cell.sidecar,
                        "model": model, "image_index": i, "true_label": int(y[i]),
                        "claimed_success": r.claimed, "queries": r.queries, "detected_hits": r.detected_hits,
                        "abandoned_steps": r.abandoned_steps, "mean_level": r.mean_level,
                        "forwarded": int(d["forwards"]),
                        "cached": int(d["cache_session"] + d["cache_lookup"]),
                        "cached_lookup": int(d["cache_lookup"]), "linf": int(np.abs(diff).max()),
                        "eps": eps, "budget": budget, "seconds": time.perf_counter() - t0,
                    })
                    bar.update()
            finally:
                t.close()
        truth = model_labels(ep, model, np.stack(returned))
        for row, lab in zip(rows[-len(returned):], truth):
            row["model_label"] = int(lab)
            row["model_fooled"] = bool(lab != row["true_label"])
            row["success"] = bool(row["claimed_success"] and row["model_fooled"])
    bar.close()
    return rows


def summarize_oars(rows: list[dict], profile: str):
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    for (mode, policy, attack), g in df.groupby(["mode", "policy", "attack"], sort=False):
        ok = g[g.success]
        out.append({
            "mode": mode, "policy": policy, "attack": attack, "model": g.model.iloc[0],
            "asr": float(g.success.mean()), "n": int(len(g)), "successes": int(g.success.sum()),
            "asr_claimed": float(g.claimed_success.mean()), "asr_model": float(g.model_fooled.mean()),
            "mean_queries": float(g.queries.mean()),
            "median_queries_success": float(ok.queries.median()) if len(ok) else float("nan"),
            "forwarded_fraction": float(g.forwarded.sum() / max(1, g.queries.sum())),
            "detected_hit_fraction": float(g.detected_hits.sum() / max(1, g.queries.sum())),
            "true_cached_fraction": float(g.cached.sum() / max(1, g.queries.sum())),
            "mean_ladder_level": float(g.mean_level.mean()), "max_linf": int(g.linf.max()),
            "eps": g.eps.iloc[0], "budget": int(g.budget.iloc[0]), "sidecar": g.sidecar.iloc[0], "profile": profile,
        })
    return pd.DataFrame(out)
