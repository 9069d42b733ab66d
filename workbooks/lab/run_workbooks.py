"""Run every workbook with papermill, in order, against one serving + sidecars stack.

    python -m lab.run_workbooks --profile quick|full [--models-dir models] [--report-dir reports]

1. ``01_train_export`` trains and exports the models the profile needs (by default
   only those without an exported version; ``--train always`` retrains them all,
   ``--train never`` skips training); models already there are added to
   ``models.csv`` from their export metadata.
2. A ``lab.stack.Stack`` starts ``python -m serving`` with those models and the
   sidecars of ``lab.harness.SIDECARS`` (defended, undefended, padded) on free
   loopback ports; it is stopped at the end, also on errors, Ctrl-C or SIGTERM.
3. ``02_jsma``, ``03_onepixel``, ``04_benign_cost``, ``05_timing``, ``06_adaptive``
   and ``07_side_channels`` run with the stack's endpoints (06/07 start fresh
   in-process sidecars on its backend per experiment cell); ``09_report`` renders
   ``<report-dir>/report.html``.

Executed notebooks go to ``workbooks/out/`` (or ``--out-dir``); the run's
timings and status to ``<report-dir>/workbooks_run.json``. A failing notebook
does not stop the others (the report says what is missing); the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import harness
from .notebooks import WORKBOOKS, project_path, run

TRAIN = "01_train_export.ipynb"
ATTACKS = ("02_jsma.ipynb", "03_onepixel.ipynb", "04_benign_cost.ipynb", "05_timing.ipynb",
           "06_adaptive.ipynb", "07_side_channels.ipynb")
REPORT = "09_report.ipynb"
ORDER = (TRAIN, *ATTACKS, REPORT)


def _sigterm_to_exit(signum, frame):  # so context managers (the Stack) clean up
    raise SystemExit(128 + signum)


def existing_models(models_dir: Path, models: list[str]) -> list[str]:
    from .export import version_dirs

    return [m for m in models if version_dirs(models_dir / m)]


def record_existing(models_dir: Path, models: list[str], report_dir: Path) -> None:
    """Add already-exported models to models.csv from their export metadata."""
    from .export import read_metadata
    from .train import write_report

    rows = []
    for m in models:
        meta = read_metadata(harness.latest_version_dir(models_dir, m))
        meta.setdefault("name", m)
        rows.append(meta)
    if rows:
        write_report(rows, report_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.run_workbooks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(harness.PROFILES), default="quick")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--report-dir", "--reports-dir", dest="report_dir", default="reports")
    ap.add_argument("--out-dir", default=None, help="executed notebooks (default workbooks/out)")
    ap.add_argument("--train", choices=("missing", "always", "never"), default="missing")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these notebooks (prefixes like 02 03); the stack starts when one needs it")
    ap.add_argument("--quiet", action="store_true", help="no per-cell progress bars")
    args = ap.parse_args(argv)

    if threading_is_main():
        signal.signal(signal.SIGTERM, _sigterm_to_exit)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    models_dir = project_path(args.models_dir).resolve()
    report_dir = project_path(args.report_dir).resolve()
    out_dir = Path(args.out_dir).resolve() if args.out_dir else WORKBOOKS / "out"
    report_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = args.profile
    selected = [n for n in ORDER if not args.only or any(n.startswith(p) for p in args.only)]
    needed = harness.models_needed(profile)
    status: dict[str, dict] = {}
    t_all = time.perf_counter()

    def execute(name: str, params: dict) -> None:
        t0 = time.perf_counter()
        print(f"== {name} ({profile})", flush=True)
        try:
            run(WORKBOOKS / name, out_dir / name, params, cwd=WORKBOOKS, progress=not args.quiet)
            status[name] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - keep going, report at the end
            status[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            traceback.print_exc()
        status[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {'ok' if status[name]['ok'] else 'FAILED'} in {status[name]['seconds']} s", flush=True)

    if TRAIN in selected and args.train != "never":
        have = existing_models(models_dir, needed)
        to_train = needed if args.train == "always" else [m for m in needed if m not in have]
        if to_train:
            execute(TRAIN, {"profile": profile, "models": to_train, "models_dir": str(models_dir),
                            "report_dir": str(report_dir), "progress": "epoch"})
        kept = [m for m in have if m not in to_train]
        if kept:
            print(f"using exported models {kept} from {models_dir} (--train always retrains)", flush=True)
            record_existing(models_dir, kept, report_dir)

    attacks = [n for n in ATTACKS if n in selected]
    if attacks:
        missing = [m for m in needed if m not in existing_models(models_dir, needed)]
        if missing:
            for n in attacks:
                status[n] = {"ok": False, "seconds": 0, "error": f"models not exported: {missing}"}
            print(f"models {missing} not under {models_dir}; skipping {attacks}", file=sys.stderr)
        else:
            from .stack import Stack

            log_dir = out_dir / "logs"
            with Stack(models_dir, needed, sidecars=harness.sidecar_specs(profile), log_dir=log_dir) as st:
                endpoints = st.endpoints_json()
                print(f"stack up: serving {st.backend}; sidecars "
                      + ", ".join(f"{n}={p.address}" for n, p in st.sidecars.items()), flush=True)
                for n in attacks:
                    execute(n, {"profile": profile, "models_dir": str(models_dir), "report_dir": str(report_dir),
                                "endpoints": endpoints, "progress": not args.quiet})

    if REPORT in selected:
        execute(REPORT, {"profile": profile, "report_dir": str(report_dir)})

    summary = {"profile": profile, "models": needed, "models_dir": str(models_dir),
               "notebooks": status, "seconds": round(time.perf_counter() - t_all, 1),
               "finished_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    (report_dir / "workbooks_run.json").write_text(json.dumps(summary, indent=2))
    failed = [n for n, s in status.items() if not s["ok"]]
    print(f"workbooks ({profile}) done in {summary['seconds']} s; "
          + (f"FAILED: {failed}" if failed else "all ok") + f"; report: {report_dir / 'report.html'}", flush=True)
    return 1 if failed else 0


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
