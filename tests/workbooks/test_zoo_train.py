"""Model zoo, training/export and workbook 01 (lab.zoo, lab.train, lab.ensure_model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lab import zoo

# Full-width parameter counts must be within this fraction of the reported ones.
PARAM_TOLERANCE = 0.35


@pytest.fixture(scope="module")
def full_models():
    """Every zoo model at paper size, built once."""
    import keras

    keras.utils.set_random_seed(0)
    return {name: zoo.build(name) for name in zoo.MODELS}


@pytest.fixture(scope="module")
def raw_batch():
    return np.random.default_rng(0).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def small_data(cifar):
    from lab.train import subset

    return subset(cifar, 384, 128)


@pytest.mark.parametrize("name", zoo.MODELS)
def test_model_contract(name, full_models, raw_batch):
    model = full_models[name]
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, zoo.NUM_CLASSES)
    scores = np.asarray(model(raw_batch, training=False))
    assert scores.shape == (2, zoo.NUM_CLASSES) and scores.dtype == np.float32
    assert np.all(scores >= 0)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in zoo.MODELS if zoo.REFERENCE[n]["params"]])
def test_full_width_params_match_reported(name, full_models):
    params, reported = full_models[name].count_params(), zoo.REFERENCE[name]["params"]
    assert abs(params - reported) <= PARAM_TOLERANCE * reported, f"{name}: {params:,} vs reported {reported:,}"


def test_cnn_is_two_conv_two_dense(full_models):
    import keras

    layers = full_models["cnn"].layers
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in layers) == 2
    assert sum(isinstance(layer, keras.layers.Dense) for layer in layers) == 2


@pytest.mark.parametrize("name", zoo.MODELS)
def test_quick_sizes_are_no_bigger(name, full_models):
    from lab.train import plan

    p = plan(name, profile="quick")
    assert zoo.build(name, width=p.width, depth=p.depth).count_params() <= full_models[name].count_params()


def test_normalisation_constants_fit_real_images(full_models, test_images):
    """The in-model layer maps real CIFAR-10 pixels to roughly zero mean, unit std per channel."""
    norm = full_models["cnn"].get_layer("normalize")
    z = np.asarray(norm(test_images[:500].astype(np.float32)))
    assert np.all(np.abs(z.mean(axis=(0, 1, 2))) < 0.15)
    assert np.all(np.abs(z.std(axis=(0, 1, 2)) - 1) < 0.15)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_normalisation_is_inside(name, full_models, raw_batch):
    """model(raw) == same network without its normalize layer applied to (raw - mean) / std,
    and feeding already-normalised pixels to the model gives something else."""
    import keras

    model = full_models[name]
    first = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)][0]
    assert isinstance(first, keras.layers.Normalization), "normalisation must be the first layer"

    def strip_norm(layer):
        if isinstance(layer, keras.layers.Normalization):
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    bare = keras.models.clone_model(model, clone_function=strip_norm)
    bare.set_weights(model.get_weights())

    def logits(m, x):  # softmax of an untrained net saturates; compare what feeds it
        return np.asarray(keras.Model(m.input, m.get_layer("scores").input)(x, training=False))

    normalised = (raw_batch - np.array(zoo.MEAN, np.float32)) / np.array(zoo.STD, np.float32)
    out_raw = logits(model, raw_batch)
    np.testing.assert_allclose(logits(bare, normalised), out_raw, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(logits(model, normalised) - out_raw)) > 1e-2 * np.max(np.abs(out_raw))


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError):
        zoo.build("vgg")
    with pytest.raises(ValueError):
        zoo.build("lenet", depth=20)
    with pytest.raises(ValueError):
        zoo.build("resnet", depth=21)


def _serve(version_dir: Path, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    return fn(image=tf.constant(images.astype(np.float32)))["scores"].numpy()


@pytest.mark.slow
def test_train_and_export_quick(tmp_path, small_data, capsys):
    from lab import ensure_model
    from lab.export import read_metadata
    from lab.train import train_and_export

    meta = train_and_export("cnn", profile="quick", epochs=1, models_dir=tmp_path, data=small_data,
                            progress=False)
    version_dir = Path(meta["path"])
    assert version_dir == tmp_path / "cnn" / "1" and (version_dir / "saved_model.pb").exists()
    on_disk = read_metadata(version_dir)
    assert on_disk == {k: v for k, v in meta.items() if k != "path"}
    for key in ("name", "version", "test_accuracy", "train_size", "test_size", "params", "epochs", "width",
                "profile", "data_source", "train_seconds", "keras_version", "tf_version"):
        assert key in on_disk, key
    assert (on_disk["name"], on_disk["version"], on_disk["profile"], on_disk["epochs"]) == ("cnn", 1, "quick", 1)
    assert (on_disk["train_size"], on_disk["test_size"]) == (384, 128)
    assert on_disk["data_source"] == Path(small_data.source).name
    text = json.dumps(on_disk)
    assert str(tmp_path) not in text and "/" not in on_disk["data_source"], "no machine paths in metadata"

    scores = _serve(version_dir, small_data.x_test)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    served_acc = float(np.mean(scores.argmax(axis=1) == small_data.y_test))
    assert served_acc == pytest.approx(on_disk["test_accuracy"], abs=1e-4)

    # ensure_model finds it and does not retrain.
    assert ensure_model.main(["--name", "cnn", "--models-dir", str(tmp_path)]) == 0
    assert "cnn ready at" in capsys.readouterr().out


@pytest.mark.slow
def test_exported_model_matches_keras(tmp_path, small_data):
    from lab.train import export_trained, train

    trained = train("cnn", profile="quick", epochs=1, data=small_data, progress=False)
    first = export_trained(trained, tmp_path)
    second = export_trained(trained, tmp_path)  # next free version
    assert (first["version"], second["version"]) == (1, 2)
    x = small_data.x_test[:64].astype(np.float32)
    expected = trained.model.predict(x, verbose=0)
    np.testing.assert_allclose(_serve(Path(second["path"]), x), expected, atol=1e-5, rtol=0)


def test_workbook_01_is_parameterised():
    import nbformat

    from lab.paths import WORKBOOKS

    nb = nbformat.read(WORKBOOKS / "01_train_export.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("profile", "models", "epochs", "models_dir", "report_dir"):
        assert f"{name} =" in tagged[0].source


@pytest.mark.slow
def test_workbook_01_runs(tmp_path):
    import pandas as pd

    from lab.export import version_dirs
    from lab.paths import WORKBOOKS
    from lab.run_workbooks import run_notebook

    models_dir, report_dir = tmp_path / "models", tmp_path / "reports"
    run_notebook(WORKBOOKS / "01_train_export.ipynb", tmp_path / "out" / "01.ipynb",
                  {"profile": "quick", "models": ["cnn"], "epochs": 1, "models_dir": str(models_dir),
                  "report_dir": str(report_dir), "train_limit": 256, "test_limit": 128, "progress": False},
                 progress=False)
    assert version_dirs(models_dir / "cnn") == [1]
    table = pd.read_csv(report_dir / "models.csv")
    assert list(table["name"]) == ["cnn"]
    assert table.loc[0, "profile"] == "quick" and table.loc[0, "train_size"] == 256
    assert 0 <= table.loc[0, "test_accuracy"] <= 1
    assert json.loads((report_dir / "models.json").read_text())[0]["name"] == "cnn"
    assert (report_dir / "01_models.png").stat().st_size > 0


def test_cpu_profile_trains_within_its_epochs_with_augmentation(small_data):
    from lab.train import CPU, plan, train

    for name in CPU:
        p = plan(name, profile="cpu")
        assert p.augment and p.budget_s and p.budget_s <= 900 and p.optimizer == "sgd_nesterov_budget_cosine"
    t = train("lenet", profile="cpu", epochs=2, data=small_data, progress=False)
    assert t.metadata["epochs"] == 2 and t.metadata["augment"] and t.metadata["budget_s"] == CPU["lenet"]["budget_s"]


@pytest.mark.parametrize("name,depth", [("lenet", None), ("resnet", 8)])
def test_keras_copy_rebuilt_from_an_export_answers_like_it(tmp_path, raw_batch, name, depth):
    """AdvBox's logit gradient needs the Keras model; an export without one gets it back,
    the same weights (``lab.export.keras_from_export``), and a wrong architecture is refused."""
    from lab.advbox_jsma import ensure_models, keras_path, local_gradient
    from lab.export import export_classifier, keras_from_export, read_metadata

    net = zoo.build(name, width=0.25, depth=depth)
    for i, w in enumerate(net.weights):  # weights of its own, not a fresh build's
        v = np.random.default_rng(i).normal(0, 0.05, w.shape)
        w.assign((1 + np.abs(v) if w.path.endswith("variance") else v).astype(np.float32))
    path = export_classifier(net, tmp_path / name, 1, {"name": name, "width": 0.25, "depth": depth})
    ensure_models(tmp_path, [name])  # no training: the export is there
    copy = keras_path(tmp_path, name)
    assert copy.exists()
    x = raw_batch.astype(np.float32)
    np.testing.assert_allclose(keras_from_export(path)(x, training=False).numpy(), net(x, training=False).numpy(),
                               atol=1e-5, rtol=0)
    assert local_gradient(tmp_path, name)(x[:2], [1, 2]).shape == x[:2].shape
    meta = read_metadata(path)
    (path / "assets.extra" / "hashguard.json").write_text(json.dumps({**meta, "width": 0.5}))
    with pytest.raises(ValueError, match="no variable"):
        keras_from_export(path)
