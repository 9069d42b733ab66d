"""Train a zoo model on CIFAR-10 and export it for TF Serving.

Two profiles:

- ``quick``: reduced width/depth, few epochs, Adam, no augmentation. Meant for CPU:
  every model trains and exports in well under a minute on 2 cores. These models
  are for exercising the pipeline and the defence, *not* paper-size (metadata says so).
- ``cpu``: the research run on 2 CPU cores (``lab.profiles`` ``cpu``): paper-size models
  where an epoch is cheap, width/depth cut where it is not (``CPU``), SGD + Nesterov,
  flip and 4-px crop (translate, reflect) augmentation, and a wall-clock budget per model:
  the first epoch's time fixes how many epochs fit (``budget_s``) and the cosine decay
  spans exactly those, so a slower machine trains fewer epochs (recorded in the metadata).
- ``full``: paper-size models (``width=1``, default depth), SGD with Nesterov momentum,
  cosine learning-rate decay, weight decay, flip/shift augmentation; epochs for a GPU.

``train`` returns the Keras model with its metadata; ``train_and_export`` also writes
``<models_dir>/<name>/<version>/`` via ``lab.export.export_classifier`` and returns the
metadata plus ``path``. Seeds are fixed (``keras.utils.set_random_seed`` and a seeded
shuffle), so a rerun on the same machine and data gives the same model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lab import zoo
from lab.cifar10 import Cifar10, load_cifar10

PROFILES = ("quick", "cpu", "full")

# Per profile and model: size (width, depth), default epochs, optimiser settings.
QUICK: dict[str, dict[str, Any]] = {
    "cnn": {"width": 0.5, "depth": None, "epochs": 8},
    "lenet": {"width": 1.0, "depth": None, "epochs": 6},
    "pure_cnn": {"width": 1 / 6, "depth": None, "epochs": 6},
    "net_in_net": {"width": 1 / 6, "depth": None, "epochs": 5},
    "resnet": {"width": 0.5, "depth": 8, "epochs": 6},
    "densenet": {"width": 0.5, "depth": 10, "epochs": 6},
    "wide_resnet": {"width": 1 / 16, "depth": 10, "epochs": 6},
}
QUICK_BATCH = 64
QUICK_LR = 2e-3

# cpu: width/depth cut only where a paper-size epoch on 4660 images costs too much of the budget
# (2 shared cores, s/epoch at paper size: pure_cnn ~74, net_in_net ~90, resnet-32 ~27, densenet-40 ~70
# (-100 far more), WRN-16-8 several minutes): pure_cnn and net_in_net at half width, resnet-20,
# densenet-22, WRN-16-2 (width 1/4 of WRN-16-8).
CPU: dict[str, dict[str, Any]] = {
    "cnn": {"width": 1.0, "depth": None, "budget_s": 240, "lr": 0.02},
    "lenet": {"width": 1.0, "depth": None, "budget_s": 180, "lr": 0.02},
    "pure_cnn": {"width": 0.5, "depth": None, "budget_s": 480, "lr": 0.05},
    "net_in_net": {"width": 0.5, "depth": None, "budget_s": 480, "lr": 0.05},
    "resnet": {"width": 1.0, "depth": 20, "budget_s": 540, "lr": 0.1},
    "densenet": {"width": 1.0, "depth": 22, "budget_s": 600, "lr": 0.1},
    "wide_resnet": {"width": 0.25, "depth": 16, "budget_s": 540, "lr": 0.1},
}
CPU_MAX_EPOCHS = 60

FULL: dict[str, dict[str, Any]] = {
    "cnn": {"epochs": 40, "lr": 0.02},
    "lenet": {"epochs": 40, "lr": 0.02},
    "pure_cnn": {"epochs": 120, "lr": 0.05},
    "net_in_net": {"epochs": 120, "lr": 0.05},
    "resnet": {"epochs": 160, "lr": 0.1},
    "densenet": {"epochs": 160, "lr": 0.1},
    "wide_resnet": {"epochs": 120, "lr": 0.1},
}
FULL_BATCH = 128
FULL_WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class Plan:
    """Everything that decides a training run (recorded in the metadata)."""

    name: str
    profile: str
    width: float
    depth: int | None
    epochs: int
    batch_size: int
    seed: int
    augment: bool
    optimizer: str
    learning_rate: float
    weight_decay: float
    budget_s: float | None = None  # cpu: wall-clock seconds of training (the epochs that fit)
    photometric: bool = False  # colour jitter, brightness, contrast, gamma, smooth colour fields (issue 23)
    replay: bool = False  # cpu: exactly ``epochs`` epochs on the cosine over them, whatever the clock says


@dataclass
class Trained:
    model: Any  # keras.Model
    metadata: dict


def plan(name: str, *, profile: str = "quick", epochs: int | None = None, batch_size: int | None = None,
         seed: int = 0, width: float | None = None, depth: int | None = None,
         augment: bool | None = None, photometric: bool = False) -> Plan:
    """Resolve the profile defaults for ``name``; explicit arguments win."""
    return replace(_plan(name, profile=profile, epochs=epochs, batch_size=batch_size, seed=seed, width=width,
                         depth=depth, augment=augment), photometric=bool(photometric))


def _plan(name: str, *, profile: str, epochs: int | None, batch_size: int | None, seed: int,
          width: float | None, depth: int | None, augment: bool | None) -> Plan:
    if name not in zoo.MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(zoo.MODELS)}")
    if profile == "quick":
        spec = QUICK[name]
        return Plan(name, profile, float(width if width is not None else spec["width"]),
                    depth if depth is not None else spec["depth"],
                    int(epochs if epochs is not None else spec["epochs"]),
                    int(batch_size or QUICK_BATCH), int(seed), bool(augment) if augment is not None else False,
                    "adam", QUICK_LR, 0.0)
    if profile == "cpu":
        spec = CPU[name]
        return Plan(name, profile, float(width if width is not None else spec["width"]),
                    depth if depth is not None else spec["depth"],
                    int(epochs if epochs is not None else CPU_MAX_EPOCHS), int(batch_size or QUICK_BATCH), int(seed),
                    True if augment is None else bool(augment), "sgd_nesterov_budget_cosine", spec["lr"],
                    FULL_WEIGHT_DECAY, float(spec["budget_s"]))
    if profile == "full":
        spec = FULL[name]
        return Plan(name, profile, float(width if width is not None else 1.0), depth,
                    int(epochs if epochs is not None else spec["epochs"]),
                    int(batch_size or FULL_BATCH), int(seed), True if augment is None else bool(augment),
                    "sgd_nesterov_warmup_cosine", spec["lr"], FULL_WEIGHT_DECAY)
    raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")


def subset(data: Cifar10, n_train: int | None = None, n_test: int | None = None) -> Cifar10:
    """The first ``n_train`` / ``n_test`` images (None keeps all): for tests and smoke runs."""
    return replace(data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train],
                   x_test=data.x_test[:n_test], y_test=data.y_test[:n_test])


def _dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shuffle: bool, photometric: bool = False):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda a, b: (tf.cast(a, tf.float32), b))
    if photometric:
        gen = tf.random.Generator.from_seed(seed + 7)
        ds = ds.map(lambda a, b: (photometric_jitter(a, gen), b))
    return ds.prefetch(tf.data.AUTOTUNE)


#: Photometric augmentation (issue 23): what a blinding attacker may apply, so that the
#: trained model keeps its label under it. Per image: brightness +-32/255 (0-255 scale: +-32),
#: contrast x[0.7, 1.3] about the mean, per-channel gain x[0.8, 1.2], gamma [0.7, 1.4] and a
#: smooth colour field (DCT u, v <= 3 per channel) of L-inf up to 32.
PHOTOMETRIC = {"brightness": 32.0, "contrast": (0.7, 1.3), "gain": (0.8, 1.2), "gamma": (0.7, 1.4), "field": 32.0}


def _smooth_basis(side: int = 32, cut: int = 4) -> np.ndarray:
    """(cut*cut, side, side) 2-D DCT basis images of frequencies u, v < cut (DC left out: 15)."""
    i = np.arange(side)
    rows = [np.cos(np.pi * (2 * i + 1) * u / (2 * side)) for u in range(cut)]
    out = [np.outer(rows[u], rows[v]) for u in range(cut) for v in range(cut) if u or v]
    return np.asarray(out, np.float32)


def photometric_jitter(batch, gen):
    """A random photometric transform per image of a float32 [n, 32, 32, 3] batch (0-255)."""
    import tensorflow as tf

    n = tf.shape(batch)[0]
    pm = PHOTOMETRIC
    x = batch / 255.0
    gamma = tf.exp(gen.uniform([n, 1, 1, 1], np.log(pm["gamma"][0]), np.log(pm["gamma"][1])))
    x = tf.pow(tf.clip_by_value(x, 1e-4, 1.0), gamma)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * gen.uniform([n, 1, 1, 1], *pm["contrast"]) + mean
    x = x * gen.uniform([n, 1, 1, 3], *pm["gain"]) + gen.uniform([n, 1, 1, 1], -1.0, 1.0) * pm["brightness"] / 255
    basis = tf.constant(_smooth_basis())  # (15, 32, 32)
    coef = gen.normal([n, 3, basis.shape[0]])
    field = tf.einsum("ncb,bhw->nhwc", coef, basis)
    field = field / (tf.reduce_max(tf.abs(field), axis=[1, 2, 3], keepdims=True) + 1e-6)
    field = field * gen.uniform([n, 1, 1, 1], 0.0, 1.0) * pm["field"] / 255
    return tf.clip_by_value(x + field, 0.0, 1.0) * 255.0


def _optimizer(p: Plan, steps: int, steps_per_epoch: int):
    """Adam (quick) or SGD + Nesterov with linear warmup (up to 2 epochs) then cosine decay (full)."""
    import keras

    if p.optimizer == "adam":
        return keras.optimizers.Adam(p.learning_rate)
    if p.budget_s is not None:  # the learning rate is set per epoch by _Budget
        return keras.optimizers.SGD(p.learning_rate, momentum=0.9, nesterov=True, weight_decay=p.weight_decay)
    warmup = min(2 * steps_per_epoch, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        p.learning_rate / 10 if warmup else p.learning_rate, decay_steps=max(1, steps - warmup),
        warmup_target=p.learning_rate if warmup else None, warmup_steps=warmup)
    return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=p.weight_decay)


def _training_model(model, p: Plan):
    """``model`` behind random flip/shift layers when augmenting (the export stays clean)."""
    import keras

    if not p.augment:
        return model
    return keras.Sequential([
        keras.Input(zoo.INPUT_SHAPE, dtype="float32"),
        keras.layers.RandomFlip("horizontal", seed=p.seed),
        keras.layers.RandomTranslation(0.125, 0.125, fill_mode="reflect", seed=p.seed + 1),
        model,
    ], name=f"{p.name}_train")


def _budget_callback(p: Plan):
    """cpu: epoch 0 at lr/10 (warmup); then as many epochs as the budget allows (2..p.epochs, from
    the mean epoch time so far, re-estimated each epoch and never raised), the learning rate on a
    cosine from ``p.learning_rate`` towards 0 over them."""
    import math

    import keras

    class _Budget(keras.callbacks.Callback):
        total = None

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0:
                self.t0, lr = time.perf_counter(), p.learning_rate / 10
            else:
                lr = p.learning_rate * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, self.total - 1)))
            self.model.optimizer.learning_rate.assign(lr)

        def on_epoch_end(self, epoch, logs=None):
            elapsed = time.perf_counter() - self.t0
            if epoch == 0:
                self.first = elapsed  # includes tracing: only a provisional plan
            per = elapsed if epoch == 0 else (elapsed - self.first) / epoch
            fit = epoch + 1 + int(max(0.0, p.budget_s - elapsed) // max(per, 1e-3))
            # set after the second epoch, then only lowered: a machine that slows down (shared cores)
            # shortens the schedule
            self.total = int(max(2, epoch + 1, min(p.epochs, fit, self.total if epoch >= 2 else p.epochs)))
            if p.replay:  # a recorded run's epochs: the schedule it had when the budget never moved it
                self.total = p.epochs
            if epoch + 1 >= self.total:
                self.model.stop_training = True

    return _Budget()


def _verbose(progress: bool | str) -> int:
    if progress == "epoch":
        return 2
    return 1 if progress else 0


def predict(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax scores, computed eagerly batch by batch (no per-model tf.function tracing)."""
    out = [np.asarray(model(x[i:i + batch_size].astype(np.float32), training=False))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, zoo.NUM_CLASSES), np.float32)


def accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    return float(np.mean(np.argmax(predict(model, x, batch_size), axis=1) == y))


def train(name: str, *, epochs: int | None = None, profile: str = "quick", batch_size: int | None = None,
          seed: int = 0, data: Cifar10 | None = None, progress: bool | str = True,
          width: float | None = None, depth: int | None = None, augment: bool | None = None,
          photometric: bool = False, replay: bool = False) -> Trained:
    """Build ``name`` for ``profile``, fit it on CIFAR-10 train, score it on test.
    ``photometric``: train on ``photometric_jitter``-ed images (the export stays clean).
    ``replay`` (cpu profile, with ``epochs``): train exactly ``epochs`` epochs on the budget
    schedule as if the budget had fixed that count from the start, independent of the
    clock: with the same seed this rebuilds a recorded model (``main --replay``)."""
    import keras
    import tensorflow as tf

    p = replace(plan(name, profile=profile, epochs=epochs, batch_size=batch_size, seed=seed,
                     width=width, depth=depth, augment=augment, photometric=photometric), replay=bool(replay))
    data = data if data is not None else load_cifar10()
    keras.utils.set_random_seed(p.seed)
    model = zoo.build(name, width=p.width, depth=p.depth)
    steps_per_epoch = -(-len(data.x_train) // p.batch_size)
    net = _training_model(model, p)
    net.compile(optimizer=_optimizer(p, p.epochs * steps_per_epoch, steps_per_epoch),
                loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train_ds = _dataset(data.x_train, data.y_train, p.batch_size, p.seed, shuffle=True, photometric=p.photometric)
    val_ds = _dataset(data.x_test, data.y_test, 512, p.seed, shuffle=False) if profile == "full" else None
    if progress:
        print(f"training {name} ({profile}: width {p.width:.3g}, "
              f"depth {p.depth or zoo.DEFAULT_DEPTH.get(name) or 'fixed'}, "
              f"{model.count_params():,} params) for {p.epochs} epochs on {len(data.x_train)} images", flush=True)
    t0 = time.perf_counter()
    history = net.fit(train_ds, epochs=p.epochs, validation_data=val_ds, shuffle=False, verbose=_verbose(progress),
                      callbacks=[_budget_callback(p)] if p.budget_s is not None else None)
    train_seconds = time.perf_counter() - t0
    test_acc = accuracy(model, data.x_test, data.y_test)
    ref = zoo.REFERENCE[name]
    metadata = {
        "name": name,
        "profile": profile,
        "paper_size": profile == "full" and p.width == 1.0 and p.depth in (None, zoo.DEFAULT_DEPTH.get(name)),
        "note": {"quick": "quick profile: reduced width/depth and few epochs for CPU; not comparable with the "
                          "paper's models",
                 "cpu": f"cpu profile: {p.budget_s:.0f} s CPU budget; width {p.width:g}, depth "
                        f"{p.depth or zoo.DEFAULT_DEPTH.get(name) or 'fixed'} (paper-size: width 1, depth "
                        f"{zoo.DEFAULT_DEPTH.get(name) or 'fixed'})" if p.budget_s else "",
                 "full": "full profile: paper-size model"}[profile],
        "width": p.width,
        "depth": p.depth if p.depth is not None else zoo.DEFAULT_DEPTH.get(name),
        "epochs": len(history.history["loss"]),
        "budget_s": p.budget_s,
        "batch_size": p.batch_size,
        "seed": p.seed,
        "augment": p.augment,
        "photometric": p.photometric,
        "replay": p.replay,
        "optimizer": p.optimizer,
        "learning_rate": p.learning_rate,
        "weight_decay": p.weight_decay,
        "params": int(model.count_params()),
        "test_accuracy": round(test_acc, 4),
        "final_train_accuracy": round(float(history.history["accuracy"][-1]), 4),
        "train_size": int(len(data.x_train)),
        "test_size": int(len(data.x_test)),
        "data_source": Path(str(data.source)).name,
        "train_seconds": round(train_seconds, 2),
        "reference_accuracy": ref["accuracy"],
        "reference_params": ref["params"],
        "keras_version": keras.__version__,
        "tf_version": tf.__version__,
        "created_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    if progress:
        print(f"{name}: test accuracy {test_acc:.4f} after {train_seconds:.1f} s", flush=True)
    return Trained(model, metadata)


def export_trained(trained: Trained, models_dir: str | Path = "models", version: int | None = None) -> dict:
    """Export to ``models_dir/<name>/<version>``; returns the metadata plus ``path``."""
    from lab.export import export_classifier, read_metadata

    out = export_classifier(trained.model, Path(models_dir) / trained.metadata["name"], version,
                            dict(trained.metadata))
    return {**read_metadata(out), "path": str(out)}


def train_and_export(name: str, *, epochs: int | None = None, models_dir: str | Path = "models",
                     profile: str = "quick", version: int | None = None, batch_size: int | None = None,
                     seed: int = 0, data: Cifar10 | None = None, progress: bool | str = True,
                     width: float | None = None, depth: int | None = None,
                     augment: bool | None = None, photometric: bool = False, replay: bool = False) -> dict:
    """Train ``name`` (see ``train``) and export it; returns its metadata plus ``path``.

    ``progress``: True shows Keras' progress bar, ``"epoch"`` one line per epoch, False nothing.
    """
    trained = train(name, epochs=epochs, profile=profile, batch_size=batch_size, seed=seed, data=data,
                    progress=progress, width=width, depth=depth, augment=augment, photometric=photometric,
                    replay=replay)
    t0 = time.perf_counter()
    result = export_trained(trained, models_dir, version)
    if progress:
        print(f"{name}: exported version {result['version']} to {result['path']} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return result


def train_augmented(name: str = "cnn", models_dir: str | Path = "models-photometric",
                    progress: bool | str = "epoch") -> dict:
    """The photometric-augmentation model issue 23's measurements use (workbook 06,
    ``bench_hardened --train-augmented``): quick profile, 20 epochs, flips and shifts plus
    ``photometric_jitter``; seeded, so a retrain is the same model."""
    return train_and_export(name, models_dir=models_dir, epochs=20, augment=True, photometric=True,
                            progress=progress)


REPORT_COLUMNS = ("name", "version", "profile", "width", "depth", "params", "epochs", "test_accuracy",
                  "reference_accuracy", "reference_params", "train_seconds", "augment", "budget_s", "train_size",
                  "test_size",
                  "data_source")


def write_report(results: list[dict], report_dir: str | Path = "reports", stem: str = "models"):
    """Merge ``results`` into ``report_dir/<stem>.csv`` and ``.json`` (one row per model,
    newest wins) and return the merged table as a pandas DataFrame."""
    import pandas as pd

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / f"{stem}.json"
    rows = {r["name"]: r for r in (json.loads(json_path.read_text()) if json_path.exists() else [])}
    for r in results:
        rows[r["name"]] = {k: r.get(k) for k in REPORT_COLUMNS}
    ordered = [rows[n] for n in zoo.MODELS if n in rows] + [r for n, r in rows.items() if n not in zoo.MODELS]
    json_path.write_text(json.dumps(ordered, indent=2))
    table = pd.DataFrame(ordered, columns=list(REPORT_COLUMNS))
    table.to_csv(report_dir / f"{stem}.csv", index=False)
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.train --replay results/cpu/models.csv --models cnn lenet --models-dir models-cpu``:
    rebuild the models a results table was measured on (the cpu profile's budget makes the
    epoch count depend on the host; a replay trains the recorded count, same seed) and say
    whether each test accuracy matches the recorded one."""
    import argparse
    import csv

    ap = argparse.ArgumentParser(prog="python -m lab.train", description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--replay", required=True, help="a models.csv of a results folder (name, epochs, test_accuracy)")
    ap.add_argument("--models", nargs="*", default=None, help="only these (default: every row)")
    ap.add_argument("--models-dir", default="models-cpu")
    ap.add_argument("--profile", default="cpu")
    a = ap.parse_args(argv)
    rows = {r["name"]: r for r in csv.DictReader(open(a.replay))}
    names = a.models or list(rows)
    mismatched = 0
    for name in names:
        r = rows[name]
        out = train_and_export(name, epochs=int(r["epochs"]), models_dir=a.models_dir, profile=a.profile,
                               augment=r.get("augment", "True") == "True", replay=True, progress="epoch")
        recorded = float(r["test_accuracy"])
        same = abs(out["test_accuracy"] - recorded) < 5e-5
        mismatched += not same
        print(f"{name}: {int(r['epochs'])} epochs, test accuracy {out['test_accuracy']:.4f} "
              f"(recorded {recorded:.4f}: {'the same model' if same else 'NOT the recorded model'})", flush=True)
    return 1 if mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
