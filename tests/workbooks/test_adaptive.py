"""Workbook 06's kit: routers against fresh paper / hardened sidecars, adaptive cells, the
cost of hardening. Real in-process sidecars (``Lab.add``) in front of ``python -m serving``
with the tiny test model."""

from __future__ import annotations

import numpy as np
import pytest

from lab import adaptive, routing
from lab.cells import Cell
from lab.counters import delta
from lab.launcher import Lab
from lab.profiles import SIDECARS, config


@pytest.fixture(scope="module")
def lab(serving):
    with Lab(backend=serving.target, sidecars=[SIDECARS["off"]], inprocess=True) as lab:
        yield lab


def copies(img: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct 1-pixel changes of ``img`` (each passes neither threshold)."""
    out = np.repeat(img[None], n, axis=0).astype(np.float32)
    for k in range(n):
        out[k, k // 32, k % 32] = 255 - out[k, k // 32, k % 32]
    return out


def forwarded(lab, mode: str, make_router, images) -> int:
    with lab.add(SIDECARS[mode], inprocess=True) as sc, sc.client("tiny", refusals="answer") as c:
        before = sc.counters.snapshot("tiny")
        router = make_router(c)
        router.predict(images[:1])
        router.predict(images[1:])
        return int(delta(sc.counters.snapshot("tiny"), before)["forwards"])


def test_plain_queries_are_answered_from_the_anchor(lab, test_images):
    cands = copies(test_images[0], 8)
    assert forwarded(lab, "paper", routing.Plain, cands) == 1
    assert forwarded(lab, "hardened", routing.Plain, cands) == 1


def test_interleave_defeats_paper_mode_but_not_hardened(lab, test_images):
    cands, decoys = copies(test_images[0], 8), test_images[100:140]
    make = lambda c: routing.Interleave(c, decoys, seed=0)  # noqa: E731
    assert forwarded(lab, "paper", make, cands) == 16  # every decoy and every candidate
    assert forwarded(lab, "hardened", make, cands) < 16 - 4


def test_fresh_sessions_bypass_paper_mode_only(lab, test_images):
    cands = copies(test_images[0], 8)
    one_by_one = lambda c: routing.FreshSession(c, concurrency=1)  # noqa: E731
    assert forwarded(lab, "paper", one_by_one, cands) == 8
    assert forwarded(lab, "hardened", one_by_one, cands) < 8  # the host's budget answers the rest from its history


def test_adaptive_cells_run_and_resume(lab, test_images, cifar, tmp_path):
    from lab import cells

    cfg = config("adaptive", "quick", model="tiny", pixels=[1], max_iter=1,
                 strategies=["plain", "fresh_session", "blinding"])
    plan = [c for c in adaptive.plan(cfg) if c.defense in ("off", "paper")]
    assert {c.setting for c in plan} == {"plain/pixels=1", "fresh_session/pixels=1", "blinding:light/pixels=1",
                                         "blinding:ensure/pixels=1"}
    plan = [c for c in plan if c.setting in ("plain/pixels=1", "blinding:ensure/pixels=1")]
    y = cifar.y_test
    idx = np.arange(2)
    rows = cells.run_cells(plan, lambda c: adaptive.run_cell(lab, c, test_images, y, idx, test_images[50:60], cfg),
                           tmp_path, progress=False)
    assert len(rows) == len(plan) * 2
    for r in rows:
        assert r.attack == "PixelAttack" and r.defense in ("off", "paper") and r.queries > 0
        assert r.forwarded + r.cached + r.refused == r.queries  # every image the attack sent was judged once
        assert r.success == (r.claimed and r.fooled)
    plain_off = [r for r in rows if r.setting.startswith("plain") and r.defense == "off"]
    assert all(r.forwarded == r.queries for r in plain_off)
    again = cells.run_cells(plan, lambda c: pytest.fail("finished cells must not rerun"), tmp_path, progress=False)
    assert len(again) == len(rows)


def test_decision_cells_name_their_art_attack(lab, test_images, cifar):
    cfg = config("decision", "quick", model="tiny", hsj_max_iter=1, hsj_max_eval=10, hsj_init_eval=5,
                 simba_max_iter=20)
    for attack in ("HopSkipJump", "SimBA"):
        (row,) = adaptive.run_cell(lab, Cell("decision", "tiny", f"plain/{attack}", "paper"), test_images, cifar.y_test,
                                   np.arange(1), test_images[50:60], cfg)
        assert row.attack == attack and row.queries > 0


def test_hardening_cost_streams(lab, test_images, cifar):
    cfg = config("hardening_cost", "quick", model="tiny", n_clean=20, users=3, popular=4, per_user=5)
    out = adaptive.hardening_cost(lab, "tiny", test_images, cifar.y_test, cfg, poison=[(0, test_images[5])])
    assert {(r["stream"], r["defense"]) for r in out} == {(s, d) for s in ("clean", "many_users", "poisoning")
                                                         for d in ("paper", "hardened")}
    for r in out:
        assert 0 <= r["false_cache_rate"] <= r["cached_fraction"] + 1e-9 <= 1 + 1e-9
        assert r["cached"] + r["forwarded"] + r["refused"] == r["n_requests"]
        assert r["false_cached"] <= r["cached"] and r["forwarded_other_label"] == 0
    assert all(r["refused"] == 0 for r in out if r["defense"] == "paper")  # paper mode never refuses
    assert all(r["victims"] == 1 for r in out if r["stream"] == "poisoning")


def test_near_duplicates_in_fresh_sessions_are_answered_never_refused(lab, test_images, cifar):
    """Distinct 1-pixel copies of one image, each from a new session of one host: hardened
    mode forwards its budget of them and answers the rest from the host's own earlier
    answers (issue 23: nothing is refused). Every copy has the original's model label, so
    no such answer can be false."""
    from lab.tables import truth

    src = 2
    cands = copies(test_images[src], 24)
    cands = cands[truth(lab, "tiny", cands) == truth(lab, "tiny", test_images[src][None])[0]]
    assert len(cands) >= 12
    reqs = [(f"user{k}", src, "near_duplicate", img) for k, img in enumerate(cands)]
    (paper, hard) = adaptive.hardening_cost(lab, "tiny", test_images, cifar.y_test, {}, requests={"copies": reqs})
    assert hard["defense"] == "hardened" and hard["cached"] > 0  # else this test shows nothing
    assert hard["refused"] == 0 and hard["false_cached"] == 0 and hard["false_cache_rate"] == 0.0
    assert hard["cached"] + hard["forwarded"] == len(reqs)
    assert paper["refused"] == 0 and paper["false_cached"] == 0 and paper["forwarded"] == len(reqs)


def test_hardened_answers_every_fresh_session_copy(lab, test_images):
    cands = copies(test_images[1], 8)
    with lab.add(SIDECARS["hardened"], inprocess=True) as sc:
        before = sc.counters.snapshot("tiny")
        answering = sc.client("tiny", refusals="answer")
        res = routing.FreshSession(answering, concurrency=1)
        res.predict(cands)
        assert answering.refused == 0 and (res.last_labels >= 0).all()
        routing.FreshSession(sc.client("tiny"), concurrency=1).predict(cands)  # raises nothing
        assert int(delta(sc.counters.snapshot("tiny"), before)["forwards"]) < 8


def test_blinding_cells_through_hashaware_routers(lab, test_images, cifar):
    cfg = config("blinding", "quick", model="tiny", routers=["phash_masks"], defenses=["paper"])
    (cell,) = adaptive.plan_blinding(cfg)
    (row,) = adaptive.run_blinding_cell(lab, cell, test_images, cifar.y_test, np.arange(1), cfg)
    assert row.extra["router"] == "phash_masks" and row.queries > 0
    assert row.forwarded + row.cached + row.refused == row.queries
