"""Make sure a model is exported: ``python -m lab.ensure_model --name cnn --models-dir models``.

If ``<models-dir>/<name>/`` already holds a version, say where and exit 0. Otherwise
run the workbook ``workbooks/01_train_export.ipynb`` with papermill (output notebook in
``workbooks/out/``) to train and export it, then check that a version exists.
Exit status: 0 ready, 1 training failed or produced nothing, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lab import zoo
from lab.paths import WORKBOOKS
from lab.run_workbooks import OUT_DIR, run_notebook
from lab.export import read_metadata, version_dirs

WORKBOOK = "01_train_export.ipynb"
PREFIX = "ensure_model:"


def _say(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def _describe(version_dir: Path) -> str:
    meta = read_metadata(version_dir)
    bits = [f"version {Path(version_dir).name}"]
    if meta.get("profile"):
        bits.append(f"{meta['profile']} profile")
    if meta.get("test_accuracy") is not None:
        bits.append(f"test accuracy {meta['test_accuracy']:.3f}")
    return ", ".join(bits)


def ensure(name: str, models_dir: str | Path = "models", *, profile: str = "quick", epochs: int | None = None,
           report_dir: str | Path = "reports", progress: bool = True) -> Path:
    """The newest version folder of ``name``, training it through workbook 01 when missing.

    Raises ``RuntimeError`` (one-line message) when training fails or exports nothing.
    """
    from lab.cifar10 import DatasetNotFound, resolve_source

    base = Path(models_dir).resolve() / name
    versions = version_dirs(base)
    if versions:
        return base / str(versions[-1])
    try:
        source = resolve_source()
    except DatasetNotFound as exc:
        raise RuntimeError(f"cannot train {name}: {exc}") from None
    workbook = WORKBOOKS / WORKBOOK
    out = OUT_DIR / WORKBOOK
    _say(f"no {name} under {base}; training it ({profile} profile, CIFAR-10 from {source.name}) "
         f"by running {workbook.relative_to(WORKBOOKS.parent)} -> "
         f"{out.relative_to(WORKBOOKS.parent)}")
    params = {"profile": profile, "models": [name], "epochs": epochs,
              "models_dir": str(base.parent), "report_dir": str(Path(report_dir).resolve())}
    if progress:
        params["progress"] = "epoch"
    t0 = time.perf_counter()
    try:
        import papermill as pm

        # Stream the cells' output (one line per epoch) instead of papermill's per-cell bar.
        run_notebook(workbook, out, params, progress=False, log_output=progress)
    except pm.PapermillExecutionError as exc:
        raise RuntimeError(f"workbook failed: {exc.ename}: {exc.evalue} (see {out})") from None
    versions = version_dirs(base)
    if not versions:
        raise RuntimeError(f"workbook ran ({out}) but {base} has no version")
    _say(f"trained in {time.perf_counter() - t0:.0f} s")
    return base / str(versions[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.ensure_model", description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="cnn", help=f"model to ensure, one of {', '.join(zoo.MODELS)} (default cnn)")
    ap.add_argument("--models-dir", default="models", help="TF Serving model base folder (default models)")
    ap.add_argument("--profile", default="quick", choices=("quick", "full"), help="training profile if missing")
    ap.add_argument("--epochs", type=int, default=None, help="epochs if training (default: profile's)")
    ap.add_argument("--report-dir", default="reports", help="where the workbook writes models.csv")
    ap.add_argument("--quiet", action="store_true", help="no training progress")
    args = ap.parse_args(argv)
    if args.name not in zoo.MODELS:
        _say(f"unknown model {args.name!r}; choose one of {', '.join(zoo.MODELS)}")
        return 2
    base = Path(args.models_dir).resolve() / args.name
    existing = version_dirs(base)
    try:
        path = ensure(args.name, args.models_dir, profile=args.profile, epochs=args.epochs,
                      report_dir=args.report_dir, progress=not args.quiet)
    except RuntimeError as exc:
        _say(str(exc))
        return 1
    state = "ready" if existing else "exported"
    _say(f"{args.name} {state} at {path} ({_describe(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
