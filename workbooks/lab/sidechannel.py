"""Workbook 07: is a cache hit observable, and can an attacker use it?

* ``distinguisher``: per output policy and padding, pairs (x, 1-pixel x') where x' is a
  hit (same session of a ``paper`` sidecar) or a miss (a fresh session of the same
  sidecar), interleaved in time; a classifier on the two answers and the latency
  (``lab.distinguisher``) predicts which. 0.5 is a coin flip.
* ``oars``: ART's ``SquareAttack`` (Linf, score-based), plain and behind
  ``lab.routing.Resample`` (OARS-style: answers the replay detector calls cached are
  asked again through larger random transforms), against fresh ``off``/``paper``/
  ``hardened`` sidecars with the exact-score output and with the default output policy.
  The attack is ART's; only the routing is ours (``tests/test_attacks.py`` checks that
  ``Resample`` with nothing cached gives ART's plain result).
"""

from __future__ import annotations

import numpy as np

from . import distinguisher, estimators, routing
from .cells import Cell, Row
from .profiles import specs
from .tables import attempt, stable, truth

GRID = {  # policy -> {padding: sidecar}
    "scores_exact": {"on": "paper_pad_distribution", "off": "paper"},
    "scores_default": {"on": "paper_default", "off": "paper_default_nopad"},
    "topk": {"on": "paper_topk"},
    "label": {"on": "paper_label"},
}
POLICY_SIDECAR = {"scores_exact": "{defense}", "scores_default": "{defense}_default"}


def distinguisher_grid(lab, model: str, x: np.ndarray, cfg: dict, noise_key: str) -> list[dict]:
    rng = np.random.default_rng(cfg["seed"])
    out = []
    for policy, pads in GRID.items():
        for padding, name in pads.items():
            (spec,) = specs(name, noise_key=noise_key)
            with lab.add(spec, inprocess=False) as sc:
                warm = x[rng.choice(len(x), cfg["warmup"], replace=False)]
                distinguisher.observe(sc.address, model, warm, hit=False)
                obs = []
                idx = rng.choice(len(x), 2 * cfg["n"], replace=False)
                for j in range(0, 2 * cfg["n"], 2 * cfg["chunk"]):
                    part = idx[j:j + 2 * cfg["chunk"]]
                    obs += distinguisher.observe(sc.address, model, x[part[::2]], hit=True, seed=int(j))
                    obs += distinguisher.observe(sc.address, model, x[part[1::2]], hit=False, seed=int(j) + 1)
            acc = distinguisher.accuracy(obs, seed=cfg["seed"])
            content = distinguisher.accuracy(obs, use=("content",), seed=cfg["seed"])["accuracy"]
            timing = distinguisher.accuracy(obs, use=("timing",), seed=cfg["seed"])["accuracy"]
            lat = lambda hit: 1e3 * float(np.median([o.latency_s for o in obs if o.hit == hit]))  # noqa: E731
            out.append({"policy": policy, "padding": padding, "sidecar": name, "model": model, **acc,
                        "content_accuracy": content, "timing_accuracy": timing,
                        "median_hit_latency_ms": lat(True), "median_miss_latency_ms": lat(False)})
    return out


def plan_oars(cfg: dict) -> list[Cell]:
    return [Cell("oars", cfg["model"], f"{p}/{a}", d) for p in POLICY_SIDECAR for a in ("square", "square+oars")
            for d in cfg["defenses"] if not (d == "off" and a == "square+oars")]


def run_oars_cell(lab, cell: Cell, x: np.ndarray, y: np.ndarray, idx: np.ndarray, cfg: dict,
                  noise_key: str) -> list[Row]:
    from art.attacks.evasion import SquareAttack

    policy, kind = cell.setting.split("/")
    (spec,) = specs(POLICY_SIDECAR[policy].format(defense=cell.defense), noise_key=noise_key)
    rows = []
    with lab.add(spec, inprocess=True) as sc, sc.client(cell.model, refusals="answer") as client:
        for i in idx:
            seed = stable(cell.setting, cell.defense, int(i))
            router = routing.Plain(client.with_session())
            if kind == "square+oars":
                router = routing.Resample(router, cfg["max_resamples"], seed)
            attack = SquareAttack(estimators.black_box(router.predict), norm=np.inf, eps=cfg["eps"],
                                  max_iter=cfg["max_iter"], p_init=cfg["p_init"], nb_restarts=1, verbose=False)
            row = Row("oars", "SquareAttack", cell.model, cell.setting, cell.defense, int(i), int(y[i]), seed=seed,
                      session=router.client.session)
            x0 = x[i].astype(np.float32)

            def run(x0=x0, i=i, seed=seed):
                np.random.seed(seed % (1 << 32))
                return attack.generate(x0[None], y=np.eye(10)[[int(y[i])]])[0]

            def ask(img, router=router):
                router.predict(img)
                return int(router.last_labels[0])

            attempt(row, x0, run, lab, ask, lambda r=router: r.sent, sc.counters, router.client)
            row.extra = {"policy": policy, "detected": getattr(router, "detected", 0),
                         "resamples": getattr(router, "resamples", 0)}
            rows.append(row)
    return rows


__all__ = ["GRID", "distinguisher_grid", "plan_oars", "run_oars_cell", "truth"]
