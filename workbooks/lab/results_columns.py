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
from .results import COLUMNS, TABLES, cells_of, commit, model_rows, section_cfgs, summary_rows

IMAGE_SEED_RULE = ("lab.tables.stable(experiment, model, seed) picks the images (and targets), the same rule and "
                   "seeds as the other columns; asked of the models in models_dir")
KEY, GROUP = ("model", "setting", "defense"), ("model", "setting")
SIDECAR_RULE = {d: f"a fresh --mode {d} sidecar per cell (lab.tables.cell_sidecar, flags of "
                   f"lab.profiles.SIDECARS['{d}']), one attacker session per cell" for d in tables.FRESH_PER_CELL}


def add_columns(profile: str, defenses: Sequence[str], report_dir, models_dir, out_dir) -> dict:
    """Merge the finished cells of ``defenses`` into ``out_dir``'s tables; returns the provenance."""
    import pandas as pd

    out_dir, report_dir = Path(out_dir), Path(report_dir)
    prov_path = out_dir / "provenance.json"
    if not prov_path.exists():
        raise FileNotFoundError(f"{prov_path}: no kept results to add a column to (lab.results.export first)")
    prov = json.loads(prov_path.read_text())
    added = prov.setdefault("columns_added", {})
    for d in defenses:
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
            if rows:
                merge(out_dir / f"{name}.csv", pd.DataFrame(summary_rows(e, name, rows), columns=COLUMNS)
                      .to_csv(index=False), KEY, GROUP)
        models = model_rows(models_dir, sorted({r.model for rows in found.values() for r in rows}))
        runs = report_dir / "runs.jsonl"
        added[d] = {"commit": commit(), "created_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                    "sidecar": SIDECAR_RULE.get(d, f"the lab's --mode {d} sidecar, one session per cell"),
                    "image_seed_rule": IMAGE_SEED_RULE,
                    "settings": {e: section_cfgs(profile)[e] for e in TABLES},
                    "models_dir": Path(models_dir).name,
                    "model_accuracy": {m["name"]: m["test_accuracy"] for m in models},
                    "attack_seconds": seconds,
                    "sittings": [json.loads(x) for x in runs.read_text().splitlines() if x.strip()]
                    if runs.exists() else [],
                    "cells_done": sorted(done), "cells_pending": sorted(pending), "complete": not pending}
    prov.update(_cell_lists(profile, out_dir, prov))
    tmp = prov_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(prov, indent=2, default=str) + "\n")
    tmp.replace(prov_path)
    return prov


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
