"""The experiment kit: launcher, client, counters, cells, ART estimators over the sidecar.

Real servers: ``python -m serving`` with the tiny test models and sidecars from
``lab.launcher`` (in-process and as processes). Parity: ART's attacks through the
sidecar with ``--mode off`` give exactly what they give on the local model.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lab import cells, estimators, paper_tables, routing
from lab.cells import Cell, Row
from lab.client import LocalClient
from lab.counters import Counters, delta, parse, total
from lab.launcher import Lab, LaunchError, SidecarSpec, model_config_text
from lab.profiles import PROFILES, SIDECARS, config, models_needed

EXACT = ("--output", "scores", "--score-precision", "0", "--score-noise", "0")


@pytest.fixture(scope="module")
def lab(serving):
    with Lab(backend=serving.target, sidecars=[SidecarSpec("off", "off", args=EXACT),
                                               SidecarSpec("paper", "paper", args=EXACT)], inprocess=True) as lab:
        yield lab


def one_pixel(img: np.ndarray, k: int = 0) -> np.ndarray:
    out = img.copy()
    out[k // 32, k % 32] = 255 - out[k // 32, k % 32]
    return out


# -- cells and rows -----------------------------------------------------------------

def test_success_is_claimed_and_fooled():
    r = Row("e", "A", "m", "s", "paper", 0, true_label=3, goal="target", target=5)
    assert r.judge(5, 5).success and r.claimed and r.fooled
    assert not r.judge(5, 3).success and r.claimed and not r.fooled  # told it worked; the model disagrees
    u = Row("e", "A", "m", "s", "off", 0, true_label=3)
    assert u.judge(7, 1).success and not u.judge(3, 1).success
    assert not u.judge(-1, 1).claimed  # a refused query (label -1) claims nothing


def test_run_cells_skips_finished_cells(tmp_path):
    calls = []

    def fn(cell):
        calls.append(cell)
        return [Row(cell.experiment, "A", cell.model, cell.setting, cell.defense, 1, 2).judge(4, 4)]

    plan = [Cell("x", "m", f"k={k}", d) for k in (1, 2) for d in ("off", "paper")]
    first = cells.run_cells(plan[:3], fn, tmp_path, progress=False)
    again = cells.run_cells(plan, fn, tmp_path, progress=False)
    assert len(calls) == 4 and calls[-1] == plan[3]  # only the missing cell ran the second time
    assert [r.__dict__ for r in again[:3]] == [r.__dict__ for r in first]
    assert json.loads((tmp_path / f"{plan[0].key}.json").read_text())["cell"]["setting"] == "k=1"


def test_sittings_sharing_a_folder_split_its_cells(tmp_path):
    import subprocess
    import sys

    ran = []

    def fn(cell):
        assert (tmp_path / f"{cell.key}.claim").read_text() == str(os.getpid())  # held while it runs
        ran.append(cell)
        return [Row(cell.experiment, "A", cell.model, cell.setting, cell.defense, 1, 2).judge(4, 4)]

    plan = [Cell("x", "m", f"k={k}", "off") for k in (1, 2, 3)]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        (tmp_path / plan[0].key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{plan[0].key}.claim").write_text(str(other.pid))  # a live sitting runs it
        (tmp_path / f"{plan[1].key}.claim").write_text(dead.stdout.strip())  # a sitting that died
        rows = cells.run_cells(plan, fn, tmp_path, progress=False)
        assert ran == plan[1:] and len(rows) == 2
        assert (tmp_path / f"{plan[0].key}.claim").exists() and not (tmp_path / f"{plan[0].key}.json").exists()
        assert not list(tmp_path.rglob("*.claim"))[1:]  # only the live sitting's claim is left
    finally:
        other.kill()
        other.wait()
    with pytest.raises(RuntimeError):  # a failing cell gives its claim back
        cells.run_cells(plan, lambda c: (_ for _ in ()).throw(RuntimeError("boom")), tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.claim")) and not (tmp_path / f"{plan[0].key}.json").exists()
    cells.run_cells(plan, fn, tmp_path, progress=False)  # the live sitting is gone: its claim is taken over
    assert ran[-1] == plan[0]


def test_summary_of_no_rows_is_an_empty_table():
    """A sitting whose cells all ran elsewhere summarizes nothing: an empty table, not an error."""
    import pandas as pd

    s = cells.summarize([], by=("model", "setting", "defense"))
    assert s.empty and {"model", "setting", "defense", "asr", "n"} <= set(s.columns)
    assert len(pd.concat([s.assign(experiment="x"), s])) == 0


def test_wilson_and_summary_per_image():
    lo, hi = cells.wilson(0, 10)
    assert lo == 0 and 0.27 < hi < 0.28
    lo, hi = cells.wilson(5, 10)
    assert 0.23 < lo < 0.24 and 0.76 < hi < 0.77
    rows = [Row("e", "A", "m", "s", "off", i // 2, 0, target=1, goal="target").judge(int(i == 1), int(i == 1))
            for i in range(4)]
    per_row = cells.summarize(rows, by=("model",))
    per_image = cells.summarize(rows, by=("model",), unit="image_index")
    assert (per_row.n[0], per_row.successes[0]) == (4, 1)
    assert (per_image.n[0], per_image.successes[0]) == (2, 1)


def test_profiles_name_every_sidecar_and_model():
    for p in PROFILES.values():
        assert set(PROFILES["quick"]) <= set(p)  # every section the workbooks read; cpu adds de_check
    assert config("jsma", "quick", n_images=2)["n_images"] == 2
    assert "lenet" in models_needed("quick")
    assert {"off", "paper", "hardened"} <= set(SIDECARS)
    with pytest.raises(ValueError):
        config("jsma", "nope")


def test_paper_tables_have_the_three_tables():
    for section in ("jsma", "onepixel_targeted", "onepixel_untargeted"):
        df = paper_tables.frame(section)
        assert len(df) and {"model", "asr_without_defense", "asr_with_defense"} <= set(df.columns)


# -- launcher, client, counters ------------------------------------------------------

def test_counters_parse_and_sum_label_sets():
    text = ('hashguard_cache_answers_total{model="m",mode="paper",source="session"} 2\n'
            'hashguard_cache_answers_total{model="m",mode="paper",source="lookup"} 3\n'
            'hashguard_forwards_total{model="m",mode="paper"} 4\n')
    s = parse("# TYPE hashguard_cache_answers counter\n# TYPE hashguard_forwards counter\n" + text)
    assert total(s, "hashguard_cache_answers_total", model="m") == 5
    snap = Counters(lambda: text).snapshot("m")
    assert (snap["cached"], snap["cache_lookup"], snap["forwards"]) == (5, 3, 4)
    assert delta(snap, {**snap, "forwards": 1})["forwards"] == 3


def test_client_and_counters_see_the_judgment(lab, test_images):
    x = test_images[:1]
    for name, cached in (("paper", 1), ("off", 0)):
        c, counters = lab.client(name, "tiny"), lab.counters(name)
        before = counters.snapshot("tiny")
        s = c.predict(np.concatenate([x, one_pixel(x[0])[None]]))
        d = delta(counters.snapshot("tiny"), before)
        assert s.shape == (2, 10) and c.calls == 1 and c.queries == 2
        assert (d["forwards"], d["cached"]) == (2 - cached, cached)


def test_process_and_inprocess_sidecars_answer_alike(serving, test_images):
    spec = SidecarSpec("p", "paper", args=EXACT)
    with Lab(backend=serving.target, sidecars=[spec]) as procs, Lab(backend=serving.target, sidecars=[spec],
                                                                    inprocess=True) as here:
        a = procs.client("p", "tiny").predict(test_images[:4])
        b = here.client("p", "tiny").predict(test_images[:4])
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert procs.counters("p").snapshot("tiny")["forwards"] == 4
        joined = Lab.attach(json.dumps(procs.endpoints()))
        assert joined.client("p", "tiny").labels(test_images[:2]).tolist() == a[:2].argmax(1).tolist()


def test_launcher_reports_failures(tmp_path, serving):
    with pytest.raises(LaunchError, match="not found"):
        Lab(tmp_path, ["missing"]).start()
    with pytest.raises(LaunchError, match="exited"):
        Lab(backend=serving.target, sidecars=[SidecarSpec("bad", "paper", args=("--threshold", "-1"))]).start()
    assert 'name: "m"' in model_config_text({"m": tmp_path})


# -- ART estimators over the sidecar ---------------------------------------------------

def test_black_box_sends_a_whole_population_as_one_batch(lab, test_images):
    c = lab.client("off", "tiny")
    est = estimators.black_box(c.predict)
    pop = np.repeat(test_images[:1].astype(np.float32), 400, axis=0)
    assert est.predict(pop, batch_size=128).shape == (400, 10)
    assert c.calls == 1


def test_sidecar_gradients_are_the_local_models(lab, model_base, test_images):
    x = test_images[:3].astype(np.float32)
    loc = estimators.local(model_base / "tiny" / "2")
    est = estimators.SidecarGradients(lab.client("off", "tiny").predict, model_base / "tiny" / "2")
    np.testing.assert_allclose(est.predict(x), loc.predict(x), atol=1e-5)
    np.testing.assert_allclose(est.class_gradient(x, label=[1, 2, 3]), loc.class_gradient(x, label=[1, 2, 3]),
                               atol=1e-6)


@pytest.mark.parametrize("attack", ["PixelAttack", "SquareAttack", "SaliencyMapMethod"])
def test_art_attacks_through_the_undefended_sidecar_match_the_local_model(attack, lab, model_base, test_images):
    """Parity: with ``--mode off`` the sidecar is exactly the model, so an ART attack with the
    same seed returns the same images through it as on the local copy."""
    from art.attacks.evasion import PixelAttack, SaliencyMapMethod, SquareAttack

    x = test_images[:2].astype(np.float32)
    vdir = model_base / "tiny" / "2"

    def make(predict):
        if attack == "SaliencyMapMethod":
            return SaliencyMapMethod(estimators.SidecarGradients(predict, vdir), theta=26.0, gamma=0.02, verbose=False)
        est = estimators.black_box(predict)
        if attack == "PixelAttack":
            return PixelAttack(est, th=1, es=1, max_iter=1, verbose=False)
        return SquareAttack(est, eps=16.0, max_iter=20, verbose=False)

    out = []
    for predict in (estimators.local(vdir).predict, lab.client("off", "tiny").predict):
        np.random.seed(0)
        out.append(make(predict).generate(x, y=np.eye(10)[[3, 4]]))
    np.testing.assert_allclose(out[0], out[1], atol=1e-3)


# -- routers ---------------------------------------------------------------------------

def fake(images):
    return np.eye(10, dtype=np.float32)[np.asarray(images, np.int64).reshape(len(images), -1).sum(1) % 10]


def test_routers_route_as_documented(test_images):
    x = test_images[:6].astype(np.float32)
    c = LocalClient(fake)
    routing.Plain(c).predict(x)
    assert [len(im) for _, im in c.log] == [6] and c.log[0][0] == c.session
    c.log.clear()
    inter = routing.Interleave(c, test_images[100:110], seed=1)
    s = inter.predict(x)
    (sess, sent), = c.log
    assert len(sent) == 12 and np.array_equal(sent[1::2], x) and inter.sent == 12
    np.testing.assert_array_equal(s, fake(x))
    c.log.clear()
    routing.FreshSession(c).predict(x)
    assert len({sess for sess, _ in c.log}) == 6
    c.log.clear()
    acc = routing.Accounts(c, 4)
    acc.predict(x[:3]), acc.predict(x[:3])
    assert len(acc.sessions) == 4 and sum(len(im) for _, im in c.log) == 6


def test_blinding_ensure_passes_the_thresholds_by_construction(test_images):
    from sidecar.judge.phash import hamming, phash, pixel_diff

    b = routing.Blinding(LocalClient(fake), routing.BlindSpec(max_shift=1, sigma=2.0, ensure=True), seed=3)
    sent = [b.transform(test_images[0]) for _ in range(6)]
    for i in range(1, len(sent)):
        assert all(hamming(phash(sent[i]), phash(sent[j])) > b.threshold for j in range(i))
        assert pixel_diff(sent[i], sent[i - 1]) > b.threshold


def test_resample_is_plain_when_nothing_is_cached_and_resends_replays(model_base, test_images):
    """Parity of our only attack-side code: with no cache, ART's SquareAttack behind Resample
    returns exactly what it returns plain; a replayed answer is resampled."""
    from art.attacks.evasion import SquareAttack

    soft = estimators.local(model_base / "tiny" / "2").predict
    x = test_images[:1].astype(np.float32)
    out = []
    for wrap in (False, True):
        r = routing.Plain(LocalClient(soft))
        r = routing.Resample(r, 3, seed=0) if wrap else r
        np.random.seed(1)
        out.append(SquareAttack(estimators.black_box(r.predict), eps=8.0, max_iter=15, p_init=0.1, verbose=False).generate(x))
    np.testing.assert_array_equal(out[0], out[1])
    res = routing.Resample(routing.Plain(LocalClient(fake)), 3, seed=0)
    res.predict(x), res.predict(x)  # the same query twice: the same answer is no evidence of a cache
    assert res.detected == 0
    res.predict(one_pixel(test_images[0]).astype(np.float32)[None] * 0 + x + 10)  # another query, fake's same answer
    assert res.detected == 1 and res.resamples >= 1


def test_black_box_stops_an_attack_at_its_query_budget():
    """HopSkipJump's step search can loop forever against a stateful defense; the
    estimator's budget ends it with QueryBudgetExhausted instead."""
    from lab import estimators

    asked = []

    def predict(x):
        asked.append(len(x))
        return np.tile(np.eye(10, dtype=np.float32)[0], (len(x), 1))

    est = estimators.black_box(predict, max_queries=10)
    est.predict(np.zeros((6, 32, 32, 3), np.float32))
    with pytest.raises(estimators.QueryBudgetExhausted):
        est.predict(np.zeros((5, 32, 32, 3), np.float32))
    assert asked == [6]  # the call over budget never reached the sidecar
