"""CIFAR-10 as users have it.

Sources, in order:
1. an explicit ``source`` argument or the ``HASHGUARD_CIFAR10`` environment variable:
   either a ``.npz`` with keys x_train, y_train, x_test, y_test (uint8 NHWC RGB,
   integer labels) or a ``cifar-10-batches-py`` directory;
2. Keras' download cache (``~/.keras/datasets/cifar-10-batches-py``, also under
   ``$KERAS_HOME``), i.e. what ``keras.datasets.cifar10.load_data()`` left behind.

Nothing is downloaded: on machines without internet point ``HASHGUARD_CIFAR10``
at a file or folder you have.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_VAR = "HASHGUARD_CIFAR10"
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Cifar10:
    x_train: np.ndarray  # (n, 32, 32, 3) uint8 RGB
    y_train: np.ndarray  # (n,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


class DatasetNotFound(FileNotFoundError):
    pass


def _keras_cache_dirs() -> list[Path]:
    homes = [Path(os.environ["KERAS_HOME"])] if "KERAS_HOME" in os.environ else []
    homes.append(Path.home() / ".keras")
    return [h / "datasets" / "cifar-10-batches-py" for h in homes]


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    return np.ascontiguousarray(data), labels


def _from_batches(folder: Path) -> Cifar10:
    parts = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_batch(folder / "test_batch")
    return Cifar10(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        x_test,
        y_test,
        str(folder),
    )


def _from_npz(path: Path) -> Cifar10:
    with np.load(path) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks keys {sorted(missing)}")
        arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    for k in ("x_train", "x_test"):
        if arrays[k].dtype != np.uint8 or arrays[k].shape[1:] != (32, 32, 3):
            raise ValueError(f"{path}:{k} must be uint8 (n, 32, 32, 3), got {arrays[k].dtype} {arrays[k].shape}")
    return Cifar10(
        arrays["x_train"],
        arrays["y_train"].reshape(-1).astype(np.int64),
        arrays["x_test"],
        arrays["y_test"].reshape(-1).astype(np.int64),
        str(path),
    )


def _load_path(path: Path) -> Cifar10:
    if path.is_dir():
        return _from_batches(path)
    if path.suffix == ".npz":
        return _from_npz(path)
    raise DatasetNotFound(f"{path}: expected a .npz file or a cifar-10-batches-py directory")


def resolve_source(source: str | os.PathLike | None = None) -> Path:
    """The path CIFAR-10 will be read from, or DatasetNotFound with what was tried."""
    explicit = source if source is not None else os.environ.get(ENV_VAR)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise DatasetNotFound(f"CIFAR-10 source {path} (from {'argument' if source else ENV_VAR}) does not exist")
        return path
    tried = _keras_cache_dirs()
    for folder in tried:
        if (folder / "test_batch").exists():
            return folder
    raise DatasetNotFound(
        "CIFAR-10 not found. Set HASHGUARD_CIFAR10 to a .npz (x_train, y_train, x_test, y_test) "
        "or a cifar-10-batches-py directory; looked in " + ", ".join(map(str, tried))
    )


def load_cifar10(source: str | os.PathLike | None = None) -> Cifar10:
    return _load_path(resolve_source(source))
