"""The committed cpu-profile results (results/cpu/): schema and provenance, not values.

Holds for a partial run too: every finished cell is in its table with a consistent
Wilson interval, every planned cell is either done or pending, and the settings recorded
are the profile's (a changed profile means the kept results must be regenerated).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from lab import results, results_docs, tables
from lab.cells import Row, wilson
from lab.profiles import config

from conftest import REPO

OUT = REPO / "results" / "cpu"
PROFILE = "cpu"


@pytest.fixture(scope="module")
def prov():
    return json.loads((OUT / "provenance.json").read_text())


def test_files_present():
    for name in ("table1.csv", "table2.csv", "table3.csv", "de_check.csv", "models.csv", "provenance.json"):
        assert (OUT / name).exists(), name


@pytest.mark.parametrize("name,experiment", [("table1", "jsma"), ("table2", "onepixel_targeted"),
                                             ("table3", "onepixel_untargeted")])
def test_table_schema(name, experiment):
    df = pd.read_csv(OUT / f"{name}.csv")
    assert tuple(df.columns) == results.COLUMNS
    cfg = config(experiment, PROFILE)
    values = cfg["thetas"] if experiment == "jsma" else cfg["pixels"]
    assert set(df.table) <= {name} and set(df.experiment) <= {experiment}
    assert set(df.model) <= set(cfg["models"]) and set(df.defense) <= set(tables.DEFENSES)
    assert set(df.value) <= {float(v) for v in values}
    assert not df.duplicated(["model", "setting", "defense"]).any()
    for r in df.to_dict("records"):
        assert r["n"] > 0 and 0 <= r["successes"] <= r["n"]
        assert r["rate"] == pytest.approx(r["successes"] / r["n"])
        assert (r["wilson_lo"], r["wilson_hi"]) == pytest.approx(wilson(int(r["successes"]), int(r["n"])))
        assert r["from_first_forward"] + r["from_later_forward"] + r["from_final_check"] <= r["successes"]
        assert 0 <= r["first_meets_goal"] <= r["n"] and 0 <= r["first_forwarded"] <= r["n"]


def test_provenance(prov):
    for key in ("commit", "profile", "created_utc", "settings", "seeds", "data", "model_accuracy", "stage_seconds",
                "cells_done", "cells_pending", "complete", "sittings", "implementation"):
        assert key in prov, key
    for name in ("table1", "table2", "table3"):
        impl = prov["implementation"][name]
        assert impl["library"].startswith("adversarial-robustness-toolbox ") and isinstance(impl["attacks"], list)
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and prov["profile"] == PROFILE
    assert json.loads(json.dumps(results.section_cfgs(PROFILE), default=str)) == prov["settings"]
    done, pending = set(prov["cells_done"]), set(prov["cells_pending"])
    planned = set()
    for key, cfg in results.section_cfgs(PROFILE).items():
        cells, _ = results.cells_of(key, cfg, REPO)
        planned |= {f"de_check/{c.key}" if key.startswith("de_check/") else c.key for c in cells}
    assert not done & pending and done | pending == planned
    assert prov["complete"] == (not pending)


def test_done_cells_are_in_the_tables(prov):
    rows = pd.concat([pd.read_csv(OUT / f"{n}.csv") for n in ("table1", "table2", "table3")])
    have = {f"{r['experiment']}/{r['model']}/{r['setting']}__{r['defense']}" for r in rows.to_dict("records")}
    main = {c for c in prov["cells_done"] if not c.startswith("de_check/")}
    assert have == main


def test_models_and_readme(prov):
    m = pd.read_csv(OUT / "models.csv")
    assert tuple(m.columns) == results.MODEL_COLUMNS
    assert set(m.name) <= set(config("train", PROFILE)["models"])
    assert set(prov["model_accuracy"]) == set(m.name)
    md = results_docs.markdown(PROFILE, OUT)
    assert all(t in md for t in results_docs.TITLES.values())


def test_readme_figures_are_the_committed_tables(prov):
    """The README's one-sentence summary of Tables 1-3 says what the CSVs hold."""
    said = " ".join((REPO / "README.md").read_text().split())
    t1 = pd.read_csv(OUT / "table1.csv")
    dp = pd.concat([pd.read_csv(OUT / f"{n}.csv") for n in ("table2", "table3")])
    k = {d: int(t1[t1.defense == d].successes.sum()) for d in tables.DEFENSES}
    j = {d: int(dp[dp.defense == d].successes.sum()) for d in tables.DEFENSES}
    assert (f"JSMA succeeds on {k['off']} of {int(t1[t1.defense == 'off'].n.sum())} images with no defense, "
            f"{k['paper']} through paper mode and {k['hardened']} through hardened mode") in said
    assert f"One Pixel on {j['off']} of {int(dp[dp.defense == 'off'].n.sum())}, {j['paper']} and {j['hardened']}" in said
    assert prov["complete"]


def test_query_log_names_the_answer_a_success_rests_on():
    cache = {}

    def predict(images):  # a paper-mode stand-in: an image near the first one gets its answer
        out = []
        for im in images:
            key = "anchor" if cache and np.abs(im - cache["x"]).sum() < 10 else None
            if key is None:
                cache["x"], cache["s"] = im, np.eye(10)[int(im.sum()) % 10] * 0.9 + 0.01
            out.append(cache["s"])
        return np.stack(out)

    log = tables.QueryLog(predict)
    x = np.zeros((1, 2, 2, 3), np.float32)
    log(np.concatenate([x + 3, x + 3.5]))
    assert log.first_label == int((x + 3).sum()) % 10 and len(log.seen) == 1 and log.n == 2
    assert log.source(predict(x + 3.2)[0]) == "first_forward"
    log(x + 100)
    assert log.source(predict(x + 100)[0]) == "later_forward"
    assert log.source(np.full(10, 0.1)) == "final_check"
    assert Row("e", "a", "m", "s", "d", 0, 2, goal="target", target=log.first_label).meets_goal(log.first_label)


def test_de_population_sets_art_popsize(monkeypatch):
    import art.attacks.evasion.pixel_threshold as pt

    seen = {}
    monkeypatch.setattr(pt, "differential_evolution", lambda f, bounds, **kw: seen.update(kw))
    with tables.de_population(100):
        pt.differential_evolution(None, [(0, 1)] * 15, popsize=26)
    assert seen["popsize"] == 100 // 15
    with tables.de_population(None):
        pt.differential_evolution(None, [(0, 1)] * 15, popsize=26)
    assert seen["popsize"] == 26
