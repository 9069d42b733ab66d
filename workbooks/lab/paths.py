"""Where things are: the project root (``pyproject.toml`` beside ``workbooks/``)."""

from __future__ import annotations

from pathlib import Path

WORKBOOKS = Path(__file__).resolve().parents[1]


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default cwd) holding ``pyproject.toml`` and
    ``workbooks/``; else the parent of this package's ``workbooks/``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() and (d / "workbooks").is_dir():
            return d
    return WORKBOOKS.parent


def project_path(p: str | Path) -> Path:
    """``p`` if absolute, else under the project root (notebooks run with cwd ``workbooks/``)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else project_root() / p
