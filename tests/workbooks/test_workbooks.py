"""The workbooks: real notebooks (static checks, fast) and the quick chain through
``python -m lab.run_workbooks`` (slow: trains the quick models, runs 01-07 and 09)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lab.paths import WORKBOOKS
from lab.run_workbooks import ORDER

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ORDER)
def test_notebook_is_a_parameterised_source_notebook(name):
    nb = nbformat.read(WORKBOOKS / name, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "profile =" in tagged[0].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "lab.notebooks" not in code and "lab.books" not in code  # no generator behind it
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    for c in nb.cells:  # thin: the logic lives in lab
        assert len(c.source.splitlines()) <= 30, f"{name}: a cell of {len(c.source.splitlines())} lines"


def test_report_renders_from_result_files_and_names_implementations(tmp_path):
    import pandas as pd

    from lab import report

    table = pd.DataFrame({"model": ["lenet"], "pixels": [1], "asr_without_defense": [0.5], "asr_with_defense": [0.1]})
    report.write(tmp_path, "table2_onepixel_targeted", table, {"profile": "quick", "implementation": "art X"})
    html = report.render(tmp_path).read_text()
    assert "art X" in html and "paper_asr_with_defense" in html
    assert "benign_cost.csv not found" in html  # missing inputs are said, not invented


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from lab.cifar10 import DatasetNotFound, load_cifar10

    try:
        load_cifar10()
    except DatasetNotFound as exc:
        pytest.skip(f"CIFAR-10 unavailable: {exc}")
    base = tmp_path_factory.mktemp("workbooks")
    paths = {k: base / k for k in ("reports", "models", "out")}
    cmd = [sys.executable, "-m", "lab.run_workbooks", "--profile", "quick", "--models-dir", str(paths["models"]),
           "--report-dir", str(paths["reports"]), "--out-dir", str(paths["out"]), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
                          text=True, timeout=2900)
    log = proc.stdout[-6000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, f"run_workbooks failed ({proc.returncode}):\n{log}"
    return {**paths, "cmd": cmd, "log": log}


def _csv(path: Path):
    import pandas as pd

    assert path.exists(), f"{path.name} was not written"
    return pd.read_csv(path)


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the chain runs in the first test's setup: ~12 min on 2 idle cores
def test_every_notebook_ran(quick_run):
    status = json.loads((quick_run["reports"] / "workbooks_run.json").read_text())
    for nb in ORDER:
        assert status["notebooks"][nb]["ok"], status["notebooks"][nb]
        assert (quick_run["out"] / nb).exists()


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the chain runs in the first test's setup: ~12 min on 2 idle cores
@pytest.mark.parametrize("stem", ["table1_jsma", "table2_onepixel_targeted", "table3_onepixel_untargeted"])
def test_paper_tables(quick_run, stem):
    t = _csv(quick_run["reports"] / f"{stem}.csv")
    meta = json.loads((quick_run["reports"] / f"{stem}.json").read_text())
    assert "art.attacks.evasion" in meta["implementation"] and "adversarial-robustness-toolbox" in meta["implementation"]
    for side in ("without", "with"):
        assert ((t[f"asr_lo_{side}_defense"] <= t[f"asr_{side}_defense"]) &
                (t[f"asr_{side}_defense"] <= t[f"asr_hi_{side}_defense"])).all()
        assert (t[f"n_{side}_defense"] > 0).all()
    assert (t.forwarded_fraction_without_defense == 1).all()  # --mode off forwards everything


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the chain runs in the first test's setup: ~12 min on 2 idle cores
def test_adaptive_side_channels_and_costs(quick_run):
    rd = quick_run["reports"]
    adaptive = _csv(rd / "adaptive.csv")
    assert set(adaptive.defense) == {"off", "paper", "hardened"}
    assert {s.split("/")[0] for s in adaptive.setting} >= {"plain", "interleave", "fresh_session", "accounts"}
    assert set(_csv(rd / "decision.csv").attack) == {"HopSkipJump", "SimBA"}
    assert set(_csv(rd / "hardening_cost.csv").stream) >= {"clean", "many_users"}
    blinding = _csv(rd / "blinding.csv")
    assert set(blinding.router) == {"phash_masks", "lowpass_masks", "random_blinding"}
    assert set(blinding.defense) == {"paper", "hardened"}
    dist = _csv(rd / "distinguisher.csv")
    exact = dist[(dist.policy == "scores_exact") & (dist.padding == "off")]
    assert exact.accuracy.iloc[0] > 0.9  # exact replays are caught
    assert set(_csv(rd / "oars.csv").attack) == {"SquareAttack"}
    assert (_csv(rd / "benign_cost.csv").accuracy_without_defense > 0).all()
    assert set(_csv(rd / "timing.csv").padding) == {"off", "distribution", "fixed"}


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the chain runs in the first test's setup: ~12 min on 2 idle cores
def test_report_and_resume(quick_run):
    html = (quick_run["reports"] / "report.html").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Adaptive attacks", "OARS"):
        assert title in html
    assert "not found" not in html  # every section is there
    cells = list((quick_run["reports"] / "cells").rglob("*.json"))
    assert cells
    t0 = {p: p.stat().st_mtime_ns for p in cells}
    proc = subprocess.run([*quick_run["cmd"], "--only", "02", "--train", "never"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t0[p] for p in cells)  # finished cells were not recomputed
