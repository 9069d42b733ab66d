"""Test helpers over the lab's one launcher (``lab.launcher``): serving as a real
subprocess that can be stopped and started again on the same port."""

from __future__ import annotations

from pathlib import Path

from lab.launcher import Serving


class ServingProcess(Serving):
    """``python -m serving`` for ``names`` under ``model_base``; ``target`` is its address."""

    def __init__(self, model_base: Path, names: list[str], port: int | None = None, tmp: Path | None = None):
        super().__init__(model_base, names, Path(tmp or model_base), port=port)

    @property
    def target(self) -> str:
        return self.address
