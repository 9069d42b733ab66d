"""Issue 23's acceptance figures for hardened mode, measured on the real CIFAR-10 test subset.

The judgment is the sidecar's own, driven in process by ``bench_adaptive.Deployment``
exactly as the data plane drives it (session anchors, exact-bytes answers, the
per-principal near-duplicate budget), in front of exported models: the quick ``cnn``
(``models/cnn``) and the same net trained with photometric augmentation
(``models-photometric/cnn``: ``lab.train.train(..., augment=True, photometric=True)``).
What reached the model is counted there. Stages:

* ``denial``: an attacker spends ``queries`` near-duplicates (noise +-6/255, JPEG,
  shifts, smooth fields) of 20 images, each in a fresh session, from one host and
  then from 10 accounts; other principals then send the exact images: refused or
  told a label other than the model's label for those bytes;
* ``benign``: 12+ users (each its own principal) send 20 popular images once each, as
  exact bytes, JPEG q70-95, a 1-2 px shift or brightness +-8/255: refused plus wrong
  (not the model's label for the bytes sent); and every test image streamed by one
  principal (one session, then a fresh session each): the share the model answered;
* ``blinding``: per family of ``lab.blinding`` and strength, the share of blinded clean
  images keeping their label on the augmented model, and the share of blinded 1-pixel
  queries (a fresh transform per query, each in a fresh session of one host) that
  reached the model;
* ``rotation``: 1-pixel copies of seen images, each in a fresh session of one host, and
  spread over 10 Sybil accounts;
* ``oars``: an attacker that tunes the blinding strength against its measured hit rate
  (answers byte-identical to an earlier one count as misses);
* ``end_to_end``: ART's SquareAttack (L-inf 8/255) whose every score is the mean over 4
  blinded copies (expectation over transformations; default: ``field`` blinding at 8/255), at
  most 10,000 queries, through hardened mode and with no defense, on correctly classified
  test images of the augmented model. Rows go to a JSONL file as they finish
  (``--resume``: finished images are not rerun).

``python -m benchmarks.bench_hardened [--stages a,b] [--images N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .bench_adaptive import REFUSED, Deployment, Model, one_pixel_copy

AUG_DIR, QUICK_DIR = "models-photometric", "models"


def wilson(k: int, n: int) -> list[float]:
    """``lab.cells.wilson`` rounded for the JSON; [0, 1] (nothing known) for n = 0."""
    from lab.cells import wilson as interval

    return [round(v, 4) for v in interval(k, n)] if n else [0.0, 1.0]


def _noisy(img, rng, amp=6):
    return np.clip(img.astype(int) + rng.integers(-amp, amp + 1, img.shape), 0, 255).astype(np.uint8)


def _near_duplicate(img, rng):
    from lab import blinding as B

    k = int(rng.integers(5))
    if k == 0:
        return _noisy(img, rng)
    if k == 1:
        return B.jpeg(img, rng, int(rng.integers(60, 96)))
    if k == 2:
        return B.shift(img, rng, 2)
    if k == 3:
        return B.field(img, rng, 24)
    return B.photometric(img, rng, 0.5)


def denial(x, model: Model, seed=0, images=20, queries=1000, accounts=10, victims=10) -> dict:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), images, replace=False)
    out = {"images": images, "attacker_queries": queries, "victims_per_image": victims}
    for setting in ("fresh_sessions_one_host", f"{accounts}_accounts"):
        dep = Deployment("hardened", model)
        for q in range(queries):
            i = idx[q % images]
            principal = "attacker-host" if setting.startswith("fresh") else f"account-{q % accounts}"
            dep.ask(f"att-{q}", _near_duplicate(x[i], rng), principal)
        attacker_forwarded = dep.forwards
        bad = refused = total = 0
        for i in idx:
            truth = int(model.labels([x[i]])[0])
            for v in range(victims):
                a = dep.ask(f"victim-{i}-{v}", x[i], f"victim-{i}-{v}")
                total += 1
                refused += a == REFUSED
                bad += a != truth
        out[setting] = {"victim_requests": total, "refused": int(refused), "refused_or_mislabelled": int(bad),
                        "rate": round(bad / total, 4), "wilson95": wilson(bad, total),
                        "attacker_forwarded": attacker_forwarded}
        dep.close()
    return out


def benign(x, model: Model, seed=0, users=12, popular=20, rounds=3) -> dict:
    """``rounds`` independent streams (different popular images and users), pooled."""
    from lab import blinding as B

    rng = np.random.default_rng(seed)
    kinds = ("exact", "jpeg", "shift", "brightness")
    reqs = []
    make = {"exact": lambda im: im.copy(), "jpeg": lambda im: B.jpeg(im, rng, int(rng.integers(70, 96))),
            "shift": lambda im: B.shift(im, rng, 2), "brightness": lambda im: B.brightness(im, rng, 8)}
    for r in range(rounds):
        pop = rng.choice(len(x), popular, replace=False)
        for u in range(users):
            for i in pop:
                kind = kinds[int(rng.integers(4))]
                reqs.append((f"round{r}-user{u}", kind, make[kind](x[i])))
    reqs = [reqs[j] for j in rng.permutation(len(reqs))]
    truth = model.labels([r[2] for r in reqs])
    out = {"users": users, "popular_images": popular, "rounds": rounds, "requests": len(reqs)}
    for mode in ("paper", "hardened"):
        dep = Deployment(mode, model)
        ans = np.asarray([dep.ask(u, img, u) for u, _, img in reqs])
        bad = ans != truth
        k = np.asarray([r[1] for r in reqs])
        out[mode] = {"refused_or_mislabelled": int(bad.sum()), "rate": round(float(bad.mean()), 4),
                     "wilson95": wilson(int(bad.sum()), len(reqs)), "refused": int((ans == REFUSED).sum()),
                     "by_kind": {kk: f"{int(bad[k == kk].sum())}/{int((k == kk).sum())}" for kk in kinds}}
        dep.close()
    # distinct test images, one principal
    for name, session in (("one_session", lambda i: "user"), ("fresh_sessions", lambda i: f"s{i}")):
        dep = Deployment("hardened", model)
        ans = np.asarray([dep.ask(session(i), img, "one-user") for i, img in enumerate(x)])
        out[f"distinct_{name}"] = {"images": len(x), "answered_by_model": round(dep.forwards / len(x), 4),
                                   "wrong": int((ans != model.labels(x)).sum())}
        dep.close()
    return out


def keeps_label(model: Model, imgs, fam, s, rng, reps=2) -> float:
    from lab import blinding as B

    T = B.transform(fam, s)
    base = model.labels(imgs)
    kept = [model.labels([T(im, rng) for im in imgs]) == base for _ in range(reps)]
    return float(np.mean(kept))


def blinding(x, aug: Model, seed=0, images=10, queries=100, keep_images=300) -> dict:
    from lab import blinding as B

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), images, replace=False)
    out = {"images": images, "queries_per_image": queries}
    for fam, strengths in B.FAMILIES.items():
        rows = {}
        for s in strengths:
            T = B.transform(fam, s)
            keep = keeps_label(aug, x[:keep_images], fam, s, rng)
            reached = 0
            for i in idx:
                dep = Deployment("hardened", aug)
                dep.ask("origin", x[i], "attacker-host")
                before = dep.forwards
                for q in range(queries):
                    dep.ask(f"q{q}", T(one_pixel_copy(x[i], rng), rng), "attacker-host")
                reached += dep.forwards - before
                dep.close()
            n = images * queries
            rows[str(s)] = {"keeps_label": round(keep, 4), "reached": round(reached / n, 4),
                            "wilson95": wilson(reached, n), "in_scope": keep >= 0.9}
        out[fam] = rows
    return out


def rotation(x, model: Model, seed=0, images=10, copies=100, accounts=10) -> dict:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), images, replace=False)
    out = {"copies": images * copies}
    for setting in ("one_host", f"{accounts}_accounts"):
        reached = 0
        for i in idx:
            dep = Deployment("hardened", model)
            dep.ask("origin", x[i], "attacker-host")
            before = dep.forwards
            for k in range(copies):
                p = "attacker-host" if setting == "one_host" else f"account-{k % accounts}"
                dep.ask(f"rot-{k}", one_pixel_copy(x[i], rng), p)
            reached += dep.forwards - before
            dep.close()
        out[setting] = {"reached": round(reached / (images * copies), 4), "wilson95": wilson(reached, images * copies)}
    return out


def oars(x, aug: Model, seed=0, images=5, queries=300, families=("field", "photometric", "texture", "affine", "shift",
                                                                   "combo")) -> dict:
    """OARS-style: the attacker adapts the blinding strength to its measured hit rate
    (a miss: scores byte-identical to an answer it already had). Start at the family's
    weakest strength; every 20 queries, below 50% hits multiply the strength by 1.5,
    above 80% divide it by 1.2. ``capped``: never above the largest strength at which
    >= 90% of blinded clean images keep their label on the augmented model (measured
    first: stronger blinding buys hits with useless queries); ``uncapped``: up to 4x the
    family's largest listed strength (reported with the label-keeping rate there)."""
    from lab import blinding as B

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), images, replace=False)
    integer = ("shift", "crop", "border")
    out = {}
    for fam in families:
        lo, hi = min(B.FAMILIES[fam]), max(B.FAMILIES[fam])
        keep = {s: keeps_label(aug, x[:300], fam, s, rng) for s in B.FAMILIES[fam]}
        scope = [s for s in B.FAMILIES[fam] if keep[s] >= 0.9]
        row = {"in_scope_max": max(scope) if scope else None}
        for name, cap in (("capped", max(scope) if scope else None), ("uncapped", 4 * hi)):
            if cap is None:
                row[name] = "no strength keeps the label for >= 90%"
                continue
            reached = total = 0
            finals = []
            for i in idx:
                dep = Deployment("hardened", aug)
                s, seen, hits = float(lo), set(), []
                for q in range(queries):
                    st = int(round(s)) if fam in integer else s
                    sc = dep.ask_scores(f"q{q}", B.FUNCTIONS[fam](one_pixel_copy(x[i], rng), rng, st), "attacker-host")
                    b = sc.tobytes()
                    hits.append(b not in seen)
                    seen.add(b)
                    if len(hits) % 20 == 0:
                        rate = float(np.mean(hits[-20:]))
                        s = min(cap, s * 1.5) if rate < 0.5 else (max(lo, s / 1.2) if rate > 0.8 else s)
                reached += dep.forwards
                total += queries
                finals.append(s)
                dep.close()
            fin = float(np.median(finals))
            row[name] = {"reached": round(reached / total, 4), "wilson95": wilson(reached, total),
                         "final_strength_median": round(fin, 3),
                         "keeps_label_at_final": round(keeps_label(aug, x[:300], fam,
                                                                   int(round(fin)) if fam in integer else fin, rng), 4)}
        out[fam] = row
    return out


def end_to_end(x, y, aug: Model, rows_path: Path, images=100, max_queries=10_000, eot=4, family="field",
               strength=8.0, eps=8.0, seed=0, modes=("hardened", "off"), shard: tuple[int, int] = (0, 1)) -> dict:
    """Resumable: one JSON line per (image, mode) in ``rows_path``. Modes: ``hardened``,
    ``off`` (no defense) and ``noinfo``: every answer is the clean image's scores, so the
    attack learns nothing; its success rate is the floor no query-based defense can go
    under (the attack's starting point already fools the model). ``shard`` (k, n): this
    process runs the k-th of every n images (several processes may share one rows file:
    each appends whole lines)."""
    from art.attacks.evasion import SquareAttack
    from threadpoolctl import threadpool_limits

    from lab import blinding as B
    from lab.estimators import black_box

    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["image"], r["mode"])] = r
    labels = aug.labels(x)
    correct = [int(i) for i in np.flatnonzero(labels == y)][:images]
    T = (lambda img, rng: img) if family == "none" else B.transform(family, strength)
    with threadpool_limits(1):
        for pos, i in enumerate(correct):
            if pos % shard[1] != shard[0]:
                continue
            for mode in modes:
                if (i, mode) in done:
                    continue
                rng = np.random.default_rng(seed + i)
                dep, clean = Deployment("off" if mode == "noinfo" else mode, aug), int(labels[i])
                t0 = time.perf_counter()

                class Spent(Exception):
                    pass

                best = [x[i], np.inf]  # the candidate the attacker saw with the smallest margin

                def predict(batch, dep=dep, rng=rng, best=best, clean=clean, mode=mode, i=i):
                    if mode == "noinfo":  # every answer is the clean image's: what the attack gets from nothing
                        dep.asked += len(batch)
                        return np.repeat(aug.scores([x[i]]), len(batch), axis=0)
                    res = []
                    for c in np.clip(np.rint(batch), 0, 255).astype(np.uint8):
                        if dep.asked + eot > max_queries:
                            raise Spent
                        s = np.mean([dep.ask_scores(f"q{dep.asked}", T(c, rng), "attacker-host")
                                     for _ in range(eot)], axis=0)
                        margin = float(s[clean] - np.max(np.delete(s, clean)))
                        if margin < best[1] and np.abs(c.astype(int) - x[i].astype(int)).max() <= eps:
                            best[0], best[1] = c, margin
                        res.append(s)
                    return np.stack(res)

                attack = SquareAttack(black_box(predict), norm=np.inf, eps=eps,
                                      max_iter=1 if mode == "noinfo" else max_queries // eot - 2,
                                      p_init=0.05, nb_restarts=1, verbose=False)
                np.random.seed(seed + i)

                try:
                    adv = np.clip(np.rint(attack.generate(x[i][None].astype(np.float32), y=np.eye(10)[[clean]])[0]),
                                  0, 255).astype(np.uint8)
                except Spent:
                    adv = best[0]
                # the attacker's pick: ART's result, or the candidate it saw with the smallest margin
                final = adv if aug.labels([adv])[0] != clean else best[0]
                linf = float(np.abs(final.astype(int) - x[i].astype(int)).max())
                row = {"image": i, "mode": mode, "queries": dep.asked, "reached": dep.forwards,
                       "success": bool(aug.labels([final])[0] != clean and linf <= eps + 1e-6),
                       "linf": linf, "seconds": round(time.perf_counter() - t0, 1)}
                dep.close()
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done[(i, mode)] = row
    out = {"family": family, "strength": strength, "eot": eot, "eps": eps, "max_queries": max_queries}
    for mode in modes:
        if rows_path.exists():  # other shards' rows too
            for line in rows_path.read_text().splitlines():
                r = json.loads(line)
                done.setdefault((r["image"], r["mode"]), r)
        rows = [r for (i, m), r in done.items() if m == mode and i in correct]
        k = sum(r["success"] for r in rows)
        out[mode] = {"images": len(rows), "successes": k, "rate": round(k / max(len(rows), 1), 4),
                     "wilson95": wilson(k, len(rows)),
                     "queries_mean": round(float(np.mean([r["queries"] for r in rows])), 1) if rows else None,
                     "reached_mean": round(float(np.mean([r["reached"] for r in rows])), 1) if rows else None}
    return out


STAGES = ("denial", "benign", "blinding", "rotation", "oars", "end_to_end")


def run(models_dir: str = QUICK_DIR, aug_dir: str = AUG_DIR, model: str = "cnn", stages=STAGES, images: int = 100,
        rows_path: str | Path = "results/adaptive/hardened_v3_e2e_rows.jsonl", quick: bool = True,
        e2e: dict | None = None, stage_images: int | None = None) -> dict:
    from lab.cifar10 import load_cifar10

    data = load_cifar10()
    x, y = data.x_test, data.y_test
    from lab import blinding as B

    B.set_backgrounds(data.x_train[:500])
    quick_m, aug = Model(models_dir, model), Model(aug_dir, model)
    out = {"models": {"quick": f"{models_dir}/{model}", "augmented": f"{aug_dir}/{model}"},
           "stand_in": {"quick": quick_m.stand_in, "augmented": aug.stand_in}}
    if aug.stand_in:
        out["note"] = f"no augmented model under {aug_dir}/{model}: train it with lab.train (photometric=True)"
    fns = {
        "denial": lambda: {"quick": denial(x, quick_m), "augmented": denial(x, aug)},
        "benign": lambda: {"quick": benign(x, quick_m), "augmented": benign(x, aug)},
        "blinding": lambda: blinding(x, aug, images=stage_images or (5 if quick else 10), queries=60 if quick else 100),
        "rotation": lambda: {"quick": rotation(x, quick_m, images=stage_images or 10),
                             "augmented": rotation(x, aug, images=stage_images or 10)},
        "oars": lambda: oars(x, aug, images=stage_images or (3 if quick else 5)),
        "end_to_end": lambda: end_to_end(x, y, aug, Path(rows_path), images=images, **(e2e or {})),
    }
    for name in stages:
        t = time.perf_counter()
        out[name] = fns[name]()
        out[name]["seconds"] = round(time.perf_counter() - t, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--images", type=int, default=100, help="end_to_end: correctly classified test images")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--rows", default="results/adaptive/hardened_v3_e2e_rows.jsonl")
    ap.add_argument("--family", default="field", help="end_to_end: blinding family (lab.blinding)")
    ap.add_argument("--strength", type=float, default=8.0, help="end_to_end: blinding strength")
    ap.add_argument("--eot", type=int, default=4, help="end_to_end: blinded copies averaged per score")
    ap.add_argument("--modes", default="hardened,off", help="end_to_end: defenses")
    ap.add_argument("--shard", default="0/1", help="end_to_end: k/n, this process runs every n-th image from k")
    ap.add_argument("--out", default="")
    ap.add_argument("--stage-images", type=int, default=None,
                    help="images per cell of the blinding, rotation and OARS stages (default 5/10/3 quick, "
                         "10/10/5 --full; issue 29's adaptive table: 100)")
    ap.add_argument("--train-augmented", action="store_true",
                    help=f"train the photometric-augmentation cnn into {AUG_DIR}/ first if it is missing "
                         "(lab.train, quick profile, 20 epochs as workbook 06, augment and photometric jitter on)")
    a = ap.parse_args()
    if a.train_augmented and Model(AUG_DIR, "cnn").stand_in:
        from lab.train import train_augmented

        train_augmented("cnn", AUG_DIR)
    res = run(stages=a.stages.split(","), images=a.images, rows_path=a.rows, quick=not a.full, stage_images=a.stage_images,
              e2e={"family": a.family, "strength": a.strength, "eot": a.eot, "modes": tuple(a.modes.split(",")),
                   "shard": tuple(int(v) for v in a.shard.split("/"))})
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
