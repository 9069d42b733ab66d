"""Every workbook, quick profile, through ``python -m lab.run_workbooks``; then the result files.

One run (a few minutes on 2 CPU cores: it trains the quick models, starts serving
and the sidecars, executes 01-07 and 09 with papermill) into a temporary folder;
the tests below check what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import harness

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_train_export.ipynb", "02_jsma.ipynb", "03_onepixel.ipynb", "04_benign_cost.ipynb",
             "05_timing.ipynb", "06_adaptive.ipynb", "07_side_channels.ipynb", "09_report.ipynb")
QUICK = harness.PROFILES["quick"]

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, request):
    from lab.cifar10 import DatasetNotFound, load_cifar10

    try:
        load_cifar10()
    except DatasetNotFound as exc:
        pytest.skip(f"CIFAR-10 unavailable: {exc}")
    base = tmp_path_factory.mktemp("workbooks")
    reports, models, out = base / "reports", base / "models", base / "out"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lab.run_workbooks", "--profile", "quick", "--models-dir", str(models),
           "--report-dir", str(reports), "--out-dir", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    log = proc.stdout[-6000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, f"run_workbooks failed ({proc.returncode}):\n{log}"
    return {"reports": reports, "models": models, "out": out, "log": log}


def _csv(path: Path):
    import pandas as pd

    assert path.exists(), f"{path.name} was not written"
    return pd.read_csv(path)


def test_every_notebook_ran(quick_run):
    status = json.loads((quick_run["reports"] / "workbooks_run.json").read_text())
    assert status["profile"] == "quick"
    for nb in NOTEBOOKS:
        assert status["notebooks"][nb]["ok"], status["notebooks"][nb]
        assert (quick_run["out"] / nb).exists()
    import nbformat

    executed = nbformat.read(quick_run["out"] / "02_jsma.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)


@pytest.mark.parametrize("section", ["jsma", "onepixel_targeted", "onepixel_untargeted"])
def test_attack_tables(quick_run, section):
    cfg = QUICK[section]
    attempts_file, table_file = harness.FILES[section]
    table = _csv(quick_run["reports"] / table_file)
    param = harness.PAPER_COLUMNS[section][1]
    assert list(table.columns[:4]) == harness.PAPER_COLUMNS[section]
    values = cfg["thetas"] if section == "jsma" else cfg["pixels"]
    assert len(table) == len(cfg["models"]) * len(values)
    assert set(table.model) == set(cfg["models"]) and set(table[param]) == set(values)
    for col in ("asr_without_defense", "asr_with_defense"):
        assert table[col].between(0, 1).all()
    assert (table.n_images_without_defense == cfg["n_images"]).all()
    assert (table.n_images_with_defense == cfg["n_images"]).all()
    assert (table.profile == "quick").all()
    assert table.model_test_accuracy.between(0, 1).all()
    attempts = _csv(quick_run["reports"] / attempts_file)
    per_image = 9 if section == "onepixel_untargeted" else 1
    assert len(attempts) == len(cfg["models"]) * len(values) * 2 * cfg["n_images"] * per_image
    assert set(attempts.defense) == {"on", "off"}
    # both columns attacked the same images, and the model classified every one of them correctly
    for (m, p), g in attempts.groupby(["model", param]):
        assert set(g[g.defense == "on"].image_index) == set(g[g.defense == "off"].image_index)
    from lab.attacks.jsma import TFGradients
    from lab.cifar10 import load_cifar10

    data = load_cifar10()
    for m, g in attempts.groupby("model"):
        idx = sorted(set(g.image_index))
        local = TFGradients(harness.latest_version_dir(quick_run["models"], m))
        assert (local.scores(data.x_test[idx]).argmax(1) == data.y_test[idx]).all()
        assert (g.true_label.to_numpy() == data.y_test[g.image_index.to_numpy()]).all()
    meta = json.loads((quick_run["reports"] / f"{section}.json").read_text())
    assert meta["profile"] == "quick" and meta["settings"]["n_images"] == cfg["n_images"]


def test_defense_does_not_raise_one_pixel_untargeted_asr(quick_run):
    table = _csv(quick_run["reports"] / harness.FILES["onepixel_untargeted"][1])
    one = table[table.pixels == 1]
    assert len(one) == len(QUICK["onepixel_untargeted"]["models"])
    assert (one.asr_with_defense <= one.asr_without_defense).all(), one


def test_jsma_respects_the_iteration_cap(quick_run):
    attempts = _csv(quick_run["reports"] / harness.FILES["jsma"][0])
    assert (attempts.iterations <= QUICK["jsma"]["max_iter"]).all()
    assert (attempts.queries == attempts.iterations + 1).all()
    assert (attempts[attempts.success].final_label == attempts[attempts.success].target).all()


def test_benign_cost(quick_run):
    cfg = QUICK["benign"]
    b = _csv(quick_run["reports"] / "benign_cost.csv")
    assert len(b) == len(cfg["models"]) and (b.n_images == cfg["n_images"]).all()
    for col in ("accuracy_without_defense", "accuracy_with_defense", "cached_fraction"):
        assert b[col].between(0, 1).all()
    assert (b.cached_wrong <= b.cached_answers).all()
    assert (b.undefended_cached_answers == 0).all()
    assert (b.profile == "quick").all()
    meta = json.loads((quick_run["reports"] / "benign_cost.json").read_text())
    assert "prometheus" in meta["ground_truth"]


def test_timing(quick_run):
    cfg = QUICK["timing"]
    t = json.loads((quick_run["reports"] / "timing.json").read_text())
    assert t["profile"] == "quick" and [r["padding"] for r in t["results"]] == cfg["paddings"]
    for r in t["results"]:
        assert r["n_cached"] + r["n_forwarded"] == cfg["n"]
        assert 0 <= r["ks_pvalue"] <= 1 and 0 <= r["ks_statistic"] <= 1
    lat = _csv(quick_run["reports"] / "timing_latencies.csv")
    assert len(lat) == cfg["n"] * len(cfg["paddings"])
    assert (lat.cached == lat.expected_cached).all()
    assert (quick_run["reports"] / "timing_hist.png").stat().st_size > 1000


def test_adaptive_attacks(quick_run):
    from lab import adaptive

    cfg, cfg_h = QUICK["adaptive"], QUICK["hsj"]
    table = _csv(quick_run["reports"] / "adaptive_attacks.csv")
    assert list(table.columns[:8]) == ["strategy", "attack", "model", "pixels", "mode", "asr", "n", "mean_queries"]
    assert (table.profile == "quick").all() and table.asr.between(0, 1).all()
    op = table[table.attack == "onepixel_untargeted"]
    cells = adaptive.onepixel_cells(cfg)
    assert len(op) == len(cells) * len(cfg["pixels"]) * len(cfg["models"])
    assert (op.n == cfg["n_images"]).all() and set(op.pixels) == set(cfg["pixels"])
    assert (op.mean_queries <= cfg["popsize"] * (cfg["maxiter"] + 1) + 1).all()
    for s in ("plain", "interleave", "fresh_session", "accounts"):
        assert {"paper", "hardened"} <= set(op[op.strategy == s]["mode"]), s
    assert set(op[op.strategy == "plain"]["mode"]) == {"off", "paper", "hardened"}
    for b in cfg["blinding"]:
        blind = op[op.strategy == f"blinding:{b['name']}"]
        assert set(blind["mode"]) == {"off", "paper", "hardened"}
        assert blind.asr_blinded.between(0, 1).all() and (blind.blind_mean_hash_distance > 0).all()
    # the undefended reference never answers from a cache; paper's plain attacker gets one forward per image
    assert (op[op["mode"] == "off"].forwarded_fraction == 1).all()
    hsj = table[table.attack == "hopskipjump"]
    assert len(hsj) == len(adaptive.hsj_cells(cfg_h)) * len(cfg_h["models"])
    assert (hsj.n == cfg_h["n_images"]).all() and (hsj.mean_queries <= cfg_h["budget"]).all()
    attempts = _csv(quick_run["reports"] / "adaptive_attempts.csv")
    # every cell attacked the same correctly classified images
    for (m, k), g in attempts[attempts.attack == "onepixel_untargeted"].groupby(["model", "pixels"]):
        sets = {frozenset(gg.image_index) for _, gg in g.groupby(["strategy", "mode"])}
        assert len(sets) == 1
    assert (attempts.success <= attempts.claimed_success).all()
    meta = json.loads((quick_run["reports"] / "adaptive.json").read_text())
    assert meta["profile"] == "quick" and meta["settings"]["adaptive"]["n_images"] == cfg["n_images"]
    assert meta["projection_full"]["onepixel"]["projected_hours_upper"] > 0
    blind_cost = _csv(quick_run["reports"] / "blinding_cost.csv")
    assert set(blind_cost.blind) == {b["name"] for b in cfg["blinding"]}
    assert (quick_run["reports"] / "06_adaptive.png").stat().st_size > 1000


def test_hardened_lowers_the_interleave_and_fresh_session_bypasses(quick_run):
    """Acceptance (issue "Hardened mode" 3-4): the quick profile is sized so the paper-mode
    bypasses succeed on some images, and hardened mode must do strictly better."""
    pool = _csv(quick_run["reports"] / "adaptive_pooled.csv")
    op = pool[pool.attack == "onepixel_untargeted"].set_index(["strategy", "mode"]).asr
    for s in ("interleave", "fresh_session"):
        assert op[(s, "paper")] > 0, f"{s}: paper-mode bypass never succeeded; the quick profile is too small"
        assert op[(s, "hardened")] < op[(s, "paper")], (s, op[(s, "paper")], op[(s, "hardened")])


def test_hardening_cost(quick_run):
    cost = _csv(quick_run["reports"] / "hardening_cost.csv")
    assert {"clean", "many_users"} <= set(cost.stream) and set(cost["mode"]) == {"paper", "hardened"}
    for col in ("accuracy", "cached_fraction", "false_cache_rate"):
        assert cost[col].between(0, 1).all()
    assert (cost.false_cached <= cost.n_requests).all() and (cost.profile == "quick").all()
    clean = cost[cost.stream == "clean"]
    assert (clean.n_requests == QUICK["hardening_cost"]["n_clean"]).all()
    mu = cost[cost.stream == "many_users"]
    assert (mu.n_requests == QUICK["hardening_cost"]["users"] * QUICK["hardening_cost"]["per_user"]).all()


def test_distinguisher(quick_run):
    cfg = QUICK["distinguisher"]
    d = _csv(quick_run["reports"] / "distinguisher.csv")
    assert set(d.policy) == {"scores_exact", "scores_default", "topk", "label"}
    assert set(d.padding) == {"on", "off"} and set(d.hit_mode) == {"paper", "hardened"}
    assert (d.n_hits == cfg["n"]).all() and (d.n_misses == cfg["n"]).all() and (d.profile == "quick").all()
    for col in ("accuracy", "rule_accuracy", "content_accuracy", "timing_accuracy"):
        assert d[col].between(0, 1).all()
    # exact scores replay the anchor's answer byte for byte: the replay rule must see it
    assert (d[d.policy == "scores_exact"].rule_accuracy >= 0.9).all()
    meta = json.loads((quick_run["reports"] / "distinguisher.json").read_text())
    assert meta["profile"] == "quick"


def test_oars(quick_run):
    cfg = QUICK["oars"]
    o = _csv(quick_run["reports"] / "oars.csv")
    assert set(o["mode"]) == {"off", "paper", "hardened"} and set(o.policy) == set(cfg["policies"])
    for pol in cfg["policies"]:
        for mode in ("paper", "hardened"):
            got = set(o[(o.policy == pol) & (o["mode"] == mode)].attack)
            assert got == {"square"} | {f"square+oars[{d}]" for d in cfg["detectors"]}, (pol, mode, got)
    assert o.asr.between(0, 1).all() and (o.n == cfg["n_images"]).all() and (o.profile == "quick").all()
    assert (o.mean_queries <= cfg["budget"]).all()
    attempts = _csv(quick_run["reports"] / "oars_attempts.csv")
    assert (attempts.linf <= cfg["eps"]).all() and (attempts.queries <= cfg["budget"]).all()
    meta = json.loads((quick_run["reports"] / "oars.json").read_text())
    assert meta["profile"] == "quick" and meta["settings"]["oars"]["budget"] == cfg["budget"]


def test_report_html(quick_run):
    html = (quick_run["reports"] / "report.html").read_text()
    for heading in ("Table 1: JSMA", "Table 2: One Pixel Attack, targeted", "Table 3: One Pixel Attack, untargeted",
                    "Benign cost", "Timing side channel", "Models", "Adaptive attacks", "Cost of hardening",
                    "Side channels: distinguisher", "OARS-style adaptive attack"):
        assert heading in html, heading
    assert html.count("paper_asr_without_defense") >= 3 and html.count("paper_asr_with_defense") >= 3
    assert html.count("data:image/png;base64,") >= 8
    assert "not found" not in html  # every input was there
    assert "quick" in html and "misclassifies are excluded" in html
