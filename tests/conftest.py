"""Shared fixtures: real CIFAR-10 images and small exported SavedModels."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-subset.npz"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not os.environ.get("HASHGUARD_CIFAR10") and SHARED_CIFAR.exists():
    os.environ["HASHGUARD_CIFAR10"] = str(SHARED_CIFAR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cifar():
    from lab.cifar10 import DatasetNotFound, load_cifar10

    try:
        return load_cifar10()
    except DatasetNotFound as exc:
        pytest.skip(f"CIFAR-10 unavailable: {exc}")


@pytest.fixture(scope="session")
def test_images(cifar) -> np.ndarray:
    return cifar.x_test


def build_tiny_model(seed: int, num_classes: int = 10):
    """A small untrained CNN that follows the model contract (raw 0-255 in, softmax out)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="session")
def model_base(tmp_path_factory) -> Path:
    """``<base>/tiny/{1,2}`` and ``<base>/other/1``: TF Serving's layout, two versions."""
    from lab.export import export_classifier

    base = tmp_path_factory.mktemp("models")
    export_classifier(build_tiny_model(1), base / "tiny", 1, {"note": "test v1"})
    export_classifier(build_tiny_model(2), base / "tiny", 2, {"note": "test v2"})
    export_classifier(build_tiny_model(3, num_classes=5), base / "other", 1, {"note": "5 classes"})
    return base


@pytest.fixture(scope="session")
def serving(model_base, tmp_path_factory):
    """One ``python -m serving`` (``tiny``, ``other``) for every test module that only reads from it."""
    from servers import ServingProcess

    proc = ServingProcess(model_base, ["tiny", "other"], tmp=tmp_path_factory.mktemp("serving")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def backend(serving):
    """The session's one ``python -m serving`` (``tiny``, ``other``): every module that imports
    this fixture only reads from it (calls are counted sidecar-side, by ``BackendCounter``);
    a test that stops its backend starts its own ``ServingProcess``."""
    return serving
