"""Run the workbooks with papermill, in order, against one model server.

    python -m lab.run_workbooks --profile quick|cpu|full [--only 02 03] [--train missing|always|never]
                                [--defenses hardened]

(``make workbooks PROFILE=cpu``: models in ``models-cpu/``, cells in ``reports/cpu/``, the
kept tables in ``results/cpu/``; rerun the same command to resume.)

1. ``01_train_export`` trains and exports the profile's models that have no exported
   version (``--train always``: all of them; ``never``: none).
2. One ``python -m serving`` with those models (``lab.launcher.Lab``), stopped at the
   end, also on errors, Ctrl-C or SIGTERM. Each of 02-07 gets its address as the
   ``backend`` parameter and starts the sidecars it needs itself (fresh per notebook,
   fresh per cell in 06/07).
3. ``09_report`` renders ``<report-dir>/report.html``.

``--defenses hardened`` runs only those columns of Tables 1-3 (02, 03; the DE check in 03
only when ``off`` is among them) in the same cell folders, and ``--results`` then adds
them to the kept tables beside the rows already there (``lab.results.kept``).

Per-cell results go to ``<report-dir>/cells/`` (a rerun skips finished cells;
``--fresh`` deletes them first). Executed notebooks go to ``workbooks/out/``; timings
and status to ``<report-dir>/workbooks_run.json``. A failing notebook does not stop
the others; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from .paths import WORKBOOKS, project_path

KERNEL = "python3"
OUT_DIR = WORKBOOKS / "out"
TRAIN = "01_train_export.ipynb"
ATTACKS = ("02_jsma.ipynb", "03_onepixel.ipynb", "04_benign_cost.ipynb", "05_timing.ipynb", "06_adaptive.ipynb",
           "07_side_channels.ipynb")
REPORT = "09_report.ipynb"
ORDER = (TRAIN, *ATTACKS, REPORT)
TABLES = ("02_jsma.ipynb", "03_onepixel.ipynb")  # the notebooks with a ``defenses`` parameter


def run_notebook(path_in: str | Path, path_out: str | Path, parameters: dict | None = None, *,
                 progress: bool = True, log_output: bool = False, timeout: int | None = None):
    """Execute ``path_in`` with papermill (cwd: its folder, kernel ``python3``, registered
    once if missing) into ``path_out``; cell errors raise ``PapermillExecutionError``."""
    import subprocess

    import papermill as pm
    from jupyter_client.kernelspec import NoSuchKernel

    path_in, path_out = Path(path_in), Path(path_out)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    kw = dict(parameters=dict(parameters or {}), kernel_name=KERNEL, progress_bar=progress,
              cwd=str(path_in.parent), execution_timeout=timeout)
    if log_output:
        kw["stdout_file"] = sys.stdout
    try:
        return pm.execute_notebook(str(path_in), str(path_out), **kw)
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL], check=True,
                       stdout=subprocess.DEVNULL)
        return pm.execute_notebook(str(path_in), str(path_out), **kw)


def table_models(profile: str, notebook: str, models: list[str]) -> list[str]:
    """The profile's models of ``notebook``'s tables that are among ``models``, in the profile's order."""
    from .profiles import PROFILES

    section = {"02_jsma.ipynb": "jsma", "03_onepixel.ipynb": "onepixel_targeted"}[notebook]
    return [m for m in PROFILES[profile][section]["models"] if m in models]


def _exit_on_sigterm(signum, frame):  # so the Lab's context manager stops the server
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from .export import version_dirs
    from .profiles import PROFILES, models_needed

    ap = argparse.ArgumentParser(prog="python -m lab.run_workbooks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--report-dir", default="reports")
    ap.add_argument("--out-dir", default=None, help="executed notebooks (default workbooks/out)")
    ap.add_argument("--train", choices=("missing", "always", "never"), default="missing")
    ap.add_argument("--only", nargs="*", default=None, help="only these notebooks (prefixes like 02 03)")
    ap.add_argument("--fresh", action="store_true", help="delete finished cells first (no resume)")
    ap.add_argument("--quiet", action="store_true", help="no per-cell progress bars")
    ap.add_argument("--log-output", action="store_true", help="the notebooks' output (per-cell ETA lines) on stdout")
    ap.add_argument("--results", default=None, help="also write the kept results (lab.results) to this folder")
    ap.add_argument("--defenses", nargs="+", default=None, metavar="DEFENSE",
                    help="only these columns of Tables 1-3 (02, 03); --results adds them to the kept tables")
    ap.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                    help="only these models in Tables 1-3 (02, 03) and the model server, e.g. the ones a "
                         "replay rebuilt exactly (python -m lab.train --replay)")
    args = ap.parse_args(argv)
    if args.defenses:
        from .tables import DEFENSES

        if set(args.defenses) - set(DEFENSES):
            ap.error(f"--defenses: choose from {list(DEFENSES)}")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    models_dir, report_dir = project_path(args.models_dir).resolve(), project_path(args.report_dir).resolve()
    out_dir = Path(args.out_dir).resolve() if args.out_dir else OUT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        shutil.rmtree(report_dir / "cells", ignore_errors=True)
    selected = [n for n in ORDER if not args.only or any(n.startswith(p) for p in args.only)]
    with open(report_dir / "runs.jsonl", "a") as f:  # one line per sitting: which code ran which cells
        from .results import commit

        f.write(json.dumps({"commit": commit(), "started_utc": datetime.now(timezone.utc).replace(
            microsecond=0).isoformat(), "argv": sys.argv[1:] if argv is None else argv}) + "\n")
    needed, status, t_all = models_needed(args.profile), {}, time.perf_counter()
    if args.models:
        needed = [m for m in needed if m in args.models]
    common = {"profile": args.profile, "report_dir": str(report_dir), "progress": not args.quiet}

    def execute(name: str, params: dict) -> None:
        t0 = time.perf_counter()
        print(f"== {name} ({args.profile})", flush=True)
        try:
            run_notebook(WORKBOOKS / name, out_dir / name, {**common, **params}, progress=not args.quiet,
                         log_output=args.log_output)
            status[name] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - keep going, report at the end
            status[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            traceback.print_exc()
        status[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {'ok' if status[name]['ok'] else 'FAILED'} in {status[name]['seconds']} s", flush=True)

    if TRAIN in selected and args.train != "never":
        todo = [m for m in needed if args.train == "always" or not version_dirs(models_dir / m)]
        if todo:
            execute(TRAIN, {"models": todo, "models_dir": str(models_dir), "progress": "epoch"})
        kept = [m for m in needed if m not in todo and version_dirs(models_dir / m)]
        if kept:  # already exported: into models.csv from their export metadata
            from .export import read_metadata
            from .train import write_report

            print(f"using exported models {kept} (--train always retrains)", flush=True)
            write_report([{"name": m, **read_metadata(models_dir / m / str(version_dirs(models_dir / m)[-1]))}
                          for m in kept], report_dir)
    attacks = [n for n in ATTACKS if n in selected]
    missing = [m for m in needed if not version_dirs(models_dir / m)]
    if attacks and missing:
        for n in attacks:
            status[n] = {"ok": False, "seconds": 0, "error": f"models not exported: {missing}"}
        print(f"models {missing} not under {models_dir}; skipping {attacks}", file=sys.stderr)
    elif attacks:
        from .launcher import Lab

        with Lab(models_dir, needed, log_dir=out_dir / "logs") as lab:
            print(f"serving {needed} at {lab.backend}", flush=True)
            for n in attacks:
                only = {"defenses": args.defenses} if args.defenses and n in TABLES else {}
                if args.models and n in TABLES:
                    chosen = table_models(args.profile, n, args.models)
                    if not chosen:
                        print(f"== {n}: none of {args.models} is in its tables; skipped", flush=True)
                        continue
                    only["models"] = chosen
                execute(n, {"models_dir": str(models_dir), "backend": lab.backend, **only})
    if args.results:  # before the report, which shows them
        from .results import kept

        prov = kept(args.profile, report_dir, models_dir, project_path(args.results), args.defenses, args.models)
        print(f"results: {len(prov['cells_done'])} cells done, {len(prov['cells_pending'])} pending", flush=True)
    if REPORT in selected:
        execute(REPORT, {})
    summary = {"profile": args.profile, "models": needed, "notebooks": status,
               "seconds": round(time.perf_counter() - t_all, 1),
               "finished_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    (report_dir / "workbooks_run.json").write_text(json.dumps(summary, indent=2))
    failed = [n for n, s in status.items() if not s["ok"]]
    print(f"workbooks ({args.profile}) done in {summary['seconds']} s; "
          + (f"FAILED: {failed}" if failed else "all ok") + f"; report: {report_dir / 'report.html'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
