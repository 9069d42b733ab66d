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


def keras_from_export(version_dir: str | Path, probe_images: int = 16):
    """The ``keras.Model`` of an exported zoo model: its architecture rebuilt from the export's
    metadata (``lab.zoo.build(name, width, depth)``) with the export's variables, matched by
    path and shape. For what a SavedModel cannot give (the pre-softmax logits of AdvBox's
    gradient). Raises ``ValueError`` unless every weight is found and the rebuilt model answers
    a fixed random probe batch as the SavedModel does."""
    import numpy as np
    import tensorflow as tf

    from . import zoo

    meta = read_metadata(version_dir)
    if "name" not in meta:
        raise ValueError(f"{version_dir}: no zoo model name in {METADATA_FILE}")
    depth = meta.get("depth")
    net = zoo.build(meta["name"], width=float(meta.get("width") or 1.0), depth=int(depth) if depth else None)
    saved = tf.saved_model.load(str(version_dir))
    found = {v.name.rsplit(":", 1)[0]: v for v in saved.variables}
    missing = [w.path for w in net.weights if w.path not in found or tuple(found[w.path].shape) != tuple(w.shape)]
    if missing:
        raise ValueError(f"{version_dir}: the export has no variable for {missing[:5]} ({len(missing)} in all)")
    for w in net.weights:
        w.assign(found[w.path].numpy())
    probe = np.random.default_rng(0).integers(0, 256, (probe_images, 32, 32, 3)).astype(np.float32)
    want = saved.signatures["serving_default"](**{INPUT_NAME: tf.constant(probe)})[OUTPUT_NAME].numpy()
    got = net(probe, training=False).numpy()
    if not np.allclose(got, want, atol=1e-5) or (got.argmax(1) != want.argmax(1)).any():
        raise ValueError(f"{version_dir}: the rebuilt model answers differently (max |diff| "
                         f"{float(np.abs(got - want).max()):.2e})")
    return net


def read_metadata(version_dir: str | Path) -> dict:
    path = Path(version_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}
