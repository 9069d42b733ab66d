"""AdvBox-semantics JSMA (lab.advbox_jsma): one feature per step, at most 7 changes per
feature, a step is one query, stop at max_iter, and a random target that is never the label."""

from __future__ import annotations

import numpy as np

from lab.advbox_jsma import AdvBoxJSMA, advbox_target


def _const_grad(weights):
    """A linear target value: its gradient is ``weights`` whatever the image."""
    def grad(images, targets):
        return np.broadcast_to(weights, images.shape).copy()
    return grad


def never(images, active):
    return np.zeros(len(images), np.int64)  # always the original label 0


def test_one_feature_per_step_and_cap_of_seven():
    x0 = np.full((1, 2, 2, 3), 100.0, np.float32)
    w = np.zeros((2, 2, 3), np.float32)
    w[0, 0, 0], w[1, 1, 2] = 5.0, 1.0  # the first feature wins until it is capped
    atk = AdvBoxJSMA(theta=0.01, max_iter=10)
    out = atk.run(x0, np.array([3]), never, _const_grad(w))[0]
    d = out.adversarial - x0[0]
    step = 0.01 * 255
    assert np.isclose(d[0, 0, 0], 7 * step)  # capped at 7 changes
    assert np.isclose(d[1, 1, 2], 3 * step)  # then the next feature: one change per step
    assert np.count_nonzero(d) == 2
    assert out.steps == 10 and out.queries == 10 and out.stop == "max_iter" and not out.accepted


def test_negative_gradient_is_not_taken_and_bounds_mask():
    x0 = np.full((1, 1, 1, 3), 250.0, np.float32)
    w = np.array([[[-9.0, 2.0, 1.0]]], np.float32)  # fast=True moves the largest positive alpha
    atk = AdvBoxJSMA(theta=0.1, max_iter=2)
    out = atk.run(x0, np.array([1]), never, _const_grad(w))[0]
    assert out.adversarial[0, 0, 0] == 250.0
    assert out.adversarial[0, 0, 1] == 255.0 and out.adversarial[0, 0, 2] == 255.0  # hit the bound: masked


def test_mask_empty_stops_before_max_iter():
    x0 = np.full((1, 1, 1, 1), 250.0, np.float32)
    atk = AdvBoxJSMA(theta=0.1, max_iter=50)
    out = atk.run(x0, np.array([1]), never, _const_grad(np.ones((1, 1, 1), np.float32)))[0]
    assert out.stop == "mask_empty" and out.steps == 1 and out.queries == 2


def test_accepts_only_the_target_and_counts_queries():
    x0 = np.zeros((2, 2, 2, 1), np.float32)
    calls = []

    def answer(images, active):
        calls.append(list(active))
        step = len(calls)
        # image 0 answers 5 (not its target) at step 2, its target 4 at step 3; image 1 never
        return np.array([{2: 5, 3: 4}.get(step, 0) if a == 0 else 7 for a in active])

    atk = AdvBoxJSMA(theta=0.1, max_iter=6)
    o0, o1 = atk.run(x0, np.array([4, 3]), answer, _const_grad(np.ones((2, 2, 1), np.float32)))
    assert o0.accepted and o0.queries == 3 and o0.steps == 2 and o0.answered_label == 4
    assert not o1.accepted and o1.queries == 6 and o1.answered_label == 7
    assert calls[3:] == [[1], [1], [1]]  # a finished image sends nothing more


def test_random_target_never_the_label():
    seen = set()
    for label in range(10):
        for seed in range(50):
            t = advbox_target(label, seed)
            assert t != label and 0 <= t < 10
            seen.add(t)
    assert seen == set(range(10))
    assert advbox_target(3, 7) == advbox_target(3, 7)  # seeded


def test_reduction_is_the_mean_relative_drop_within_wilson_bounds():
    from lab.results_docs import paper_reduction, reduction

    m, lo, hi = reduction([(100, 100, 60, 100), (50, 100, 25, 100)])
    assert abs(m - (0.4 + 0.5) / 2) < 1e-12 and lo < m < hi
    assert reduction([(0, 100, 0, 100)]) is None  # nothing to reduce
    assert abs(paper_reduction() - 0.363) < 0.001  # the abstract's "average of 36.3%"


def test_committed_table_is_consistent():
    """results/cpu/table1_advbox.csv, when committed: Wilson intervals from its counts, the
    paper's figures beside the right cells, the same n for both columns of a cell."""
    import json

    import pandas as pd
    import pytest

    from conftest import REPO
    from lab.cells import wilson
    from lab.paper_tables import rows

    path = REPO / "results" / "cpu" / "table1_advbox.csv"
    if not path.exists():
        pytest.skip("no committed AdvBox Table 1")
    t = pd.read_csv(path)
    prov = json.loads((path.parent / "table1_advbox_provenance.json").read_text())
    paper = {(r["model"], r["theta"]): r for r in rows("jsma")}
    for r in t.to_dict("records"):
        assert (r["wilson_lo"], r["wilson_hi"]) == pytest.approx(wilson(r["successes"], r["n"]))
        key = "asr_without_defense" if r["defense"] == "off" else "asr_with_defense"
        if r["defense"] in ("off", "paper"):
            assert r["paper_rate"] == pytest.approx(paper[(r["model"], r["theta"])][key])
        assert r["n"] == prov["settings"]["n_images"]
    assert len(t) == len(prov["cells_done"])
