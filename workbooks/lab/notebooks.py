"""Build and run the workbooks.

The ``.ipynb`` files under ``workbooks/`` are generated from the builders here, so
they stay small and reviewable: edit a builder, then regenerate with
``python -m lab.notebooks`` (``--check`` exits 1 when a notebook is out of date).

Helpers:
- ``notebook(cells)``: cells are ``(kind, source, tags)`` tuples, kind ``"md"``/``"code"``;
  tag ``"parameters"`` marks papermill's parameters cell;
- ``write(nb, path)``: validate and write (stable cell ids, so regenerating is a no-op);
- ``run(path_in, path_out, parameters, cwd)``: execute with papermill (kernel ``python3``).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

KERNEL = "python3"
WORKBOOKS = Path(__file__).resolve().parents[1]  # workbooks/ (lab lives in workbooks/lab)
OUT_DIR_NAME = "out"

Cell = tuple  # (kind, source) or (kind, source, tags)


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default cwd) holding ``pyproject.toml``
    and ``workbooks/``; else the parent of this package's ``workbooks/``; else ``start``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() and (d / "workbooks").is_dir():
            return d
    if (WORKBOOKS.parent / "pyproject.toml").exists():
        return WORKBOOKS.parent
    return here


def project_path(p: str | Path) -> Path:
    """``p`` if absolute, else ``p`` under ``project_root()``: notebooks run with cwd
    ``workbooks/`` but ``models/`` and ``reports/`` live at the project root."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else project_root() / p


def notebook(cells: Iterable[Cell], *, kernel: str = KERNEL, title: str | None = None):
    """An nbformat v4 notebook of ``cells`` with a ``kernel`` kernelspec."""
    import nbformat

    v4 = nbformat.v4
    nb = v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": kernel, "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    if title:
        nb.metadata["title"] = title
    for i, cell in enumerate(cells):
        kind, source, *rest = cell
        tags = rest[0] if rest else ()
        source = _dedent(source)
        if kind in ("md", "markdown"):
            c = v4.new_markdown_cell(source)
        elif kind == "code":
            c = v4.new_code_cell(source)
        elif kind == "raw":
            c = v4.new_raw_cell(source)
        else:
            raise ValueError(f"cell {i}: unknown kind {kind!r} (md, code, raw)")
        if tags:
            c.metadata["tags"] = list(tags)
        # Stable ids: position plus content, so regenerating an unchanged notebook is a no-op.
        c.id = f"c{i:02d}-" + hashlib.sha1(f"{kind}\0{source}".encode()).hexdigest()[:8]
        nb.cells.append(c)
    return nb


def _dedent(source: str) -> str:
    import textwrap

    return textwrap.dedent(source).strip("\n")


def write(nb, path: str | Path) -> Path:
    """Validate ``nb`` and write it to ``path`` (parents created); returns the path."""
    import nbformat

    nbformat.validate(nb)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    return path


def install_kernel() -> None:
    """Register this interpreter as Jupyter kernel ``python3`` inside its environment."""
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL],
                   check=True, stdout=subprocess.DEVNULL)


def run(path_in: str | Path, path_out: str | Path, parameters: dict | None = None,
        cwd: str | Path | None = None, *, progress: bool = True, log_output: bool = False,
        kernel: str = KERNEL, timeout: int | None = None):
    """Execute ``path_in`` with papermill into ``path_out`` and return the executed notebook.

    ``cwd`` defaults to the input notebook's folder (as when opened in Jupyter);
    ``log_output`` echoes the cells' stdout to ours while they run. A
    missing ``python3`` kernel is registered once (``install_kernel``) and the run retried.
    Cell errors raise ``papermill.PapermillExecutionError`` after ``path_out`` is written.
    """
    import papermill as pm
    from jupyter_client.kernelspec import NoSuchKernel

    path_in, path_out = Path(path_in), Path(path_out)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(parameters=dict(parameters or {}), kernel_name=kernel, progress_bar=progress,
                  cwd=str(cwd or path_in.parent), execution_timeout=timeout)
    if log_output:
        # Echo the cells' stdout as it comes. Not stderr: the kernel inherits our stderr,
        # so its low-level writes (TF's C++ logs) reach it already and would show twice.
        kwargs.update(stdout_file=sys.stdout)
    try:
        return pm.execute_notebook(str(path_in), str(path_out), **kwargs)
    except NoSuchKernel:
        if kernel != KERNEL:
            raise
        install_kernel()
        return pm.execute_notebook(str(path_in), str(path_out), **kwargs)


# -- workbook builders -------------------------------------------------------------

def build_01():
    """01_train_export: train zoo models, export them for TF Serving, tabulate and plot."""
    return notebook([
        ("md", """
            # 01 · Train and export the model zoo

            Trains the CIFAR-10 classifiers the paper attacks (`lab.zoo`) and exports each as
            a TF Serving SavedModel under `models_dir/<name>/<version>/` (raw 0-255 RGB in,
            softmax out; metadata in `assets.extra/hashguard.json`).

            * `profile="quick"`: reduced width/depth and a few epochs, minutes on a CPU; for
              exercising the pipeline, **not** paper-size models.
            * `profile="full"`: paper-size models, flip/shift augmentation, SGD with cosine
              decay; meant for a GPU.

            Writes `report_dir/models.csv` / `models.json` (one row per model, newest wins)
            and `report_dir/01_models.png`. Relative paths are taken from the project root.
        """),
        ("code", """
            profile = "quick"     # "quick" (CPU, small models) or "full" (paper-size, GPU)
            models = ["cnn"]      # any of lab.zoo.MODELS
            epochs = None         # None: the profile's default per model
            models_dir = "models"
            report_dir = "reports"
            seed = 0
            train_limit = None    # use only the first N training images (smoke tests)
            test_limit = None     # use only the first N test images
            progress = True       # Keras progress bar; "epoch" for one line per epoch
        """, ("parameters",)),
        ("code", """
            import os

            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import pandas as pd

            from lab import zoo
            from lab.cifar10 import load_cifar10
            from lab.notebooks import project_path
            from lab.train import subset, train_and_export, write_report

            models = [models] if isinstance(models, str) else list(models)
            unknown = sorted(set(models) - set(zoo.MODELS))
            assert not unknown, f"unknown models {unknown}; choose from {zoo.MODELS}"
            models_dir, report_dir = project_path(models_dir), project_path(report_dir)
            data = subset(load_cifar10(), train_limit, test_limit)
            print(f"CIFAR-10 from {os.path.basename(data.source)}: "
                  f"{len(data.x_train)} train / {len(data.x_test)} test images")
            print(f"profile {profile}; models {models}; exporting to {models_dir}")
        """),
        ("md", "## Train and export"),
        ("code", """
            results = []
            for name in models:
                results.append(train_and_export(name, profile=profile, epochs=epochs, models_dir=models_dir,
                                                seed=seed, data=data, progress=progress))
        """),
        ("md", "## Results\n\nThis run, then the merged report (every model trained so far)."),
        ("code", """
            run_table = pd.DataFrame(results)[["name", "version", "profile", "width", "depth", "params",
                                               "epochs", "test_accuracy", "reference_accuracy",
                                               "train_seconds"]]
            report = write_report(results, report_dir)
            print(f"wrote {report_dir / 'models.csv'} and {report_dir / 'models.json'}")
            run_table
        """),
        ("code", """
            import numpy as np

            fig, (ax_acc, ax_par) = plt.subplots(1, 2, figsize=(11, 3.8))
            x = np.arange(len(report))
            panels = ((ax_acc, "test_accuracy", "reference_accuracy", "test accuracy", "tab:blue"),
                      (ax_par, "params", "reference_params", "parameters", "tab:orange"))
            for ax, ours, ref, label, color in panels:
                ax.bar(x, report[ours].astype(float), color=color, label="ours")
                reported = report[ref].astype(float)
                has = reported.notna().to_numpy()
                if has.any():
                    ax.scatter(x[has], reported[has], color="black", marker="_", s=400, zorder=3,
                               label="reported (paper-size zoo)")
                ax.set_xticks(x, report["name"], rotation=30)
                ax.set_ylabel(label)
                ax.legend(loc="lower right", fontsize=8)
            ax_acc.set_ylim(0, 1)
            ax_par.set_yscale("log")
            profiles = ", ".join(sorted(set(map(str, report["profile"]))))
            fig.suptitle(f"Model zoo: test accuracy and size (profile: {profiles})")
            fig.tight_layout()
            png = report_dir / "01_models.png"
            fig.savefig(png, dpi=120)
            print(f"wrote {png}")
            report
        """),
    ], title="01 Train and export the model zoo")


BUILDERS: dict[str, Callable] = {
    "01_train_export.ipynb": build_01,
}


def registry() -> dict[str, Callable]:
    """Every workbook's builder: 01 here, the research workbooks in ``lab.books``."""
    from .books import BUILDERS as research

    return {**BUILDERS, **research}


def build_all(dest: str | Path = WORKBOOKS, names: Sequence[str] | None = None) -> list[Path]:
    builders = registry()
    return [write(builders[n](), Path(dest) / n) for n in (names or builders)]


def stale(dest: str | Path = WORKBOOKS) -> list[str]:
    """Notebooks whose file differs from what their builder generates."""
    import nbformat

    out = []
    for n, builder in registry().items():
        path = Path(dest) / n
        want = nbformat.writes(builder()) + "\n"
        if not path.exists() or path.read_text(encoding="utf-8") != want:
            out.append(n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.notebooks", description="Regenerate the workbooks.")
    ap.add_argument("--check", action="store_true", help="only report notebooks that are out of date")
    ap.add_argument("names", nargs="*", help="notebooks to build (default: all)")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        print("out of date: " + ", ".join(bad) if bad else "all workbooks up to date")
        return 1 if bad else 0
    for p in build_all(names=args.names or None):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
