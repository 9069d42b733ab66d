"""Export a Keras classifier as a SavedModel in TF Serving's layout.

Contract every hashguard model follows (the sidecar and serving rely on it):
``<models_dir>/<name>/<version>/`` holds a SavedModel whose ``serving_default``
signature takes ``image``: float32 [batch, 32, 32, 3], raw 0-255 RGB (the model
normalises inside) and returns ``scores``: float32 [batch, num_classes], softmax
probabilities. ``assets.extra/hashguard.json`` carries metadata (accuracy,
params, epochs, data source); TF Serving ignores that folder's extra files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INPUT_NAME = "image"
OUTPUT_NAME = "scores"
METADATA_FILE = Path("assets.extra") / "hashguard.json"


def version_dirs(model_base: Path) -> list[int]:
    if not model_base.is_dir():
        return []
    return sorted(int(p.name) for p in model_base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists())


def export_classifier(model: Any, model_base: str | Path, version: int | None = None,
                      metadata: dict | None = None, image_shape=(32, 32, 3)) -> Path:
    """Write ``model`` to ``model_base/<version>`` (next free version when None)."""
    import tensorflow as tf
    import keras

    base = Path(model_base)
    if version is None:
        version = (version_dirs(base) or [0])[-1] + 1
    out = base / str(version)
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(image):
        return {OUTPUT_NAME: model(image, training=False)}

    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(str(out), verbose=False)
    meta = dict(metadata or {})
    meta.setdefault("version", version)
    meta.setdefault("params", int(model.count_params()))
    (out / METADATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def read_metadata(version_dir: str | Path) -> dict:
    path = Path(version_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}
