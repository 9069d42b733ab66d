"""Workbook 06: adaptive attackers against ``paper`` and ``hardened`` judgment, and
what hardening costs honest users.

Cells are (strategy, setting, defense). Every cell runs against a FRESH sidecar
(``Lab.add``, in-process, the flags of ``profiles.SIDECARS[defense]``), so hardened
mode's cross-session memory starts empty and no cell inherits another's sessions.
The attacks are ART's, unchanged, behind ``lab.estimators.black_box`` of a
``lab.routing`` router: ``PixelAttack`` (untargeted, ``pixels=k``) for every
strategy, and the decision/score-based ``HopSkipJump`` and ``SimBA`` with ``plain``
and ``fresh_session``. Rows are ``lab.cells.Row`` (success = claimed and fooled).

``hardening_cost``: fresh ``paper`` and ``hardened`` sidecars answer three streams
(the clean test images in one session; many users sending popular images, their
near-duplicates and their own; an attacker's adversarial near-duplicates followed by
victims sending the originals). A cached answer is *false* when its label differs
from the model's own label for the exact image sent; hardened mode's refusals are
counted apart (``refused``), not as false cached answers.
"""

from __future__ import annotations

import numpy as np

from . import estimators, routing
from .cells import Cell, Row
from .counters import delta
from .profiles import SIDECARS
from .tables import attempt, stable, truth

DEFENSES = ("off", "paper", "hardened")


def strategy_names(cfg: dict) -> list[str]:
    """Strategies with one entry per blinding level (``blinding:<name>``)."""
    out = []
    for s in cfg["strategies"]:
        out += [f"blinding:{b['name']}" for b in cfg["blinding"]] if s == "blinding" else [s]
    return out


def plan(cfg: dict, defenses=DEFENSES) -> list[Cell]:
    cells = [Cell("adaptive", cfg["model"], f"{s}/pixels={k}", d)
             for s in strategy_names(cfg) for k in cfg["pixels"] for d in defenses]
    return cells


def plan_decision(cfg: dict, defenses=DEFENSES) -> list[Cell]:
    return [Cell("decision", cfg["model"], f"{s}/{a}", d)
            for a in cfg["attacks"] for s in cfg["strategies"] for d in defenses]


def _router(strategy: str, client, cfg: dict, decoys: np.ndarray, seed: int):
    kind, _, blind_name = strategy.partition(":")
    spec = next((b for b in cfg.get("blinding", []) if b["name"] == blind_name), None)
    return routing.make(kind, client, decoys=decoys, seed=seed, accounts=cfg.get("accounts", 4),
                        concurrency=cfg.get("concurrency", 16), blind_spec=spec)


def _attack(cell: Cell, est, cfg: dict):
    from art.attacks.evasion import HopSkipJump, PixelAttack, SimBA

    what = cell.setting.split("/")[1]
    if what.startswith("pixels="):
        return PixelAttack(est, th=int(what.split("=")[1]), es=1, max_iter=cfg["max_iter"], targeted=False,
                           verbose=False)
    if what == "HopSkipJump":
        return HopSkipJump(est, targeted=False, max_iter=cfg["hsj_max_iter"], max_eval=cfg["hsj_max_eval"],
                           init_eval=cfg["hsj_init_eval"], init_size=cfg["hsj_init_eval"], verbose=False)
    if what == "SimBA":
        return SimBA(est, attack="px", max_iter=cfg["simba_max_iter"], epsilon=cfg["simba_epsilon"], verbose=False)
    raise ValueError(f"unknown attack in {cell.setting!r}")


def run_cell(lab, cell: Cell, x: np.ndarray, y: np.ndarray, idx: np.ndarray, decoys: np.ndarray,
             cfg: dict) -> list[Row]:
    """Every image of ``idx`` attacked through a fresh sidecar of ``cell.defense``."""
    strategy = cell.setting.split("/")[0]
    rows = []
    with lab.add(SIDECARS[cell.defense], inprocess=True) as sc, sc.client(cell.model, refusals="answer") as client:
        for i in idx:
            seed = stable(cell.experiment, cell.setting, cell.defense, int(i))
            router = _router(strategy, client, cfg, decoys, seed)
            est = estimators.black_box(router.predict, max_queries=cfg.get("max_queries"))
            attack = _attack(cell, est, cfg)
            row = Row(cell.experiment, type(attack).__name__, cell.model, cell.setting, cell.defense, int(i),
                      int(y[i]), seed=seed, session=client.session)
            x0 = x[i].astype(np.float32)

            def run(x0=x0, i=i, seed=seed, row=row):
                np.random.seed(seed % (1 << 32))
                try:
                    return attack.generate(x0[None], y=np.eye(10)[[int(y[i])]])[0]
                except estimators.QueryBudgetExhausted:  # gave up: it returns nothing better than x0
                    row.extra = {"budget_exhausted": True}
                    return x0

            def ask(img, router=router):
                router.predict(img)
                return int(router.last_labels[0])

            attempt(row, x0, run, lab, ask, lambda r=router: r.sent, sc.counters, client)
            row.extra = {**(row.extra or {}), "strategy": strategy, "sessions": len(router.sessions),
                         "unsafe_queries": getattr(router, "unsafe", 0)}
            if row.success and cell.defense == "off" and strategy == "plain":  # poison for hardening_cost
                row.extra["adversarial"] = np.clip(np.round(row.adversarial), 0, 255).astype(np.uint8).tolist()
            rows.append(row)
    return rows


# -- hash-aware and random-transform blinding (lab.hashaware) ---------------------------

def plan_blinding(cfg: dict) -> list[Cell]:
    return [Cell("blinding", cfg["model"], f"{r}/eps={cfg['eps']}", d) for r in cfg["routers"] for d in cfg["defenses"]]


def run_blinding_cell(lab, cell: Cell, x: np.ndarray, y: np.ndarray, idx: np.ndarray, cfg: dict) -> list[Row]:
    """ART's PixelAttack (one pixel, untargeted) through a ``lab.hashaware`` router: every
    query masked so that it passes the judgment it is aimed at, in a fresh sidecar."""
    from . import hashaware

    name = cell.setting.split("/")[0]
    rows = []
    with lab.add(SIDECARS[cell.defense], inprocess=True) as sc, sc.client(cell.model) as client:
        for i in idx:
            seed = stable(cell.experiment, cell.setting, cell.defense, int(i))
            x0 = x[i].astype(np.float32)
            router = hashaware.ROUTERS[name](client, x[i], int(y[i]), eps=cfg["eps"], seed=seed)
            row = Row(cell.experiment, "PixelAttack", cell.model, cell.setting, cell.defense, int(i), int(y[i]),
                      seed=seed, session=router.session)

            def ask(img, router=router):
                router.predict(img)
                return int(router.last_labels[0])

            attempt(row, x0, lambda r=router, i=i, x0=x0, seed=seed: hashaware.one_pixel(
                r, x0, int(y[i]), cfg["max_iter"], seed), lab, ask, lambda r=router: r.sent, sc.counters)
            row.refused = router.refused
            rep = hashaware.report(router, x0, row.adversarial, int(y[i]), row.forwarded,
                                   lambda im: truth(lab, cell.model, im[None])[0])
            row.extra = {"router": name, **{k: rep[k] for k in ("eps", "reached", "mask_linf_max",
                                                                 "hash_flips_median")}}
            rows.append(row)
    return rows


# -- the cost of hardening ---------------------------------------------------------------

def near_duplicate(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A benign near-duplicate: 1-3 changed pixels, or a JPEG round trip (quality 85-95)."""
    if rng.random() < 0.5:
        out, k = img.copy(), int(rng.integers(1, 4))
        out[rng.integers(0, img.shape[0], k), rng.integers(0, img.shape[1], k)] = rng.integers(0, 256, (k, 3))
        return out, f"{k}px"
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY,
                                                                          int(rng.integers(85, 96))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy(), "jpeg"


def streams(x: np.ndarray, cfg: dict, poison=()) -> dict[str, list[tuple[str, int, str, np.ndarray]]]:
    """(session, source image index, kind, image) requests of each stream, in time order."""
    rng = np.random.default_rng(cfg["seed"])
    n_clean = len(x) if cfg["n_clean"] is None else min(cfg["n_clean"], len(x))
    order = rng.permutation(len(x))
    popular, users, per = order[:cfg["popular"]], cfg["users"], cfg["per_user"]
    own = [list(order[cfg["popular"] + u * per: cfg["popular"] + (u + 1) * per]) for u in range(users)]
    many = []
    for u in range(users):
        for _ in range(per):
            if rng.random() < 0.6 or not own[u]:
                src = int(rng.choice(popular))
                img, kind = near_duplicate(x[src], rng) if rng.random() < 0.5 else (x[src].copy(), "exact")
                many.append((f"user{u}", src, f"popular_{kind}", img))
            else:
                src = int(own[u].pop(0))
                many.append((f"user{u}", src, "own", x[src].copy()))
    out = {"clean": [("clean-user", i, "clean", x[i]) for i in range(n_clean)],
           "many_users": [many[j] for j in rng.permutation(len(many))]}
    if len(poison):
        out["poisoning"] = ([("attacker", int(i), "poison", np.asarray(a, np.uint8)) for i, a in poison]
                            + [(f"victim{j}", int(i), "victim", x[int(i)]) for j, (i, _) in enumerate(poison)])
    return out


def answer_stream(sc, model: str, reqs) -> tuple[np.ndarray, np.ndarray]:
    """Each request of ``reqs`` sent alone to sidecar ``sc`` in its session: the labels answered
    (-1 for a refusal) and where each answer came from, ``"forwarded"``, ``"cached"`` or
    ``"refused"``, read from the sidecar's counters around every request."""
    answers, source = [], []
    with sc.client(model, refusals="answer") as c:
        before = sc.counters.snapshot(model)
        for s, _, _, img in reqs:
            r0 = c.refused
            label = int(c.batch(img[None].astype(np.float32), s)[1][0])
            now = sc.counters.snapshot(model)
            d, before = delta(now, before), now
            if c.refused > r0:
                src = "refused"
            elif d["cached"] == 1 and d["forwards"] == 0:
                src = "cached"
            elif d["forwards"] == 1 and d["cached"] == 0:
                src = "forwarded"
            else:
                raise RuntimeError(f"one image moved the counters by {d}")
            answers.append(label)
            source.append(src)
    return np.array(answers, np.int64), np.array(source)


def cost_record(stream: str, defense: str, model: str, answers: np.ndarray, source: np.ndarray,
                model_y: np.ndarray, true_y: np.ndarray) -> dict:
    """One stream's cost. A *false cached answer* is an answer from a cache whose label differs
    from the model's own for the image sent; a refusal (RESOURCE_EXHAUSTED, label -1) is no
    answer at all and is counted in ``refused``, never as a false cached answer. Rates are per
    request; ``false_per_cached`` is per cached answer. ``accuracy`` counts a refusal as not
    correct; ``answered_accuracy`` is over the requests that got an answer."""
    n = len(answers)
    cached, refused, fwd = source == "cached", source == "refused", source == "forwarded"
    false = cached & (answers != model_y)
    answered = ~refused
    return {"stream": stream, "defense": defense, "model": model, "n_requests": n,
            "accuracy": float(np.mean(answers == true_y)),
            "answered_accuracy": float(np.mean(answers[answered] == true_y[answered])) if answered.any() else float("nan"),
            "model_accuracy": float(np.mean(model_y == true_y)),
            "cached": int(cached.sum()), "cached_fraction": float(cached.mean()),
            "forwarded": int(fwd.sum()), "refused": int(refused.sum()), "refusal_rate": float(refused.mean()),
            "false_cached": int(false.sum()), "false_cache_rate": float(false.mean()),
            "false_per_cached": float(false.sum() / cached.sum()) if cached.any() else float("nan"),
            # a forwarded answer is the model's own; anything here is the model's batch-size jitter
            "forwarded_other_label": int(np.sum(fwd & (answers != model_y)))}


def hardening_cost(lab, model: str, x: np.ndarray, y: np.ndarray, cfg: dict, poison=(),
                   defenses=("paper", "hardened"), requests: dict | None = None) -> list[dict]:
    """``cost_record`` of every stream (``streams``, or ``requests``: name -> requests) per defense."""
    out = []
    for name, reqs in (streams(x, cfg, poison) if requests is None else requests).items():
        model_y = truth(lab, model, np.stack([r[3] for r in reqs]))
        true_y = np.array([int(y[r[1]]) for r in reqs])
        kinds = np.array([r[2] for r in reqs])
        for d in defenses:
            with lab.add(SIDECARS[d], inprocess=True) as sc:
                answers, source = answer_stream(sc, model, reqs)
            rec = cost_record(name, d, model, answers, source, model_y, true_y)
            if name == "poisoning":
                vic = kinds == "victim"
                rec["victims"] = int(vic.sum())
                rec["victims_given_adversarial_label"] = int(np.sum(answers[vic] == model_y[~vic]))
            out.append(rec)
    return out
