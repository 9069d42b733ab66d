"""Modules imported on first use.

OpenCV costs an idle sidecar 15-30 MB of resident memory and tens of milliseconds of
start-up, and nothing needs it before the first image is fingerprinted or decoded.
``cv2 = lazy("cv2", globals())`` binds a stand-in; the first attribute read imports the
module and puts it in the importing module's globals in place of the stand-in, so every
later ``cv2.resize`` is the plain module attribute lookup it was before.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    __slots__ = ("_name", "_namespace", "_as")

    def __init__(self, name: str, namespace: dict, as_name: str | None = None) -> None:
        self._name, self._namespace, self._as = name, namespace, as_name or name

    def load(self) -> Any:
        module = importlib.import_module(self._name)
        if self._namespace.get(self._as) is self:
            self._namespace[self._as] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str, namespace: dict, as_name: str | None = None) -> Any:
    """The module ``name`` if it is loaded already, else a stand-in that loads it on first use."""
    import sys

    module = sys.modules.get(name)
    return module if module is not None else LazyModule(name, namespace, as_name)
