"""Issue 29: a ``hardened`` column in Tables 1-3, run on its own and added to the kept tables.

* ``lab.tables.run_table(..., defenses=["hardened"])`` runs only that column, each cell
  through a fresh hardened sidecar (``lab.tables.cell_sidecar``), so no cell spends the
  near-duplicate budget of the next cell's same images (real servers, tiny models);
* ``lab.results_columns.add_columns`` merges its cells into the committed CSVs with the
  other rows byte for byte, and the provenance says what ran;
* the renderings show off / paper / hardened beside the paper's, ``pending`` where a cell
  has no row.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from lab import report, results, results_docs, tables
from lab.cells import Cell, Row, wilson
from lab.launcher import Lab
from lab.profiles import SIDECARS, config

from conftest import REPO

KEPT = REPO / "results" / "cpu"
CFG = {"models": ["tiny"], "pixels": [1, 3], "n_images": 2, "max_iter": 1, "population": 20, "seed": 2,
       "profile": "test"}


# -- the per-cell fresh attacker (real serving, in-process sidecars) ---------------------

@pytest.fixture
def lab(serving):
    with Lab(backend=serving.target, sidecars=[SIDECARS["off"], SIDECARS["paper"]], inprocess=True) as lab:
        yield lab


def _run(lab, cifar, model_base, tmp_path, **kw):
    return tables.run_table(lab, "onepixel_untargeted", CFG, cifar.x_test, cifar.y_test, model_base, tmp_path,
                            progress=False, **kw)


def test_hardened_cells_run_alone_each_through_a_fresh_sidecar(lab, cifar, model_base, tmp_path, monkeypatch):
    started = []
    add = lab.add
    monkeypatch.setattr(lab, "add", lambda spec, **kw: started.append(add(spec, **kw)) or started[-1])
    rows = _run(lab, cifar, model_base, tmp_path, defenses=["hardened"])
    assert {r.defense for r in rows} == {"hardened"} and {r.setting for r in rows} == {"pixels=1", "pixels=3"}
    assert len(started) == 2 and started[0].address != started[1].address
    assert all(s.spec.mode == "hardened" and s._server is None for s in started)  # stopped after its cell
    # the second cell attacks the same images: its first queries still reach the model
    assert all(r.extra["first_forwarded"] >= 1 for r in rows), [(r.setting, r.extra) for r in rows]
    assert len({r.session for r in rows}) == 2
    # the images and seeds are those of the other columns: an off cell run later gets the same
    off = _run(lab, cifar, model_base, tmp_path, defenses=["off"])
    assert len(off) == len(rows) * 2  # every finished cell of the plan comes back, hardened ones unrun
    key = lambda r: (r.setting, r.image_index, r.seed)  # noqa: E731
    assert sorted(map(key, [r for r in off if r.defense == "off"])) == sorted(map(key, rows))


def test_one_shared_hardened_sidecar_would_spend_the_next_cells_budget(lab, cifar, model_base, tmp_path,
                                                                         monkeypatch):
    """The control: what ``cell_sidecar`` prevents (the check above can fail)."""
    monkeypatch.setattr(tables, "FRESH_PER_CELL", ())
    lab.sidecars["hardened"] = lab.add(SIDECARS["hardened"])
    rows = _run(lab, cifar, model_base, tmp_path, defenses=["hardened"])
    later = [r for r in rows if r.setting == "pixels=3"]
    assert later and all(r.extra["first_forwarded"] == 0 for r in later)


def test_unknown_column_is_refused(lab, cifar, model_base, tmp_path):
    with pytest.raises(ValueError, match="no column"):
        _run(lab, cifar, model_base, tmp_path, defenses=["paper_topk"])


# -- merging into the kept tables ------------------------------------------------------

def _cell_file(report_dir, e: str, model: str, setting: str, k: int, n: int, defense: str = "hardened",
               key: str | None = None) -> None:
    cfg = results.section_cfgs("cpu")[key or e]
    cell = Cell(e, model, setting, defense)
    rows = [Row(e, "A", model, setting, defense, i, 0, goal="untargeted", seed=tables.stable(e, model, setting, i),
                queries=10, forwarded=2, extra={"first_forwarded": 1, "first_meets_goal": False,
                                                "success_source": "later_forward" if i < k else ""})
            .judge(1 if i < k else 0, 1 if i < k else 0) for i in range(n)]
    path = tables.cells_dir(report_dir, e, cfg) / f"{cell.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cell": asdict(cell), "rows": [asdict(r) for r in rows]}))


def test_add_columns_keeps_every_committed_row_byte_for_byte(tmp_path):
    out, rep = tmp_path / "out", tmp_path / "reports"
    shutil.copytree(KEPT, out)
    for n in ("table1", "table2", "table3"):  # the kept tables as they were before any hardened cell ran
        kept_rows = [x for x in (out / f"{n}.csv").read_text().splitlines(keepends=True) if ",hardened," not in x]
        (out / f"{n}.csv").write_text("".join(kept_rows))
    before = {n: (out / f"{n}.csv").read_text().splitlines() for n in ("table1", "table2", "table3")}
    other = {n: (out / n).read_bytes() for n in ("de_check.csv", "models.csv")}
    _cell_file(rep, "jsma", "lenet", "theta=0.2", 7, 100)
    _cell_file(rep, "onepixel_targeted", "resnet", "pixels=5", 0, 100)
    prov = results.kept("cpu", rep, tmp_path / "no-models", out, ["hardened"])
    t1 = (out / "table1.csv").read_text().splitlines()
    assert [x for x in t1 if ",hardened," not in x] == before["table1"]  # same lines, same order
    new = [i for i, x in enumerate(t1) if ",hardened," in x]
    assert len(new) == 1 and t1[new[0] - 1].startswith("table1,jsma,lenet,theta=0.2,") and ",paper," in t1[new[0] - 1]
    r = pd.read_csv(out / "table1.csv").query("defense == 'hardened'").iloc[0]
    assert (r.n, r.successes, r.rate) == (100, 7, 0.07)
    assert (r.wilson_lo, r.wilson_hi) == pytest.approx(wilson(7, 100))
    assert r.from_later_forward == 7 and np.isnan(r.paper_rate)  # the paper has no hardened mode
    assert [x for x in (out / "table2.csv").read_text().splitlines() if ",hardened," not in x] == before["table2"]
    assert (out / "table3.csv").read_text().splitlines() == before["table3"]
    assert all((out / n).read_bytes() == b for n, b in other.items())
    col = prov["columns_added"]["hardened"]
    assert col["cells_done"] == ["jsma/lenet/theta=0.2__hardened", "onepixel_targeted/resnet/pixels=5__hardened"]
    assert len(col["cells_pending"]) == 12 + 18 + 18 - 2 and not col["complete"] and "fresh" in col["sidecar"]
    assert set(col["cells_done"]) <= set(prov["cells_done"]) and not set(col["cells_pending"]) & set(prov["cells_done"])
    # a rerun with the cell redone replaces its row in place, nothing else
    _cell_file(rep, "jsma", "lenet", "theta=0.2", 9, 100)
    results.kept("cpu", rep, tmp_path / "no-models", out, ["hardened"])
    again = (out / "table1.csv").read_text().splitlines()
    assert len(again) == len(t1) and again[:new[0]] == t1[:new[0]] and ",9,0.09," in again[new[0]]


def _export(models_dir, name: str, accuracy: float) -> None:
    d = models_dir / name / "1"
    (d / "assets.extra").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"")
    (d / "assets.extra" / "hashguard.json").write_text(json.dumps(
        {"name": name, "version": 1, "width": 1.0, "depth": 20, "params": 274042, "epochs": 27, "budget_s": 540.0,
         "augment": True, "train_seconds": 935.4, "test_accuracy": accuracy, "reference_accuracy": 0.923,
         "reference_params": 470000, "note": "rebuilt"}))


def test_a_model_measured_again_replaces_its_rows_in_every_column_and_nothing_else(tmp_path):
    out, rep, models = tmp_path / "out", tmp_path / "reports", tmp_path / "models"
    shutil.copytree(KEPT, out)
    _export(models, "resnet", 0.5123)
    kept = json.loads((KEPT / "provenance.json").read_text())  # the first run's accuracy, also after a re-merge
    was = kept.get("models_remeasured", {}).get("resnet", {}).get("test_accuracy_before",
                                                                  kept["model_accuracy"]["resnet"])
    before = {n: (out / f"{n}.csv").read_text().splitlines() for n in ("table1", "table2", "table3", "models",
                                                                         "de_check")}
    for d, k in (("off", 100), ("paper", 40), ("hardened", 2)):
        _cell_file(rep, "jsma", "resnet", "theta=0.1", k, 100, defense=d)
        _cell_file(rep, "onepixel_targeted", "resnet", "pixels=3", k // 2, 100, defense=d)
    _cell_file(rep, "onepixel_targeted", "resnet", "pixels=3", 3, 20, defense="off", key="de_check/onepixel_targeted")
    _cell_file(rep, "jsma", "cnn", "theta=0.1", 50, 100, defense="off")  # another model's cell: not merged
    prov = results.kept("cpu", rep, models, out, None, ["resnet"])
    t1 = (out / "table1.csv").read_text().splitlines()
    mine = lambda lines: [x for x in lines if x.startswith(("table1,jsma,resnet,theta=0.1,",  # noqa: E731
                                                            "table2,onepixel_targeted,resnet,pixels=3,"))]
    assert [x for x in t1 if x not in mine(t1)] == [x for x in before["table1"] if x not in mine(before["table1"])]
    got = pd.read_csv(out / "table1.csv").query("model == 'resnet' and setting == 'theta=0.1'")
    assert list(got.defense) == ["off", "paper", "hardened"] and list(got.successes) == [100, 40, 2]
    assert pd.read_csv(out / "table1.csv").query("model == 'cnn' and setting == 'theta=0.1' and defense == 'off'"
                                                 ).successes.item() != 50
    t2 = pd.read_csv(out / "table2.csv").query("model == 'resnet' and setting == 'pixels=3'")
    assert list(t2.successes) == [50, 20, 1]
    assert (out / "table3.csv").read_text().splitlines() == before["table3"]
    m = pd.read_csv(out / "models.csv")
    assert m.query("name == 'resnet'").test_accuracy.item() == 0.5123 and len(m) == len(before["models"]) - 1
    assert [x for x in (out / "models.csv").read_text().splitlines() if not x.startswith("resnet,")] == \
        [x for x in before["models"] if not x.startswith("resnet,")]
    check = pd.read_csv(out / "de_check.csv").query("model == 'resnet' and key.str.contains('targeted')"
                                                    " and not key.str.contains('untargeted')")
    assert sorted(check.successes) == [3, 20]  # the paper's DE on its 20 images; the cut DE's off rows on them
    assert [x for x in (out / "de_check.csv").read_text().splitlines() if ",resnet," not in x] == \
        [x for x in before["de_check"] if ",resnet," not in x]
    log = prov["models_remeasured"]["resnet"]
    assert (log["test_accuracy_before"], log["test_accuracy"]) == (was, 0.5123)
    assert prov["model_accuracy"]["resnet"] == 0.5123 and "jsma/resnet/theta=0.1__paper" in log["cells_merged"]
    assert set(prov["columns_added"]) == {"hardened"}  # off and paper are the first run's columns
    said = "\n".join(results_docs.remeasured_md(prov))
    assert "`resnet`" in said and f"resnet {was:.4f} -> 0.5123" in said and len(log["cells_merged"]) == 6
    # the AdvBox table says whether it attacked these very models
    assert results_docs.advbox_models({"model_accuracy": {"resnet": 0.5123}}, out).startswith(
        "Models: the exported models behind")
    assert "not the exported models" in results_docs.advbox_models({"model_accuracy": {"resnet": 0.526}}, out)
    # a column added for some models only is not a re-measurement
    prov = results.kept("cpu", rep, models, out, ["hardened"], ["cnn"])
    assert "cnn" not in prov["models_remeasured"]


def test_kept_provenance_plans_every_column():
    """The committed provenance lists each column's cells as done or pending (hardened included)."""
    prov = json.loads((KEPT / "provenance.json").read_text())
    planned = {c.key for e in results.TABLES for c in results.cells_of(e, config(e, "cpu"), REPO)[0]}
    assert {c.split("__")[1] for c in planned} == set(tables.DEFENSES)
    hardened = {c for c in planned if c.endswith("__hardened")}
    col = prov["columns_added"]["hardened"]
    assert set(col["cells_done"]) | set(col["cells_pending"]) == hardened
    assert hardened <= set(prov["cells_done"]) | set(prov["cells_pending"])


# -- rendering -------------------------------------------------------------------------

def test_docs_show_three_columns_and_pending(tmp_path):
    df = pd.read_csv(KEPT / "table1.csv").query("defense != 'hardened'")
    hard = df[(df.model == "cnn") & (df.setting == "theta=0.1") & (df.defense == "paper")].assign(
        defense="hardened", n=100, successes=3, rate=0.03, wilson_lo=wilson(3, 100)[0], wilson_hi=wilson(3, 100)[1])
    lines = results_docs.table_md(pd.concat([df, hard]), "table1", {})
    head = next(x for x in lines if x.startswith("| model"))
    assert head.count("ours,") == 3 and "hardened" in head
    row = next(x for x in lines if x.startswith("| cnn | 0.1 |"))
    assert row.endswith(f"| 0.03 [{wilson(3, 100)[0]:.2f}, {wilson(3, 100)[1]:.2f}] (n=100) |")
    assert all(x.endswith("| pending |") for x in lines if x.startswith("| ") and "| 0.1 |" not in x
               and not x.startswith("| model"))


def test_report_table_says_pending_for_a_column_not_run():
    rows = [Row("onepixel_targeted", "A", "lenet", f"pixels={p}", d, i, 0, goal="target", target=1).judge(1, 1)
            for p in (1, 3) for d in ("off", "paper") for i in range(3)]
    rows += [Row("onepixel_targeted", "A", "lenet", "pixels=1", "hardened", i, 0, goal="target", target=1)
             .judge(2, 2) for i in range(3)]
    t = tables.table(rows, "onepixel_targeted")
    assert list(t.asr_hardened.isna()) == [False, True] and t.n_hardened.iloc[0] == 3
    shown = report.comparison("onepixel_targeted", t)
    assert list(shown.asr_hardened) == ["0.000", "pending"] and list(shown.asr_with_defense) == ["1.000", "1.000"]
    assert "paper_asr_with_defense" in shown


def test_run_workbooks_passes_defenses_only_to_the_table_notebooks(monkeypatch, tmp_path):
    from lab import run_workbooks

    with pytest.raises(SystemExit):
        run_workbooks.main(["--defenses", "paper_topk", "--only", "09"])
    seen = {}
    monkeypatch.setattr(run_workbooks, "run_notebook", lambda i, o, p, **kw: seen.update({i.name: p}))
    monkeypatch.setattr("lab.launcher.Lab.start", lambda self: self)
    monkeypatch.setattr("lab.launcher.Lab.backend", "127.0.0.1:1")
    monkeypatch.setattr("lab.profiles.models_needed", lambda p: [])
    assert run_workbooks.main(["--only", "02", "03", "04", "--defenses", "hardened", "--report-dir",
                               str(tmp_path), "--out-dir", str(tmp_path / "out"), "--quiet"]) == 0
    assert seen["02_jsma.ipynb"]["defenses"] == ["hardened"] and seen["03_onepixel.ipynb"]["defenses"] == ["hardened"]
    assert "defenses" not in seen["04_benign_cost.ipynb"]


def test_models_restricts_each_table_notebook_to_its_own_models():
    from lab.run_workbooks import table_models

    assert table_models("cpu", "02_jsma.ipynb", ["cnn", "lenet", "pure_cnn"]) == ["cnn", "lenet"]
    assert table_models("cpu", "03_onepixel.ipynb", ["cnn", "lenet", "pure_cnn"]) == ["lenet", "pure_cnn"]
    assert table_models("cpu", "03_onepixel.ipynb", ["cnn"]) == []


def test_a_sitting_on_some_models_or_columns_shares_the_cells_folder():
    from lab import tables
    from lab.profiles import config

    full = tables.cells_dir("r", "jsma", config("jsma", "cpu"))
    assert tables.cells_dir("r", "jsma", config("jsma", "cpu", models=["cnn"], defenses=["hardened"])) == full
    assert tables.cells_dir("r", "jsma", config("jsma", "cpu", n_images=7)) != full  # a real setting does not


def test_a_sitting_keeps_only_the_sidecars_its_columns_share():
    assert tables.shared_sidecars(None) == ("off", "paper")
    assert tables.shared_sidecars(["hardened"]) == ("off",)  # no paper sidecar for a hardened-only sitting
    assert tables.shared_sidecars(["paper", "hardened"]) == ("off", "paper")


def test_hardened_summary_counts_the_committed_rows():
    t = results_docs.load("cpu")
    lines = results_docs.hardened_md(t)
    for name in ("table1", "table2", "table3"):
        df = t[name]
        h, p = df[df.defense == "hardened"], df[df.defense == "paper"]
        row = next(x for x in lines if x.startswith(f"| {name} |"))
        assert f"| {len(h)} | {int(h.n.sum())} | {int(h.successes.sum())} ({int(p.successes.sum())}) |" in row
    no_hardened = {k: (v[v.defense != "hardened"] if k.startswith("table") else v) for k, v in t.items()}
    assert results_docs.hardened_md(no_hardened) == []
