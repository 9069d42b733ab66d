"""The paper's Tables 1-3 through the sidecar, with ART's attacks.

* Table 1: ``SaliencyMapMethod`` (JSMA) with ``SidecarGradients``: class gradients from
  the attacker's local copy of the model, every prediction from the sidecar in the
  attacker's session. ``theta`` is the paper's perturbation on the [0, 1] scale
  (``round(255 * theta)`` levels per step); ``gamma`` caps the changed features.
* Tables 2 and 3: ``PixelAttack`` (DE, population 400 as in the paper, each population
  one ``ClassifyBatch``) over ``black_box`` of the sidecar; targeted (one random wrong
  label) and untargeted (ART's: lower the true label's score until another wins).

``population`` (cfg, optional): DE's total population instead of ART's fixed ~400
(``de_population``); ``defenses`` (cfg, optional): the table's columns (default
``DEFENSES``: ``off``, ``paper`` and ``hardened``); ``run_table(..., defenses=[...])`` runs
only some of them in a sitting (same cell folder, same images, so columns can be added later).
Per image, ``QueryLog`` records which query the success rests on (``row.extra``):
``success_source`` is ``first_forward`` when the answer that made the attacker claim
success is the answer to the image's first query (in paper mode: the anchor its first
candidate set, repeated from the cache), ``later_forward`` when it is a later query's,
``final_check`` when only the final check saw it; ``first_meets_goal`` says whether the
first query's answer already met the goal.

One attacker session per (model, setting, defense) cell; all its images in that session,
in order. The same images, targets and seeds in every column. ``hardened`` cells each get a
fresh sidecar (``cell_sidecar``); ``off`` and ``paper`` share the lab's named ones.
Only images the model classifies correctly are attacked. A row's ``success`` is
``lab.cells.Row``'s: claimed by the sidecar's answer AND confirmed by the model.
"""

from __future__ import annotations

import json
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import estimators
from .cells import Cell, Row, distances, load, run_cells, summarize
from .counters import delta

EXPERIMENTS = {"jsma": "theta", "onepixel_targeted": "pixels", "onepixel_untargeted": "pixels"}
IMPLEMENTATION = {"jsma": "art.attacks.evasion.SaliencyMapMethod", "onepixel_targeted": "art.attacks.evasion.PixelAttack",
                  "onepixel_untargeted": "art.attacks.evasion.PixelAttack"}
DEFENSES = ("off", "paper", "hardened")
#: judgments whose state outlives a session (hardened: per principal), so each cell gets its own sidecar
FRESH_PER_CELL = ("hardened",)


def shared_sidecars(defenses=None) -> tuple[str, ...]:
    """The sidecars a sitting of ``defenses`` (default every column) keeps for all its cells:
    ``off`` (the image selection and the model's own labels ask it) and each column that is not
    ``FRESH_PER_CELL``. A hardened-only sitting starts no paper sidecar."""
    return tuple(dict.fromkeys(["off", *(d for d in defenses or DEFENSES if d not in FRESH_PER_CELL)]))


def stable(*parts) -> int:
    """A run-independent seed from strings and numbers (Python's hash() is salted)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def select(lab, model: str, x: np.ndarray, y: np.ndarray, n: int | None, seed: int, chunk: int = 64) -> np.ndarray:
    """Random test images the model classifies correctly (asked through the ``off`` sidecar)."""
    order = np.random.default_rng(seed).permutation(len(x))
    chosen: list[int] = []
    with lab.client("off", model) as c:
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            chosen += [int(i) for i, lab_ in zip(idx, c.labels(x[idx])) if lab_ == y[i]]
            if n is not None and len(chosen) >= n:
                break
    return np.asarray(chosen[:n] if n is not None else chosen, np.int64)


def targets_for(labels: np.ndarray, seed: int, k: int = 10) -> np.ndarray:
    """One random wrong label per image."""
    return (np.asarray(labels) + np.random.default_rng(seed).integers(1, k, len(labels))) % k


def truth(lab, model: str, images: np.ndarray) -> np.ndarray:
    """The model's own labels (``off`` sidecar, a fresh session)."""
    with lab.client("off", model) as c:
        return c.labels(images)


@contextmanager
def de_population(total: int | None):
    """ART's PixelAttack with a DE population of about ``total`` (popsize per dimension =
    total // dimensions, as ART does with its fixed 400); None leaves ART's."""
    import art.attacks.evasion.pixel_threshold as pt

    orig = pt.differential_evolution

    def de(func, bounds, *args, **kw):
        kw["popsize"] = max(1, int(total) // len(bounds))
        return orig(func, bounds, *args, **kw)

    pt.differential_evolution = de if total else orig
    try:
        yield
    finally:
        pt.differential_evolution = orig


class QueryLog:
    """Wraps ``predict``: per image (``reset``), each distinct answer (exact score bytes) and the
    index of the query that first got it; ``source(scores)`` names where an answer came from."""

    def __init__(self, predict, counters=None, model: str = ""):
        self.predict, self.counters, self.model = predict, counters, model
        self.reset()

    def reset(self) -> None:
        self.seen: dict[bytes, int] = {}
        self.n, self.first_label, self.first_forwarded = 0, -1, -1

    def __call__(self, images):
        c0 = self.counters.snapshot(self.model) if self.counters is not None and self.n == 0 else None
        s = np.asarray(self.predict(images))
        if c0 is not None:
            self.first_forwarded = int(delta(self.counters.snapshot(self.model), c0)["forwards"])
        if self.n == 0 and len(s):
            self.first_label = int(np.argmax(s[0]))
        for r in s:
            self.seen.setdefault(r.tobytes(), self.n)
            self.n += 1
        return s

    def source(self, scores) -> str:
        i = self.seen.get(np.asarray(scores).tobytes())
        return "final_check" if i is None else ("first_forward" if i == 0 else "later_forward")


def attempt(row: Row, x0: np.ndarray, attack, lab, ask, sent, counters=None, client=None) -> Row:
    """Run ``attack()`` (returns the adversarial image), then the attacker's own final check
    ``ask(image) -> label`` (in its sessions), the model's own label, the images sent
    (``sent()`` before/after) and the forwarded/cached counts; fills and judges ``row``."""
    q0, c0, t0 = sent(), counters.snapshot(row.model) if counters else None, time.perf_counter()
    r0 = client.refused if client is not None else 0
    adv = np.asarray(attack(), np.float32).reshape(x0.shape)
    answered = int(ask(adv[None]))
    row.seconds, row.queries = time.perf_counter() - t0, sent() - q0
    row.refused = client.refused - r0 if client is not None else 0
    if counters is not None:
        d = delta(counters.snapshot(row.model), c0)
        row.forwarded, row.cached = int(d["forwards"]), int(d["cached"])
    row.l0, row.l2 = distances(x0, adv)
    row.adversarial = adv  # not a field: kept for the caller, never written
    return row.judge(answered, int(truth(lab, row.model, adv[None])[0]))


@contextmanager
def cell_sidecar(lab, defense: str):
    """The sidecar one cell's attacker talks to: a fresh one for ``FRESH_PER_CELL`` defenses.

    Hardened mode keeps a near-duplicate budget per principal, across sessions, and on an
    open deployment the principal is the client's address. Every cell runs from 127.0.0.1,
    and the cells of a model attack the same images at each theta / pixel count, so through
    one shared hardened sidecar a cell's queries would spend the budget of the next cell's
    images: its candidates would get the earlier cell's answers, not the model's. So each
    hardened cell starts its own sidecar (``Lab.add`` with ``profiles.SIDECARS[defense]``'s
    flags, the same kind of sidecar as the lab's) and stops it after the cell: a fresh
    attacker with empty histories and counters of its own. A fresh auth token per cell on
    one sidecar would not do: hardened mode shares exact-bytes answers across principals,
    so a later cell's queries would still meet earlier cells' forwards in the counters.
    ``off`` and ``paper`` keep their state per session, and each cell has its own session,
    so they use the lab's named sidecar (as the committed ``off``/``paper`` rows did)."""
    if defense not in FRESH_PER_CELL:
        yield lab.sidecar(defense)
        return
    from .profiles import SIDECARS

    with lab.add(SIDECARS[defense]) as sc:
        yield sc


def run_cell(lab, cell: Cell, x: np.ndarray, y: np.ndarray, idx: np.ndarray, targets: np.ndarray, cfg: dict,
             model_dir) -> list[Row]:
    """One (experiment, model, setting, defense) cell: every selected image in one session."""
    with cell_sidecar(lab, cell.defense) as sc:
        return _attack_cell(lab, sc, cell, x, y, idx, targets, cfg, model_dir)


def _attack_cell(lab, sc, cell: Cell, x, y, idx, targets, cfg: dict, model_dir) -> list[Row]:
    from art.attacks.evasion import PixelAttack, SaliencyMapMethod

    value = float(cell.setting.split("=")[1])
    # a refusal (if a budget ever refuses) is an answer with no information, not the end of the cell
    client = sc.client(cell.model, f"{cell.experiment}-{cell.model}-{cell.setting}-{cell.defense}-{time.time_ns()}",
                       refusals="answer")
    counters = sc.counters
    log, rows = QueryLog(client.predict, counters, cell.model), []
    with client, de_population(cfg.get("population")):
        if cell.experiment == "jsma":
            est = estimators.SidecarGradients(log, model_dir)
            attack = SaliencyMapMethod(est, theta=float(round(255 * value)), gamma=cfg["gamma"], batch_size=1,
                                       verbose=False)
        else:
            est = estimators.black_box(log)
            targeted = cell.experiment == "onepixel_targeted"
            attack = PixelAttack(est, th=int(value), es=1, max_iter=cfg["max_iter"], targeted=targeted, verbose=False)
        for i, t in zip(idx, targets):
            goal = "untargeted" if cell.experiment == "onepixel_untargeted" else "target"
            seed = stable(cell.experiment, cell.model, cell.setting, int(i))
            row = Row(cell.experiment, IMPLEMENTATION[cell.experiment].rsplit(".", 1)[1], cell.model, cell.setting,
                      cell.defense, int(i), int(y[i]), goal, int(t) if goal == "target" else -1, seed=seed,
                      session=client.session)
            x0 = x[i].astype(np.float32)
            y_goal = np.eye(10)[[int(t) if goal == "target" else int(y[i])]]

            def run(x0=x0, y_goal=y_goal, seed=seed):
                np.random.seed(seed % (1 << 32))  # ART's DE and JSMA draw from numpy's global RNG
                log.reset()
                return attack.generate(x0[None], y=y_goal)[0]

            final = {}

            def ask(im):
                final["scores"] = client.predict(im)[0]
                return client.last_labels[0]

            row = attempt(row, x0, run, lab, ask, lambda: client.queries, counters, client)
            row.extra = {"first_label": log.first_label, "first_forwarded": log.first_forwarded,
                         "first_meets_goal": row.meets_goal(log.first_label), "distinct_answers": len(log.seen),
                         "success_source": log.source(final["scores"]) if row.success else ""}
            rows.append(row)
    return rows


def cells_dir(report_dir, section: str, cfg: dict) -> Path:
    """Where a section's finished cells live: one folder per (profile, settings), so changed
    parameters never reuse cells computed with others. Which models and columns a sitting
    runs is not a setting of how a cell is computed (a cell's key names its model and
    defense): a sitting on some models (``run_workbooks --models``) shares the folder."""
    setting = {k: v for k, v in cfg.items() if k not in ("models", "defenses")}
    h = zlib.crc32(json.dumps(setting, sort_keys=True, default=str).encode())
    return Path(report_dir) / "cells" / f"{section}-{cfg['profile']}-{h:08x}"


def model_dir(models_dir, model: str) -> Path:
    """The latest exported version of ``model`` (what serving serves)."""
    from .export import version_dirs

    versions = version_dirs(Path(models_dir) / model)
    if not versions:
        raise FileNotFoundError(f"no exported version of {model!r} under {models_dir}")
    return Path(models_dir) / model / str(versions[-1])


def run_table(lab, experiment: str, cfg: dict, x: np.ndarray, y: np.ndarray, models_dir, report_dir,
              progress: bool = True, defenses=None) -> list[Row]:
    """Every cell of Table 1, 2 or 3 (``experiment``), resumable; the same images and targets
    for every defense of a model. ``defenses``: run only these columns now (default: the
    table's, ``cfg["defenses"]`` or ``DEFENSES``); the rows returned are every finished
    cell of the table's plan, so a sitting that adds a column still shows the others."""
    values = cfg["thetas"] if experiment == "jsma" else cfg["pixels"]
    picked: dict[str, tuple] = {}

    def run(cell: Cell) -> list[Row]:
        if cell.model not in picked:
            idx = select(lab, cell.model, x, y, cfg["n_images"], stable(experiment, cell.model, cfg["seed"]))
            picked[cell.model] = (idx, targets_for(y[idx], stable(experiment, "targets", cell.model, cfg["seed"])))
        idx, tg = picked[cell.model]
        return run_cell(lab, cell, x, y, idx, tg, cfg, model_dir(models_dir, cell.model))

    columns = list(cfg.get("defenses", DEFENSES))
    unknown = [d for d in defenses or () if d not in columns]
    if unknown:
        raise ValueError(f"{experiment}: no column {unknown}; the table's are {columns}")
    cells, folder = plan(experiment, cfg["models"], values, columns), cells_dir(report_dir, experiment, cfg)
    run_cells([c for c in cells if c.defense in (defenses or columns)], run, folder, progress=progress)
    return [r for c in cells if (folder / f"{c.key}.json").exists() for r in load(folder / f"{c.key}.json")]


def plan(experiment: str, models, values, defenses=DEFENSES) -> list[Cell]:
    param = EXPERIMENTS[experiment]
    return [Cell(experiment, m, f"{param}={v}", d) for m in models for v in values for d in defenses]


#: a defense's column suffix in ``table``: the paper's two, then ours
SUFFIX = {"off": "without_defense", "paper": "with_defense", "hardened": "hardened"}


def table(rows: list[Row], experiment: str):
    """Table 1/2/3 in the paper's shape: ASR per (model, setting) for each defense (``SUFFIX``:
    ``asr_without_defense``, ``asr_with_defense``, ``asr_hardened``, ...), with Wilson intervals
    and n; an image is the unit (one row per image here). Every ``DEFENSES`` column is there,
    empty (NaN) where its cells have not run."""
    s = summarize([r for r in rows if r.experiment == experiment], by=("model", "setting", "defense"),
                  unit="image_index")
    param = EXPERIMENTS[experiment]
    s[param] = s.setting.str.split("=").str[1].astype(float if param == "theta" else int)
    values = ["asr", "asr_lo", "asr_hi", "n", "claimed_rate", "mean_queries", "forwarded_fraction"]
    wide = s.pivot_table(index=["model", param], columns="defense", values=values, aggfunc="first", sort=False)
    wide.columns = [f"{v}_{SUFFIX[d]}" for v, d in wide.columns]
    wide = wide.reindex(columns=[f"{v}_{SUFFIX[d]}" for v in values for d in DEFENSES
                                 if f"{v}_{SUFFIX[d]}" in wide.columns or v == "asr"])
    return wide.reset_index()
