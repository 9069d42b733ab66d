"""Table 1 with AdvBox's JSMA (the paper's attack), written here from its published semantics.

The paper ran AdvBox's ``SaliencyMapAttack``; the ``table1`` of ``lab.tables`` runs ART's
``SaliencyMapMethod``, which cannot stand in for it:

* ART perturbs *pairs* of features per step and stops at a ``gamma`` fraction of changed
  features; AdvBox (``two_pix`` forced False) changes ONE feature (one channel value, not a
  pixel) per step and stops only at ``max_iter`` (2000) steps or when no feature is left;
* ART removes a feature after one change; AdvBox lets a feature move up to
  ``max_perturbations_per_pixel`` (7) times before it leaves the search domain (or when it
  reaches a bound);
* AdvBox without a given target draws ONE random label != the original
  (``random.sample(range(10), 2)``, the first that is not the original) and accepts the
  first query whose argmax IS that target (targeted acceptance, checked once per step:
  every step is one model query); ART's targets and success test are its own.

``AdvBoxJSMA`` is that loop (``fast=True``: betas = -1; saliency
``|alpha| * |beta| * sign(alpha * beta)``; the feature at its argmin moves by
``sign(alpha) * theta * (max - min)``; clip to the bounds), with the target's gradient taken on
the attacker's local copy of the model and every "is it the target yet" answer asked through
the defense. ``gradient`` = ``logit`` (the default) differentiates the pre-softmax value of the
target class, as AdvBox's Keras wrapper does (``k.gradients(logits[:, label], input)``); our
exported models end in a softmax, so the local copy is the training-time Keras model cut before
its ``scores`` layer (``models-<profile>/<name>.keras``); ``score`` differentiates the softmax
score instead (the only thing a SavedModel-only attacker has).

Running a cell: every image runs in ITS OWN sidecar session and the images of a cell advance in
lockstep (one query per unfinished image per step, sent concurrently); in paper mode a session
holds one anchor, so a fresh session per image is what the first query of an image meets in one
long session too (there it is forwarded as well: a different image). ``lab.tables`` instead runs
a cell's images one after the other in one session; the lockstep is only what makes n = 100
images x up to 2000 steps fit on 2 cores.

    python -m lab.advbox_jsma [--models cnn lenet resnet] [--thetas 0.1 ...] [--n 100]
        [--defenses off paper] [--gradient logit]

gives each model its ``.keras`` copy (rebuilt from its export, or trained with the cpu recipe
and exported when it has none: ``ensure_models``), then writes its cells under ``reports/<profile>/cells/table1_advbox-...`` (resumable: a finished cell
is skipped) and, after every cell, ``results/<profile>/table1_advbox.csv`` and
``table1_advbox_provenance.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

IMPLEMENTATION = "lab.advbox_jsma.AdvBoxJSMA (AdvBox SaliencyMapAttack semantics, fast=True, one feature per step)"
EXPERIMENT = "table1_advbox"
DEFAULTS = {"max_iter": 2000, "max_perturbations_per_pixel": 7, "fast": True}


def advbox_target(original_label: int, seed: int, num_classes: int = 10) -> int:
    """AdvBox's ``_generate_random_target``: sample two labels, drop the original, keep the first."""
    picks = random.Random(seed).sample(range(num_classes), 2)
    return [t for t in picks if t != original_label][0]


@dataclass
class Outcome:
    adversarial: np.ndarray
    accepted: bool  # an answer said "target" (AdvBox's try_accept_the_example)
    answered_label: int  # the last answer the attack got (at acceptance: the target)
    queries: int  # answers asked (one per step, the accepting one included)
    steps: int  # features changed
    stop: str  # accepted | mask_empty | max_iter


class AdvBoxJSMA:
    """AdvBox's single-feature JSMA over a batch of independent images advancing in lockstep.

    ``answer(images, active) -> labels``: the defended argmax for ``images`` (those of the
    images whose indices are ``active``), one query each. ``gradient(images, targets) ->``
    d(target value)/d(image), same shape as ``images``. Images are on ``bounds`` (0-255).
    """

    def __init__(self, theta: float, max_iter: int = 2000, max_perturbations_per_pixel: int = 7,
                 bounds: tuple[float, float] = (0.0, 255.0), fast: bool = True) -> None:
        if not fast:
            raise NotImplementedError("only AdvBox's default fast=True (betas = -1)")
        self.theta, self.max_iter, self.cap = float(theta), int(max_iter), int(max_perturbations_per_pixel)
        self.lo, self.hi = map(float, bounds)

    def saliency(self, alphas: np.ndarray) -> tuple[int, float]:
        """(flat index, sign) of the feature AdvBox moves: argmin of |a|*|b|*sign(a*b), b = -1."""
        betas = -np.ones_like(alphas)
        sal = np.abs(alphas) * np.abs(betas) * np.sign(alphas * betas)
        idx = int(np.argmin(sal))
        return idx, float(np.sign(alphas.flat[idx]))

    def run(self, x0: np.ndarray, targets: np.ndarray, answer: Callable, gradient: Callable,
            on_step: Callable[[int, int], None] | None = None) -> list[Outcome]:
        x0 = np.asarray(x0, np.float32)
        n, targets = len(x0), np.asarray(targets, np.int64)
        adv = x0.copy()
        mask, counts = np.ones_like(adv), np.zeros_like(adv)
        done = np.zeros(n, bool)
        out: list[Outcome | None] = [None] * n
        queries, steps, last = np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, -1, np.int64)
        step_size = self.theta * (self.hi - self.lo)
        for step in range(self.max_iter):
            active = np.flatnonzero(~done)
            if not len(active):
                break
            adv[active] = np.clip(adv[active], self.lo, self.hi)
            labels = np.asarray(answer(adv[active], active), np.int64)
            queries[active] += 1
            last[active] = labels
            keep = []
            for i, lab in zip(active, labels):
                if lab == targets[i]:
                    out[i], done[i] = Outcome(adv[i].copy(), True, int(lab), int(queries[i]), int(steps[i]),
                                              "accepted"), True
                elif not mask[i].any():
                    out[i], done[i] = Outcome(adv[i].copy(), False, int(lab), int(queries[i]), int(steps[i]),
                                              "mask_empty"), True
                else:
                    keep.append(i)
            if keep:
                keep = np.asarray(keep)
                alphas = np.asarray(gradient(adv[keep], targets[keep]), np.float32) * mask[keep]
                for j, i in enumerate(keep):
                    idx, sign = self.saliency(alphas[j])
                    a, m, c = adv[i].reshape(-1), mask[i].reshape(-1), counts[i].reshape(-1)
                    a[idx] += sign * step_size
                    c[idx] += 1
                    if a[idx] <= self.lo or a[idx] >= self.hi:
                        m[idx] = 0
                    if c[idx] >= self.cap:
                        m[idx] = 0
                    steps[i] += 1
                adv[keep] = np.clip(adv[keep], self.lo, self.hi)
            if on_step is not None:
                on_step(step, int((~done).sum()))
        for i in np.flatnonzero(~done):
            out[i] = Outcome(adv[i].copy(), False, int(last[i]), int(queries[i]), int(steps[i]), "max_iter")
        return out  # type: ignore[return-value]


def keras_path(models_dir, model: str) -> Path:
    return Path(models_dir) / f"{model}.keras"


def ensure_models(models_dir, names, profile: str = "cpu") -> None:
    """Give each model a ``.keras`` copy beside its export, for its pre-softmax logits: an
    exported model's is rebuilt from the export (``lab.export.keras_from_export``: the same
    weights, checked answer for answer), so this table attacks the models of Tables 1-3; a
    model not exported yet is trained (``lab.train``, the profile's recipe) and exported."""
    from .export import keras_from_export, version_dirs
    from .train import export_trained, train

    for name in names:
        if keras_path(models_dir, name).exists():
            continue
        versions = version_dirs(Path(models_dir) / name)
        if versions:
            keras_from_export(Path(models_dir) / name / str(versions[-1])).save(str(keras_path(models_dir, name)))
            continue
        t = train(name, profile=profile, progress="epoch")
        export_trained(t, models_dir)
        t.model.save(str(keras_path(models_dir, name)))


def local_gradient(models_dir, model: str, kind: str = "logit") -> Callable:
    """``fn(images, targets) -> d value[target] / d image`` on the attacker's local copy:
    ``logit`` = the input of the model's softmax ``scores`` layer, ``score`` = its output."""
    import keras
    import tensorflow as tf

    net = keras.saving.load_model(str(keras_path(models_dir, model)), compile=False)
    head = net.get_layer("scores")
    cut = keras.Model(net.inputs, head.input if kind == "logit" else head.output)
    if kind not in ("logit", "score"):
        raise ValueError(f"gradient must be logit or score, not {kind!r}")

    @tf.function(reduce_retracing=True)
    def grad(x, t):
        with tf.GradientTape() as tape:
            tape.watch(x)
            v = cut(x, training=False)
            picked = tf.gather(v, t, axis=1, batch_dims=1)
        return tape.gradient(picked, x)

    def fn(images, targets):
        return grad(tf.constant(np.asarray(images, np.float32)), tf.constant(np.asarray(targets, np.int32))).numpy()

    fn.model = net
    return fn


def run_cell(lab, cell, x, y, idx, targets, theta: float, cfg: dict, grad: Callable, progress: bool = True):
    from tqdm.auto import tqdm

    from .cells import Row, distances
    from .tables import stable, truth

    stamp = time.time_ns()
    sessions = [f"{EXPERIMENT}-{cell.model}-{cell.setting}-{cell.defense}-{int(i)}-{stamp}" for i in idx]
    client = lab.client(cell.defense, cell.model, sessions[0])
    counters = lab.counters(cell.defense)
    attack = AdvBoxJSMA(theta, cfg["max_iter"], cfg["max_perturbations_per_pixel"])
    bar = tqdm(total=len(idx), desc=f"{cell.model} {cell.setting} {cell.defense}", disable=not progress,
               leave=False, mininterval=30)

    def answer(images, active):
        res = client.many([(sessions[a], im[None]) for a, im in zip(active, images)], concurrency=16)
        return np.concatenate([r[1] for r in res])

    def on_step(step, left):
        bar.n = len(idx) - left
        bar.set_postfix_str(f"step {step}", refresh=False)
        bar.update(0)

    c0, t0 = counters.snapshot(cell.model), time.perf_counter()
    with client:
        outs = attack.run(x[idx].astype(np.float32), targets, answer, grad, on_step)
    seconds = time.perf_counter() - t0
    from .counters import delta

    d = delta(counters.snapshot(cell.model), c0)
    bar.close()
    model_labels = truth(lab, cell.model, np.stack([o.adversarial for o in outs]))
    rows = []
    for k, (i, t, o) in enumerate(zip(idx, targets, outs)):
        row = Row(EXPERIMENT, "AdvBoxJSMA", cell.model, cell.setting, cell.defense, int(i), int(y[i]), "target",
                  int(t), seed=stable(EXPERIMENT, cell.model, int(i), cfg["seed"]), session=sessions[k])
        row.queries, row.seconds = o.queries, seconds / len(idx)
        row.l0, row.l2 = distances(x[i].astype(np.float32), o.adversarial)
        row.judge(o.answered_label, int(model_labels[k]))
        row.claimed = row.claimed and o.accepted
        row.success = row.claimed and row.fooled
        row.extra = {"stop": o.stop, "steps": o.steps, "gradient": cfg["gradient"],
                     "cell_forwarded": int(d["forwards"]), "cell_cached": int(d["cached"])}
        rows.append(row)
    return rows


def cells_dir(report_dir, cfg: dict) -> Path:
    import zlib

    key = {k: cfg[k] for k in ("n_images", "seed", "max_iter", "max_perturbations_per_pixel", "gradient")}
    h = zlib.crc32(json.dumps(key, sort_keys=True).encode())
    return Path(report_dir) / "cells" / f"{EXPERIMENT}-{cfg['profile']}-{h:08x}"


def plan(cfg: dict):
    from .cells import Cell

    return [Cell(EXPERIMENT, m, f"theta={t}", d) for t in cfg["thetas"] for m in cfg["models"]
            for d in cfg["defenses"]]


PAPER_KEY = {"off": "asr_without_defense", "paper": "asr_with_defense"}


def summary(rows) -> list[dict]:
    from . import paper_tables
    from .cells import wilson

    paper = {(r["model"], float(r["theta"])): r for r in paper_tables.rows("jsma")}
    keys = sorted({(r.model, r.setting, r.defense) for r in rows},
                  key=lambda k: (k[0], float(k[1].split("=")[1]), k[2]))
    out = []
    for m, s, d in keys:
        g = [r for r in rows if (r.model, r.setting, r.defense) == (m, s, d)]
        k, n = sum(r.success for r in g), len(g)
        lo, hi = wilson(k, n)
        theta = float(s.split("=")[1])
        p = paper.get((m, theta), {})
        out.append({"table": EXPERIMENT, "model": m, "theta": theta, "defense": d, "n": n, "successes": k,
                    "rate": k / n if n else None, "wilson_lo": lo, "wilson_hi": hi,
                    "paper_rate": p.get(PAPER_KEY.get(d, ""), None),
                    "claimed_rate": sum(r.claimed for r in g) / n, "fooled_rate": sum(r.fooled for r in g) / n,
                    "mean_queries": float(np.mean([r.queries for r in g])),
                    "stopped_max_iter": sum(r.extra.get("stop") == "max_iter" for r in g),
                    "forwarded_fraction": (g[0].extra.get("cell_forwarded", 0) / max(1, sum(r.queries for r in g))),
                    "gradient": g[0].extra.get("gradient", "")})
    return out


def write_results(cfg: dict, report_dir, models_dir, out_dir, stem: str = EXPERIMENT) -> dict:
    import pandas as pd

    from .cells import load
    from .results import commit, model_rows

    folder, rows, done, pending = cells_dir(report_dir, cfg), [], [], []
    for c in plan(cfg):
        p = folder / f"{c.key}.json"
        (done if p.exists() else pending).append(c.key)
        rows += load(p) if p.exists() else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(summary(rows)).to_csv(out_dir / f"{stem}.csv", index=False)
    prov = {"commit": commit(), "profile": cfg["profile"],
            "created_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "implementation": IMPLEMENTATION,
            "reference": "advboxes/AdvBox adversarialbox/attacks/saliency.py (semantics only; no code copied)",
            "settings": cfg,
            "image_rule": "lab.tables.select with seed lab.tables.stable('jsma', model, seed): the same images as "
                          "table1.csv (ART)",
            "target_rule": "advbox_target(label, lab.tables.stable('table1_advbox', model, image, seed)): the same "
                           "target for an image in every theta and defense",
            "sessions": "one sidecar session per image; a cell's images in lockstep",
            "model_accuracy": {m["name"]: m["test_accuracy"] for m in model_rows(models_dir, cfg["models"])},
            "attack_seconds": round(sum(r.seconds for r in rows), 1),
            "cells_done": done, "cells_pending": pending, "complete": not pending}
    (out_dir / f"{stem}_provenance.json").write_text(json.dumps(prov, indent=2, default=str) + "\n")
    return prov


def main(argv=None) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .cells import run_cells
    from .cifar10 import load_cifar10
    from .launcher import Lab
    from .paths import project_path
    from .profiles import specs
    from .tables import select, stable
    from .tables import model_dir as version_dir

    ap = argparse.ArgumentParser(prog="python -m lab.advbox_jsma", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--models", nargs="+", default=["cnn", "lenet", "resnet"])
    ap.add_argument("--thetas", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--defenses", nargs="+", default=["off", "paper"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient", default="logit", choices=("logit", "score"))
    ap.add_argument("--max-iter", type=int, default=DEFAULTS["max_iter"])
    ap.add_argument("--report-dir", default=None, help="default reports/<profile>")
    ap.add_argument("--out", default=None, help="default results/<profile>")
    ap.add_argument("--write-only", action="store_true", help="only rewrite the CSV/provenance from finished cells")
    ap.add_argument("--tag", default="", help="a run beside the main table (another n or defense): its files are "
                                              "table1_advbox_<tag>.csv/_provenance.json, its plan only its cells")
    a = ap.parse_args(argv)
    cfg = {"profile": a.profile, "models": a.models, "thetas": a.thetas, "defenses": a.defenses,
           "n_images": a.n, "seed": a.seed, "gradient": a.gradient, "max_iter": a.max_iter,
           "max_perturbations_per_pixel": DEFAULTS["max_perturbations_per_pixel"], "fast": True}
    models_dir = project_path(f"models-{a.profile}")
    report_dir = project_path(a.report_dir or f"reports/{a.profile}")
    out_dir = project_path(a.out or f"results/{a.profile}")
    if a.write_only:  # the CSV and provenance from the finished cells, nothing run
        grid = {**cfg, "models": ["cnn", "lenet", "resnet"], "thetas": [0.1, 0.2, 0.3, 0.4]}
        prov = write_results(grid if not a.tag else cfg, report_dir, models_dir, out_dir,
                             f"{EXPERIMENT}_{a.tag}" if a.tag else EXPERIMENT)
        print(f"{len(prov['cells_done'])} cells done, {len(prov['cells_pending'])} pending", flush=True)
        return 0
    ensure_models(models_dir, a.models, a.profile)
    data = load_cifar10()
    x, y = data.x_test, data.y_test
    picked, grads = {}, {}

    def run(cell):
        if cell.model not in picked:
            idx = select(lab, cell.model, x, y, a.n, stable("jsma", cell.model, a.seed))
            tg = np.array([advbox_target(int(y[i]), stable(EXPERIMENT, cell.model, int(i), a.seed)) for i in idx])
            picked[cell.model] = (idx, tg)
            grads[cell.model] = local_gradient(models_dir, cell.model, a.gradient)
            version_dir(models_dir, cell.model)
        idx, tg = picked[cell.model]
        rows = run_cell(lab, cell, x, y, idx, tg, float(cell.setting.split("=")[1]), cfg, grads[cell.model])
        return rows

    # the table covers the default grid too, so runs over some models at a time fill one CSV
    table_cfg = {**cfg, "models": [m for m in ("cnn", "lenet", "resnet") if m in {"cnn", "lenet", "resnet", *a.models}]
                 + [m for m in a.models if m not in ("cnn", "lenet", "resnet")],
                 "thetas": sorted({0.1, 0.2, 0.3, 0.4, *a.thetas})}
    stem = f"{EXPERIMENT}_{a.tag}" if a.tag else EXPERIMENT
    if a.tag:
        table_cfg = cfg
    # the image selection and the model's own labels ask an ``off`` sidecar
    with Lab(models_dir, a.models, specs(*dict.fromkeys(["off", *a.defenses]))) as lab:
        folder = cells_dir(report_dir, cfg)
        for cell in plan(cfg):  # one cell at a time so the CSV follows every finished cell
            run_cells([cell], run, folder)
            write_results(table_cfg, report_dir, models_dir, out_dir, stem)
    prov = write_results(table_cfg, report_dir, models_dir, out_dir, stem)
    print(f"{len(prov['cells_done'])} cells done, {len(prov['cells_pending'])} pending", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
