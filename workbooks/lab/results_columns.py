"""A defense column added to the kept Tables 1-3, beside the rows measured before it.

    python -m lab.results --profile cpu --defenses hardened [--report-dir reports/cpu] [--models-dir models-cpu]

(also run by ``python -m lab.run_workbooks ... --defenses hardened --results results/<profile>``).
``add_columns`` reads the finished cells of those defenses (the same cell folders as the
profile's full run, ``lab.results.cells_of``), and merges one row per cell into
``table{1,2,3}.csv`` (``lab.csv_merge``: the other rows stay byte for byte; a rerun
replaces its own rows). ``de_check.csv`` and ``models.csv`` are left alone: they describe
the run behind the other columns. ``provenance.json`` gets ``columns_added[<defense>]``:
the commit, sittings, models and their accuracy, settings, the per-cell sidecar rule and
the cells done and pending of that column; its ``cells_done`` / ``cells_pending`` become
the tables' rows against the plan of every column. Run it whenever cells have finished
(also during a sitting): the tables then hold every finished cell.

    python -m lab.results --profile cpu --models resnet [--defenses off paper hardened]

``models``: only those models' rows are merged, every column unless ``defenses`` says
otherwise. With every column, the models were measured again (e.g. re-exported after the
export was lost and an exact replay was impossible): their rows in every column, their
``models.csv`` rows and their ``de_check.csv`` rows are replaced, so each row of a table
describes the model in ``models.csv``.
``provenance.json`` then records ``models_remeasured[<model>]``: the accuracy before and now,
the commit, sittings and the cells merged.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from . import tables
from .cells import load
from .csv_merge import merge
from .profiles import config
from .results import (CHECK_COLUMNS, COLUMNS, MODEL_COLUMNS, TABLES, cells_of, check_rows, commit, model_rows,
                      section_cfgs, summary_rows)

IMAGE_SEED_RULE = ("lab.tables.stable(experiment, model, seed) picks the images (and targets), the same rule and "
                   "seeds as the other columns; asked of the models in models_dir")
KEY, GROUP = ("model", "setting", "defense"), ("model", "setting")
SIDECAR_RULE = {d: f"a fresh --mode {d} sidecar per cell (lab.tables.cell_sidecar, flags of "
                   f"lab.profiles.SIDECARS['{d}']), one attacker session per cell" for d in tables.FRESH_PER_CELL}


def add_columns(profile: str, defenses: Sequence[str] | None, report_dir, models_dir, out_dir,
                models: Sequence[str] | None = None) -> dict:
    """Merge the finished cells of ``defenses`` (every column when ``None``) of ``models``
    (every model when ``None``) into ``out_dir``'s tables; returns the provenance."""
    import pandas as pd

    out_dir, report_dir = Path(out_dir), Path(report_dir)
    prov_path = out_dir / "provenance.json"
    if not prov_path.exists():
        raise FileNotFoundError(f"{prov_path}: no kept results to add a column to (lab.results.export first)")
    if not defenses and not models:
        raise ValueError("name the columns (defenses) or the models to merge")
    prov = json.loads(prov_path.read_text())
    added = prov.setdefault("columns_added", {})
    runs = report_dir / "runs.jsonl"
    sittings = [json.loads(x) for x in runs.read_text().splitlines() if x.strip()] if runs.exists() else []
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    merged: list[str] = []
    first_run = {c.split("__")[-1] for c in prov.get("cells_done", [])} - set(added)
    for d in defenses or tables.DEFENSES:
        done, pending, found, seconds = [], [], {}, {}
        for e, name in TABLES.items():
            cfg = section_cfgs(profile)[e]
            planned, folder = cells_of(e, cfg, report_dir)
            cells = [c for c in planned if c.defense == d]
            if not cells:
                raise ValueError(f"{name}: {d!r} is not one of its columns {sorted({c.defense for c in planned})}")
            rows = []
            for c in cells:
                path = folder / f"{c.key}.json"
                (done if path.exists() else pending).append(c.key)
                rows += load(path) if path.exists() else []
            found[name], seconds[name] = rows, round(sum(r.seconds for r in rows), 1)
            take = [r for r in rows if models is None or r.model in models]
            merged += sorted({f"{e}/{r.model}/{r.setting}__{r.defense}" for r in take})
            if take:
                merge(out_dir / f"{name}.csv", pd.DataFrame(summary_rows(e, name, take), columns=COLUMNS)
                      .to_csv(index=False), KEY, GROUP)
        if d in first_run:
            continue  # a column of the first run: models_remeasured says what changed in it
        col_models = model_rows(models_dir, sorted({r.model for rows in found.values() for r in rows}))
        added[d] = {"commit": commit(), "created_utc": now,
                    "sidecar": SIDECAR_RULE.get(d, f"the lab's --mode {d} sidecar, one session per cell"),
                    "image_seed_rule": IMAGE_SEED_RULE,
                    "settings": {e: section_cfgs(profile)[e] for e in TABLES},
                    "models_dir": Path(models_dir).name,
                    "model_accuracy": {m["name"]: m["test_accuracy"] for m in col_models},
                    "attack_seconds": seconds, "sittings": sittings,
                    "cells_done": sorted(done), "cells_pending": sorted(pending), "complete": not pending}
    if models is not None and set(defenses or tables.DEFENSES) == set(tables.DEFENSES):
        _remeasured(profile, list(models), report_dir, models_dir, out_dir, prov, sittings, now, merged)
    prov.update(_cell_lists(profile, out_dir, prov))
    tmp = prov_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(prov, indent=2, default=str) + "\n")
    tmp.replace(prov_path)
    return prov


def _remeasured(profile: str, models: list[str], report_dir: Path, models_dir, out_dir: Path, prov: dict,
                sittings: list, now: str, merged: list[str]) -> None:
    """``models.csv`` and ``de_check.csv`` rows of re-measured ``models``, and the provenance of it."""
    import pandas as pd

    exported = model_rows(models_dir, models)
    if {m["name"] for m in exported} != set(models):
        raise FileNotFoundError(f"{models_dir}: no export of {sorted(set(models) - {m['name'] for m in exported})}")
    new = pd.DataFrame(exported, columns=MODEL_COLUMNS)
    if (out_dir / "models.csv").exists():  # written as the kept rows are (a float column stays "20.0")
        kept = pd.read_csv(out_dir / "models.csv")
        new = new.astype({c: kept[c].dtype for c in MODEL_COLUMNS if c in kept and kept[c].dtype.kind == "f"})
    merge(out_dir / "models.csv", new.to_csv(index=False), ("name",), ("name",))
    def finished(key: str, cfg: dict, defense: str | None = None) -> list:
        planned, folder = cells_of(key, cfg, report_dir)
        return [r for c in planned if c.model in models and defense in (None, c.defense)
                and (folder / f"{c.key}.json").exists() for r in load(folder / f"{c.key}.json")]

    cfgs, found = section_cfgs(profile), {}
    for k in [k for k in cfgs if k.startswith("de_check/")]:
        e = k.split("/")[1]
        found[k], found[e] = finished(k, cfgs[k]), finished(e, cfgs[e], "off")
    check = check_rows(profile, found)
    if check:
        merge(out_dir / "de_check.csv", pd.DataFrame(check, columns=CHECK_COLUMNS).to_csv(index=False),
              ("de", "key", "model", "setting", "defense"), ("key", "model", "setting"))
    before = prov.get("model_accuracy", {})
    log = prov.setdefault("models_remeasured", {})
    for m in exported:
        log[m["name"]] = {"commit": commit(), "created_utc": now, "models_dir": Path(models_dir).name,
                          "test_accuracy_before": log.get(m["name"], {}).get("test_accuracy_before",
                                                                               before.get(m["name"])),
                          "test_accuracy": m["test_accuracy"],
                          "epochs": m["epochs"], "sittings": [x for x in sittings if _ran(x, m["name"])],
                          "cells_merged": [c for c in merged if c.split("/")[1] == m["name"]],
                          "de_check_rows": sum(r["model"] == m["name"] for r in check)}
        prov.setdefault("model_accuracy", {})[m["name"]] = m["test_accuracy"]


def _ran(sitting: dict, model: str) -> bool:
    """Whether a sitting (``runs.jsonl``) ran ``model``'s cells: no ``--models``, or it is named there."""
    argv = sitting.get("argv", [])
    if "--models" not in argv:
        return True
    named = argv[argv.index("--models") + 1:]
    return model in named[:next((i for i, a in enumerate(named) if a.startswith("--")), len(named))]


def _cell_lists(profile: str, out_dir: Path, prov: dict) -> dict:
    """``cells_done`` = the cells with a row in the tables (and the DE check's, as recorded);
    ``cells_pending`` = the rest of every column's plan."""
    import pandas as pd

    have = set()
    for name in TABLES.values():
        if (out_dir / f"{name}.csv").exists():
            have |= {f"{r['experiment']}/{r['model']}/{r['setting']}__{r['defense']}"
                     for r in pd.read_csv(out_dir / f"{name}.csv").to_dict("records")}
    checks = {c for c in prov.get("cells_done", []) + prov.get("cells_pending", []) if c.startswith("de_check/")}
    planned = {c.key for e in TABLES for c in cells_of(e, config(e, profile), out_dir)[0]}
    done = sorted((have & planned) | {c for c in prov.get("cells_done", []) if c in checks})
    pending = sorted((planned - have) | (checks - set(done)))
    return {"cells_done": done, "cells_pending": pending, "complete": not pending}
