"""Kept results: a profile's Tables 1-3 from its finished cells, into ``results/<profile>/``.

    python -m lab.results --profile cpu [--report-dir reports/cpu] [--models-dir models-cpu] [--defenses hardened]
                          [--models resnet]

With ``--defenses`` / ``--models``: only those columns' / models' finished cells, merged into
the kept tables beside the rows already there (``lab.results_columns``); without: everything
below, from the cells.

Writes, from whatever cells have finished (a partial run gives partial tables):

* ``table1.csv``, ``table2.csv``, ``table3.csv``: one row per (model, setting, defense)
  cell: ``n``, ``successes``, ``rate`` with its Wilson 95% interval, the paper's rate, the
  claimed/fooled rates, queries, and where the successes came from (``lab.tables.QueryLog``:
  ``from_first_forward``, ``from_later_forward``, ``from_final_check``; ``first_forwarded``:
  images whose first query reached the model (the counters); ``first_meets_goal``: images
  whose first query's answer already met the goal);
* ``de_check.csv``: the paper's DE (``de_check`` section) beside the cut DE on the same images;
* ``models.csv``: the exported models' accuracy and size beside the paper's zoo;
* ``provenance.json``: commit, profile, settings, seeds, data, model accuracies, seconds per
  stage, and the cells done and pending.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from . import paper_tables, tables
from .cells import load, summarize, wilson
from .paths import project_path, project_root
from .profiles import PROFILES, config

TABLES = {"jsma": "table1", "onepixel_targeted": "table2", "onepixel_untargeted": "table3"}
COLUMNS = ("table", "experiment", "model", "setting", "param", "value", "defense", "n", "successes", "rate",
           "wilson_lo", "wilson_hi", "paper_rate", "claimed_rate", "fooled_rate", "mean_queries",
           "forwarded_fraction", "first_forwarded", "first_meets_goal", "from_first_forward", "from_later_forward",
           "from_final_check")
CHECK_COLUMNS = ("de", "key", *COLUMNS)
MODEL_COLUMNS = ("name", "version", "width", "depth", "params", "epochs", "budget_s", "augment", "train_seconds",
                 "test_accuracy", "reference_accuracy", "reference_params", "note")


def section_cfgs(profile: str) -> dict[str, dict]:
    """The cfg each table's cells were run with (``de_check/<experiment>``: the check's)."""
    out = {e: config(e, profile) for e in TABLES}
    if "de_check" in PROFILES[profile]:
        check = config("de_check", profile)
        out.update({f"de_check/{e}": {**out[e], **check, "profile": profile} for e in
                    ("onepixel_targeted", "onepixel_untargeted")})
    return out


def cells_of(key: str, cfg: dict, report_dir) -> tuple[list, Path]:
    e = key.split("/")[-1]
    values = cfg["thetas"] if e == "jsma" else cfg["pixels"]
    return tables.plan(e, cfg["models"], values, cfg.get("defenses", tables.DEFENSES)), \
        tables.cells_dir(report_dir, e, cfg)


def paper_rates(e: str) -> dict:
    param = tables.EXPERIMENTS[e]
    return {(r["model"], float(r[param]), d): r[f"asr_{'without' if d == 'off' else 'with'}_defense"]
            for r in paper_tables.rows(e) for d in ("off", "paper")}


def summary_rows(e: str, table: str, rows: list) -> list[dict]:
    """One dict per (model, setting, defense) of ``rows``, in ``COLUMNS``."""
    if not rows:
        return []
    s, paper = summarize(rows, by=("model", "setting", "defense"), unit="image_index"), paper_rates(e)
    out = []
    for rec in s.to_dict("records"):
        g = [r for r in rows if (r.model, r.setting, r.defense) == (rec["model"], rec["setting"], rec["defense"])]
        param, value = rec["setting"].split("=")
        src = [r.extra.get("success_source", "") for r in g if r.success]
        out.append({**{k: rec[k] for k in ("model", "setting", "defense", "n", "successes")},
                    "table": table, "experiment": e, "param": param, "value": float(value),
                    "rate": rec["asr"], "wilson_lo": rec["asr_lo"], "wilson_hi": rec["asr_hi"],
                    "paper_rate": paper.get((rec["model"], float(value), rec["defense"])),
                    "claimed_rate": rec["claimed_rate"], "fooled_rate": rec["fooled_rate"],
                    "mean_queries": rec["mean_queries"], "forwarded_fraction": rec["forwarded_fraction"],
                    "first_forwarded": sum(r.extra.get("first_forwarded", 0) > 0 for r in g),
                    "first_meets_goal": sum(bool(r.extra.get("first_meets_goal")) for r in g),
                    "from_first_forward": src.count("first_forward"), "from_later_forward": src.count("later_forward"),
                    "from_final_check": src.count("final_check")})
    return out


def check_rows(profile: str, found: dict) -> list[dict]:
    """``de_check.csv``'s rows: the paper's DE (the ``de_check/<experiment>`` cells of ``found``)
    and the cut DE of the table's ``off`` cells on exactly the check's images."""
    check = [{**r, "de": "paper 400x75", "key": k} for k in found if k.startswith("de_check/")
             for r in summary_rows(k.split("/")[1], TABLES[k.split("/")[1]], found[k])]
    for k in [k for k in found if k.startswith("de_check/")]:
        e = k.split("/")[1]
        cut = f"cut {section_cfgs(profile)[e].get('population')}x{section_cfgs(profile)[e]['max_iter']}"
        imgs = {(r.model, r.setting, r.image_index) for r in found[k]}
        same = [r for r in found.get(e, []) if r.defense == "off" and (r.model, r.setting, r.image_index) in imgs]
        check += [{**r, "de": cut, "key": e} for r in summary_rows(e, TABLES[e], same)]
    return check


def model_rows(models_dir, names) -> list[dict]:
    from .export import read_metadata, version_dirs

    out = []
    for m in names:
        versions = version_dirs(Path(models_dir) / m)
        if versions:
            meta = read_metadata(Path(models_dir) / m / str(versions[-1]))
            out.append({k: meta.get(k, versions[-1] if k == "version" else None) for k in MODEL_COLUMNS})
    return out


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=project_root()).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export(profile: str, report_dir, models_dir, out_dir) -> dict:
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, pending, stage_s, found, eta = [], [], {}, {}, {}
    for key, cfg in section_cfgs(profile).items():
        planned, folder = cells_of(key, cfg, report_dir)
        rows = []
        for c in planned:
            path = folder / f"{c.key}.json"
            (done if path.exists() else pending).append(f"{key.split('/')[0]}/{c.key}" if "/" in key else c.key)
            rows += load(path) if path.exists() else []
        found[key], stage_s[key] = rows, round(sum(r.seconds for r in rows), 1)
        n_done = sum((folder / f"{c.key}.json").exists() for c in planned)
        eta[key] = round(stage_s[key] / n_done * (len(planned) - n_done)) if n_done else None
    for e, name in TABLES.items():
        pd.DataFrame(summary_rows(e, name, found[e]), columns=COLUMNS).to_csv(out_dir / f"{name}.csv", index=False)
    pd.DataFrame(check_rows(profile, found), columns=CHECK_COLUMNS).to_csv(out_dir / "de_check.csv", index=False)
    models = model_rows(models_dir, config("train", profile)["models"])
    pd.DataFrame(models, columns=MODEL_COLUMNS).to_csv(out_dir / "models.csv", index=False)
    cfgs = section_cfgs(profile)
    run_json, runs = Path(report_dir) / "workbooks_run.json", Path(report_dir) / "runs.jsonl"
    prov = {"commit": commit(), "profile": profile, "created_utc": datetime.now(timezone.utc).replace(
                microsecond=0).isoformat(),
            "settings": cfgs, "seeds": {k: c.get("seed") for k, c in cfgs.items()},
            "image_seed_rule": "lab.tables.stable(experiment, model, seed) picks the images, the same for every "
                               "column",
            "data": _data(), "models_dir": Path(models_dir).name,
            "model_accuracy": {m["name"]: m["test_accuracy"] for m in models},
            "stage_seconds": {"train": round(sum(m["train_seconds"] or 0 for m in models), 1),
                              **{f"attack/{k}": v for k, v in stage_s.items()}},
            "workbooks_run": json.loads(run_json.read_text()) if run_json.exists() else None,
            "sittings": [json.loads(x) for x in runs.read_text().splitlines() if x.strip()] if runs.exists() else [],
            "eta_seconds": {"note": "attack seconds of the done cells of each table, per cell, times its pending "
                                    "cells (None: none done yet)", **eta},
            "implementation": implementation(found),
            "cells_done": sorted(done), "cells_pending": sorted(pending),
            "complete": not pending}
    (out_dir / "provenance.json").write_text(json.dumps(prov, indent=2, default=str) + "\n")
    return prov


def kept(profile: str, report_dir, models_dir, out_dir, defenses=None, models=None) -> dict:
    """The kept results from ``report_dir``'s cells: all of them (``export``), or with
    ``defenses`` / ``models`` only those columns / models' rows, merged into the tables
    already kept (``lab.results_columns.add_columns``)."""
    if defenses or models:
        from .results_columns import add_columns

        return add_columns(profile, defenses, report_dir, models_dir, out_dir, models)
    return export(profile, report_dir, models_dir, out_dir)


def implementation(found: dict) -> dict:
    """Per table, the attack classes its rows name and the library they come from."""
    from .estimators import art_version

    return {name: {"attacks": sorted({r.attack for r in found[e]}), "library": art_version()}
            for e, name in TABLES.items()}


def _data() -> dict:
    from .cifar10 import load_cifar10

    d = load_cifar10()
    return {"source": Path(str(d.source)).name, "train": int(len(d.x_train)), "test": int(len(d.x_test))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.results", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    ap.add_argument("--report-dir", default=None, help="default reports/<profile>")
    ap.add_argument("--models-dir", default=None, help="default models-<profile>")
    ap.add_argument("--out", default=None, help="default results/<profile>")
    ap.add_argument("--defenses", nargs="+", default=None, help="add only these columns to the kept tables")
    ap.add_argument("--models", nargs="+", default=None,
                    help="merge only these models' rows (every column unless --defenses), their models.csv and "
                         "de_check.csv rows: models measured again")
    a = ap.parse_args(argv)
    prov = kept(a.profile, project_path(a.report_dir or f"reports/{a.profile}"),
                project_path(a.models_dir or f"models-{a.profile}"), project_path(a.out or f"results/{a.profile}"),
                a.defenses, a.models)
    print(f"{len(prov['cells_done'])} cells done, {len(prov['cells_pending'])} pending")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["export", "kept", "section_cfgs", "summary_rows", "wilson"]
