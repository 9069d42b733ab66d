"""Issue 10's costs and attacks, measured on the real CIFAR-10 test subset.

The judgment is the sidecar's own (``sidecar.judge.judgment.plan`` with the
sessions' anchors and, in hardened mode, ``sidecar.state.crosssession``), driven
in process by ``Deployment`` exactly as the data plane drives it, in front of
the exported model (``models/<model>/<latest>``, or a deterministic stand-in
when none is exported: then label-based figures are marked ``stand_in``).
What reached the model is counted there: the experiments' ground truth.

* ``false_cache``: distinct test images judged similar: over all pairs (the
  fraction of images that some other image would be answered by), streamed in
  one session, and each in a fresh session (cross-session: refused counts too);
* ``popular_stream``: users send popular images exactly and as near-duplicates
  (JPEG re-encode at quality 75/85/95, 1-px shift) beside their own images:
  wrong answers (not the model's answer for those bytes) and refusals;
* ``poisoning``: an attacker sends an adversarial 5-pixel copy of a popular
  image first, victims then send the image (and near-duplicates) in their own
  sessions: victims told the attacker's label;
* ``rotation``: 1-pixel copies of a seen image, each in a fresh session;
* ``blinding``: hash-aware masks (a), low-pass-aware masks (b) and random
  transforms at increasing strength (c), each on 1-pixel candidates: the
  fraction that reached the model, the mask size, and for (c) whether the
  blinded clean image keeps its label; (e) One Pixel DE (ART) through each;
* ``oars``: workbook 07's OARS-style resampling Square attack (quick: 3 images,
  300 iterations; ``--full``: 30 images, 10,000);
* ``index``: see ``bench_index`` (judgment + lookup at 100k entries).

``python -m benchmarks --only adaptive`` runs it; ``run(quick=True)`` keeps it
to a few minutes on two cores.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

from sidecar.state.crosssession import CrossSessionIndex, digest
from sidecar.judge.judgment import HARDENED_TAU, PAPER_THRESHOLD, Thresholds, fingerprints, plan, resolve
from sidecar.judge.lowpass import distance, lowpass
from sidecar.judge.phash import phash_batch

REFUSED = -1


class Model:
    """Labels of the exported model, memoised by exact bytes."""

    def __init__(self, models_dir: str, name: str) -> None:
        self.cache: dict[bytes, np.ndarray] = {}
        base = Path(models_dir) / name
        versions = sorted((int(p.name) for p in base.glob("*") if p.name.isdigit()), reverse=True) if base.exists() else []
        self.stand_in = not versions
        self.fn = None
        if versions:
            from lab.estimators import load_scores_fn

            self.fn = load_scores_fn(base / str(versions[0]))
        self.calls = 0

    def scores(self, images) -> np.ndarray:
        imgs = [np.asarray(i) for i in images]
        missing = [i for i, im in enumerate(imgs) if digest(im) not in self.cache]
        if missing:
            batch = np.stack([imgs[i] for i in missing]).astype(np.float32)
            if self.fn is None:
                out = np.stack([np.random.default_rng(zlib.crc32(b.tobytes())).dirichlet(np.ones(10)) for b in batch])
            else:
                out = np.concatenate([np.asarray(self.fn(batch[j:j + 512])) for j in range(0, len(batch), 512)])
            for i, row in zip(missing, out):
                self.cache[digest(imgs[i])] = np.asarray(row, np.float32)
        return np.stack([self.cache[digest(im)] for im in imgs])

    def labels(self, images) -> np.ndarray:
        return np.argmax(self.scores(images), axis=1)


class Deployment:
    """The sidecar's judgment for one mode, in process, in front of ``model``."""

    def __init__(self, mode: str, model: Model, history: int = 8, **index_kw) -> None:
        self.mode, self.model = mode, model
        self.th = Thresholds() if mode == "paper" else Thresholds(lowpass_tau=HARDENED_TAU)
        self.history = 1 if mode == "paper" else history
        self.index = CrossSessionIndex(**{"window": 100_000, "ttl_s": 0, **index_kw}) if mode == "hardened" else None
        self.anchors: dict[str, tuple] = {}
        self.forwards = self.refusals = self.asked = 0
        # its own loop in its own thread: callers may already run a loop (a notebook's kernel)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="deployment-loop", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def ask(self, session: str, image: np.ndarray, principal: str | None = None) -> int:
        s = self.ask_scores(session, image, principal)
        return REFUSED if s is None else int(np.argmax(s))

    def ask_scores(self, session: str, image: np.ndarray, principal: str | None = None) -> np.ndarray | None:
        """The scores shown (exact, as with --score-noise 0), None when refused (hardened
        mode no longer refuses: kept for the counts). ``principal``: whose near-duplicate
        budget the query spends (default: the session, one principal per session)."""
        coro = self._ask(session, np.ascontiguousarray(image, np.uint8), session if principal is None else principal)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _ask(self, session: str, image: np.ndarray, principal: str):
        self.asked += 1
        if self.mode == "off":
            self.forwards += 1
            return self.model.scores([image])[0]
        hard = self.index is not None
        fps = fingerprints([image], with_lowpass=hard, with_invariant=hard)
        p = plan(self.anchors.get(session, ()), fps, self.th, self.history,
                 self.index.lookup("m", principal) if hard else None)
        results = list(self.model.scores([f.image for f in p.forwarded])) if p.forwarded else []
        if p.forwarded and self.index is not None:
            futures = self.index.reserve("m", p.forwarded, principal)
            self.index.complete("m", p.forwarded, futures, results)
        self.forwards += len(results)
        answers, self.anchors[session] = resolve(p, results)
        a = answers[0]
        return await a if isinstance(a, asyncio.Future) else a


def one_pixel_copy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    y, x = rng.integers(0, img.shape[0]), rng.integers(0, img.shape[1])
    new = rng.integers(0, 256, 3)
    while (new == out[y, x]).all():
        new = rng.integers(0, 256, 3)
    out[y, x] = new
    return out


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy()


def shift1(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from lab.routing import shift_image

    dx, dy = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
    return shift_image(img, dx, dy)


# -- costs -------------------------------------------------------------------------------

def pairwise_false_cache(x: np.ndarray) -> dict:
    """Fraction of test images that some OTHER test image would be judged similar to."""
    n = len(x)
    flat = x.reshape(n, -1, 3)
    npix = np.stack([(flat[i][None] != flat).any(-1).sum(1) for i in range(n)])
    bits = np.unpackbits(phash_batch(x), axis=1)
    nhash = np.stack([(bits[i][None] != bits).sum(1) for i in range(n)])
    v = lowpass(x)
    d = np.stack([distance(v[i][None], v) for i in range(n)])
    off = ~np.eye(n, dtype=bool)
    paper = ((nhash <= PAPER_THRESHOLD) | (npix <= PAPER_THRESHOLD)) & off
    hard = ((d <= HARDENED_TAU) | (npix <= PAPER_THRESHOLD)) & off
    nn = np.where(off, d, np.inf).min(axis=1)
    return {"images": n, "lowpass_nn_quantiles": {q: round(float(np.quantile(nn, float(q))), 3)
                                                  for q in ("0.001", "0.005", "0.01", "0.05", "0.5")},
            "paper_images_with_a_similar_other": round(float(paper.any(1).mean()), 4),
            "hardened_images_with_a_similar_other": round(float(hard.any(1).mean()), 4),
            "paper_similar_pairs": round(float(paper[off].mean()), 6),
            "hardened_similar_pairs": round(float(hard[off].mean()), 6)}


def streamed_false_cache(x: np.ndarray, model: Model) -> dict:
    out = {}
    for mode in ("paper", "hardened"):
        dep = Deployment(mode, model)
        answers = [dep.ask("one-user", img) for img in x]
        truth = model.labels(x)
        out[f"{mode}_one_session_forwarded"] = round(dep.forwards / len(x), 4)
        out[f"{mode}_one_session_wrong"] = round(float(np.mean(np.asarray(answers) != truth)), 4)
        dep.close()
    dep = Deployment("hardened", model)
    answers = np.asarray([dep.ask(f"fresh-{i}", img, "one-host") for i, img in enumerate(x)])
    out["hardened_fresh_sessions_forwarded"] = round(dep.forwards / len(x), 4)
    out["hardened_fresh_sessions_refused"] = round(float(np.mean(answers == REFUSED)), 4)
    out["paper_fresh_sessions_forwarded"] = 1.0  # no memory across sessions: by construction
    dep.close()
    return out


def popular_stream(x: np.ndarray, model: Model, seed: int = 0, popular: int = 20, users: int = 8,
                   per_user: int = 60, modes=("paper", "hardened"), **index_kw) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    pop, own = order[:popular], list(order[popular:])
    reqs = []
    for u in range(users):
        for _ in range(per_user):
            if rng.random() < 0.6 or not own:
                src = x[int(rng.choice(pop))]
                r = rng.random()
                if r < 0.4:
                    reqs.append((f"user{u}", "exact", src.copy()))
                elif r < 0.7:
                    reqs.append((f"user{u}", "jpeg", jpeg(src, int(rng.choice([75, 85, 95])))))
                else:
                    reqs.append((f"user{u}", "shift", shift1(src, rng)))
            else:
                reqs.append((f"user{u}", "own", x[int(own.pop())].copy()))
    reqs = [reqs[j] for j in rng.permutation(len(reqs))]
    truth = model.labels([r[2] for r in reqs])
    out = {"requests": len(reqs), "users": users, "popular_images": popular}
    for mode in modes:
        dep = Deployment(mode, model, **(index_kw if mode == "hardened" else {}))
        ans = np.asarray([dep.ask(s, img) for s, _, img in reqs])
        kinds = np.asarray([k for _, k, _ in reqs])
        wrong = (ans != truth) & (ans != REFUSED)
        out[mode] = {"wrong_answers": round(float(wrong.mean()), 4), "refused": round(float((ans == REFUSED).mean()), 4),
                     "forwarded": round(dep.forwards / len(reqs), 4),
                     "by_kind": {k: {"n": int((kinds == k).sum()), "wrong": round(float(wrong[kinds == k].mean()), 4),
                                     "refused": round(float((ans[kinds == k] == REFUSED).mean()), 4)}
                                 for k in ("exact", "jpeg", "shift", "own")}}
        dep.close()
    return out


# -- attacks -------------------------------------------------------------------------------

def find_poison(x: np.ndarray, model: Model, idx, rng: np.random.Generator, tries: int = 200, k: int = 5):
    """The attacker's own search: random k-pixel copies until the model's label changes."""
    found = []
    for i in idx:
        clean = model.labels([x[i]])[0]
        cands = []
        for _ in range(tries):
            c = x[i].copy()
            c[rng.integers(0, 32, k), rng.integers(0, 32, k)] = rng.integers(0, 256, (k, 3))
            cands.append(c)
        labs = model.labels(cands)
        hit = np.flatnonzero(labs != clean)
        if len(hit):
            found.append((int(i), cands[int(hit[0])], int(labs[hit[0]])))
    return found


def poisoning(x: np.ndarray, model: Model, seed: int = 0, images: int = 30, victims: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    poison = find_poison(x, model, rng.choice(len(x), images, replace=False), rng)
    out = {"poisoned_images": len(poison), "victims_per_image": victims}
    for mode in ("paper", "hardened"):
        told = refused = total = 0
        for i, adv, adv_label in poison:
            dep = Deployment(mode, model)
            dep.ask("attacker", adv)
            for v in range(victims):
                img = x[i] if v % 2 == 0 else jpeg(x[i], 90)
                a = dep.ask(f"victim{v}", img)
                total += 1
                told += a == adv_label and model.labels([img])[0] != adv_label
                refused += a == REFUSED
            dep.close()
        out[mode] = {"victims_told_attackers_label": int(told), "victims": total, "refused": int(refused)}
    return out


def rotation(x: np.ndarray, model: Model, seed: int = 0, images: int = 5, copies: int = 100,
             modes=("paper", "hardened"), **index_kw) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for mode in modes:
        reached = 0
        for i in rng.choice(len(x), images, replace=False):
            dep = Deployment(mode, model, **(index_kw if mode == "hardened" else {}))
            dep.ask("origin", x[i], "attacker-host")
            before = dep.forwards
            for k in range(copies):
                dep.ask(f"rot-{k}", one_pixel_copy(x[i], rng), "attacker-host")
            reached += dep.forwards - before
            dep.close()
        out[f"{mode}_reached"] = round(reached / (images * copies), 4)
    out["copies"] = images * copies
    return out


def blinding(x: np.ndarray, model: Model, seed: int = 0, images: int = 4, queries: int = 150) -> dict:
    from threadpoolctl import threadpool_limits

    from lab.hashaware import lowpass_mask, phash_mask
    from lab.routing import blind

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), images, replace=False)
    kinds = {"a_phash_masks_16": lambda c, sent: phash_mask(c, 16.0, rng),
             "b_lowpass_masks_16": lambda c, sent: lowpass_mask(c, 16.0, sent[-256:], rng)}
    for sigma in (2, 4, 8, 16, 32):
        kinds[f"c_random_sigma{sigma}"] = lambda c, sent, s=sigma: blind(c, rng, 1, 0.0, float(s))
    out = {}
    with threadpool_limits(1):
        for kind, fn in kinds.items():
            row = {}
            for mode in ("paper", "hardened"):
                reached = total = 0
                linf, l2, keeps = [], [], []
                for i in idx:
                    dep = Deployment(mode, model)
                    sent = []
                    for _ in range(queries):
                        c = one_pixel_copy(x[i], rng)
                        q = fn(c, sent)
                        sent.append(lowpass(q[None])[0])
                        linf.append(float(np.abs(q.astype(int) - c.astype(int)).max()) / 255)
                        l2.append(float(np.sqrt((((q.astype(float) - c) / 255) ** 2).sum())))
                        before = dep.forwards
                        dep.ask(f"attacker-{i}", q)
                        reached += dep.forwards - before
                        total += 1
                    if mode == "paper":
                        blinded_clean = [fn(x[i], []) for _ in range(20)]
                        keeps.append(float(np.mean(model.labels(blinded_clean) == model.labels([x[i]])[0])))
                    dep.close()
                row[f"{mode}_reached"] = round(reached / total, 4)
                if keeps:
                    row["blinded_clean_keeps_label"] = round(float(np.mean(keeps)), 4)
            row["mask_linf_mean"] = round(float(np.mean(linf)), 4)
            row["mask_l2_mean"] = round(float(np.mean(l2)), 4)
            out[kind] = row
    return out


def one_pixel_through(x: np.ndarray, model: Model, seed: int = 0, images: int = 3, max_iter: int = 1) -> dict:
    """(e) ART's PixelAttack (DE, 1 pixel, untargeted) through each blinding, per mode."""
    from art.attacks.evasion import PixelAttack
    from threadpoolctl import threadpool_limits

    from lab.estimators import black_box
    from lab.hashaware import lowpass_mask, phash_mask

    rng = np.random.default_rng(seed)
    idx = [int(i) for i in rng.choice(len(x), 40, replace=False)]
    truth = model.labels([x[i] for i in idx])
    idx = idx[:images]
    masks = {"none": lambda c, sent: c, "phash_masks_16": lambda c, sent: phash_mask(c, 16.0, rng),
             "lowpass_masks_16": lambda c, sent: lowpass_mask(c, 16.0, sent[-256:], rng)}
    out = {}
    with threadpool_limits(1):
        for name, fn in masks.items():
            for mode in (("off",) if name == "none" else ()) + ("paper", "hardened"):
                rows = []
                for j, i in enumerate(idx):
                    dep, sent, clean = Deployment(mode, model), [], int(truth[j])

                    def predict(batch, dep=dep, sent=sent, clean=clean, i=i):
                        res = []
                        for c in np.clip(np.rint(batch), 0, 255).astype(np.uint8):
                            q = fn(c, sent)
                            sent.append(lowpass(q[None])[0])
                            a = dep.ask(f"attacker-{i}", q)
                            res.append(np.eye(10, dtype=np.float32)[clean if a == REFUSED else a])
                        return np.stack(res)

                    attack = PixelAttack(black_box(predict), th=1, es=1, max_iter=max_iter, targeted=False, verbose=False)
                    np.random.seed(seed + j)
                    adv = attack.generate(x[i][None].astype(np.float32), y=np.eye(10)[[clean]])[0]
                    final = np.clip(np.rint(adv), 0, 255).astype(np.uint8)
                    d = np.abs(final.astype(float) - x[i]) / 255
                    rows.append({"queries": dep.asked, "reached": dep.forwards / max(dep.asked, 1),
                                 "success_unmasked": bool(d.max() > 0 and model.labels([final])[0] != clean),
                                 "final_linf": float(d.max()), "final_l2": float(np.sqrt((d ** 2).sum()))})
                    dep.close()
                out[f"{name}/{mode}"] = {
                    "images": len(rows), "success_rate": round(float(np.mean([r["success_unmasked"] for r in rows])), 4),
                    "queries_mean": float(np.mean([r["queries"] for r in rows])),
                    "reached_mean": round(float(np.mean([r["reached"] for r in rows])), 4),
                    "final_linf_max": round(max(r["final_linf"] for r in rows), 4),
                    "final_l2_mean": round(float(np.mean([r["final_l2"] for r in rows])), 4)}
    return out


def oars(x: np.ndarray, model: Model, seed: int = 9, images: int = 3, max_iter: int = 300, eps: float = 8.0,
         max_resamples: int = 6, modes: tuple[str, ...] = ("off", "paper", "hardened")) -> dict:
    """Workbook 07's OARS-style attack: ART's SquareAttack (L-inf), each answer the attacker
    judges cached (byte-identical scores to an earlier answer, or refused) asked again through
    ``lab.routing.ladder`` transforms of growing size. Exact scores (noise 0): the easiest case
    for the attacker's cache detector."""
    from art.attacks.evasion import SquareAttack
    from threadpoolctl import threadpool_limits

    from lab.estimators import black_box
    from lab.routing import ladder

    rng = np.random.default_rng(seed)
    cand = [int(i) for i in rng.choice(len(x), 60, replace=False)]
    truth = model.labels([x[i] for i in cand])
    out = {"eps": eps, "max_iter": max_iter}
    with threadpool_limits(1):
        for mode in modes:
            rows = []
            for j, i in enumerate(cand[:images]):
                dep, seen, clean = Deployment(mode, model), set(), int(truth[j])
                last = [np.eye(10, dtype=np.float32)[clean]]

                def ask(img, dep=dep, seen=seen, last=last, i=i):
                    s = dep.ask_scores(f"attacker-{i}", img)
                    cached = s is None or s.tobytes() in seen
                    if s is not None:
                        seen.add(s.tobytes())
                        last[0] = s
                    return (last[0] if s is None else s), cached

                def predict(batch, ask=ask):
                    res = []
                    for c in np.clip(np.rint(batch), 0, 255).astype(np.uint8):
                        s, cached = ask(c)
                        level = 0
                        while cached and level < max_resamples and mode != "off":
                            level += 1
                            s, cached = ask(ladder(c, level, rng))
                        res.append(s)
                    return np.stack(res)

                attack = SquareAttack(black_box(predict), norm=np.inf, eps=eps, max_iter=max_iter, p_init=0.05,
                                      nb_restarts=1, verbose=False)
                np.random.seed(seed + j)
                adv = attack.generate(x[i][None].astype(np.float32), y=np.eye(10)[[clean]])[0]
                final = np.clip(np.rint(adv), 0, 255).astype(np.uint8)
                rows.append({"queries": dep.asked, "reached": dep.forwards / max(dep.asked, 1),
                             "success": bool(model.labels([final])[0] != clean)})
                dep.close()
            out[mode] = {"images": len(rows), "success_rate": round(float(np.mean([r["success"] for r in rows])), 4),
                         "queries_mean": float(np.mean([r["queries"] for r in rows])),
                         "reached_mean": round(float(np.mean([r["reached"] for r in rows])), 4)}
    return out


def budget_tradeoff(x: np.ndarray, model: Model, budgets=(2, 3, 5, 8)) -> dict:
    """--cluster-budget: benign wrong answers in the popular stream (each user its own
    principal) against rotation reach (one attacking host)."""
    out = {}
    for b in budgets:
        pop = popular_stream(x, model, modes=("hardened",), budget=b)["hardened"]
        rot = rotation(x, model, images=3, modes=("hardened",), budget=b)["hardened_reached"]
        out[str(b)] = {"popular_refused": pop["refused"], "popular_wrong": pop["wrong_answers"],
                       "rotation_reached": rot}
    return out


def run(models_dir: str = "models", model: str = "cnn", quick: bool = True) -> dict:
    from lab.cifar10 import load_cifar10

    t0 = time.perf_counter()
    x = load_cifar10().x_test
    m = Model(models_dir, model)
    out: dict = {"model": model, "stand_in_model": m.stand_in, "test_images": len(x),
                 "settings": {"lowpass_tau": HARDENED_TAU, "index_radius": CrossSessionIndex(1, 0).radius,
                              "cluster_budget": CrossSessionIndex(1, 0).budget, "history": 8}}
    stages = {
        "false_cache_pairs": lambda: pairwise_false_cache(x),
        "false_cache_streams": lambda: streamed_false_cache(x, m),
        "popular_stream": lambda: popular_stream(x, m),
        "poisoning": lambda: poisoning(x, m, images=12 if quick else 60),
        "rotation": lambda: rotation(x, m, images=3 if quick else 10),
        "budget_tradeoff": lambda: budget_tradeoff(x, m),
        "blinding": lambda: blinding(x, m, images=3 if quick else 10, queries=100 if quick else 300),
        "one_pixel": lambda: one_pixel_through(x, m, images=2 if quick else 10),
        "oars": lambda: oars(x, m, images=3 if quick else 30, max_iter=300 if quick else 10_000),
    }
    for name, fn in stages.items():
        t = time.perf_counter()
        out[name] = fn()
        out[name]["seconds"] = round(time.perf_counter() - t, 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
