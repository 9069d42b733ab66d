"""Attack harness: black-box attacks through the sidecar, defended and undefended.

The attacker sees only ``Classify``/``ClassifyBatch`` answers (label + scores) of
a sidecar. Both columns of every table come from this one harness:

- ``defended``: a sidecar with the defense on (``--mode paper``);
- ``undefended``: a sidecar with ``--mode off`` on the same serving backend.

One attacker session per run: a run is one (model, attack parameter, defense)
cell; all its images are attacked in that session, in order, as the paper's
attacker would. Image selection (random correctly classified test images)
asks the undefended sidecar in a separate session, so it never touches the
attacker's session; images the model already misclassifies are excluded from
every ASR. The same images, targets and random seeds are used for both defense
settings (common random numbers), so the two columns differ only by the defense.

Profiles (``PROFILES``): ``quick`` (CI: the whole chain in a few minutes on 2
CPU cores, small models, few images, capped iterations) and ``full`` (the
paper's sizes). Notebooks call ``config(section, profile, **overrides)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .attacks import answer_labels
from .attacks import jsma as jsma_mod
from .attacks import onepixel as op_mod
from .client import SidecarPredictor

DEFENDED = "defended"
UNDEFENDED = "undefended"
DEFENSE_OF = {DEFENDED: "on", UNDEFENDED: "off"}


def defense_of(sidecar: str) -> str:
    """Column label of a sidecar: "on"/"off" for the two paper columns, else its name."""
    return DEFENSE_OF.get(sidecar, sidecar)


# The paper's setting for every workbook sidecar: responses carry the model's exact
# score vector (the sidecar's default output hardening -- rounding and keyed score
# noise -- is not part of the paper's method and would change both columns).
PAPER_OUTPUT_ARGS = ["--output", "scores", "--score-precision", "0", "--score-noise", "0"]

# The sidecar's DEFAULT output policy (scores rounded to 4 decimals, keyed log-space
# noise 0.1), with one noise key per run shared by every sidecar that uses it, so a
# defended sidecar and its --mode off twin answer the same query with the same noise.
DEFAULT_OUTPUT_ARGS = ["--noise-key", "{noise_key}"]
TOPK_OUTPUT_ARGS = ["--output", "topk", "--topk", "3", "--noise-key", "{noise_key}"]
LABEL_OUTPUT_ARGS = ["--output", "label", "--noise-key", "{noise_key}"]

# Every sidecar the workbooks use. run_workbooks starts those without ``"start": False``
# as processes on one backend. Attack sidecars run without padding: padding delays
# answers but never changes them. Workbooks 06/07 run every experiment cell against a
# FRESH copy of a named sidecar (``lab.adaptive.fresh_sidecar``: the same flags, a
# real SidecarServer in the notebook's process, empty sessions and cross-session
# memory), so the entries below marked ``"start": False`` are only specs: starting
# them as processes would cost ~0.7 GB and ~3 CPU-seconds each for nothing.
SIDECARS = {
    DEFENDED: {"mode": "paper", "padding": "off", "args": PAPER_OUTPUT_ARGS},
    UNDEFENDED: {"mode": "off", "padding": "off", "args": PAPER_OUTPUT_ARGS},
    "padding_distribution": {"mode": "paper", "padding": "distribution", "args": PAPER_OUTPUT_ARGS},
    "padding_fixed": {"mode": "paper", "padding": "fixed",
                      "args": PAPER_OUTPUT_ARGS + ["--padding-target-ms", "{fixed_target_ms}"]},
    # hardened mode (several anchors per session + cross-session index), paper output
    "hardened": {"mode": "hardened", "padding": "off", "args": PAPER_OUTPUT_ARGS, "start": False},
    # the deployment defaults: default output policy and padding
    "paper_default": {"mode": "paper", "padding": "distribution", "args": DEFAULT_OUTPUT_ARGS, "start": False},
    "hardened_default": {"mode": "hardened", "padding": "distribution", "args": DEFAULT_OUTPUT_ARGS, "start": False},
    "off_default": {"mode": "off", "padding": "distribution", "args": DEFAULT_OUTPUT_ARGS, "start": False},
    # the rest of the distinguisher grid (07): output policy x padding, and --mode off twins
    "paper_default_nopad": {"mode": "paper", "padding": "off", "args": DEFAULT_OUTPUT_ARGS, "start": False},
    "paper_topk": {"mode": "paper", "padding": "distribution", "args": TOPK_OUTPUT_ARGS, "start": False},
    "paper_topk_nopad": {"mode": "paper", "padding": "off", "args": TOPK_OUTPUT_ARGS, "start": False},
    "off_topk": {"mode": "off", "padding": "distribution", "args": TOPK_OUTPUT_ARGS, "start": False},
    "paper_label": {"mode": "paper", "padding": "distribution", "args": LABEL_OUTPUT_ARGS, "start": False},
    "paper_label_nopad": {"mode": "paper", "padding": "off", "args": LABEL_OUTPUT_ARGS, "start": False},
    "off_label": {"mode": "off", "padding": "distribution", "args": LABEL_OUTPUT_ARGS, "start": False},
    "hardened_topk": {"mode": "hardened", "padding": "distribution", "args": TOPK_OUTPUT_ARGS, "start": False},
}

# Attack workbooks: (judgment mode, output policy) -> the sidecar that has them.
MODE_SIDECARS = {
    ("off", "scores_exact"): UNDEFENDED, ("paper", "scores_exact"): DEFENDED,
    ("hardened", "scores_exact"): "hardened",
    ("off", "scores_default"): "off_default", ("paper", "scores_default"): "paper_default",
    ("hardened", "scores_default"): "hardened_default",
    ("off", "topk"): "off_topk", ("paper", "topk"): "paper_topk", ("hardened", "topk"): "hardened_topk",
}

# Distinguisher grid (07): policy -> hit sidecars (padding on / off) and the --mode off twin.
DISTINGUISHER_GRID = {
    "scores_exact": {"hit": {"on": "padding_distribution", "off": DEFENDED}, "miss": UNDEFENDED,
                     "hardened": {"off": "hardened"}},
    "scores_default": {"hit": {"on": "paper_default", "off": "paper_default_nopad"}, "miss": "off_default",
                       "hardened": {"on": "hardened_default"}},
    "topk": {"hit": {"on": "paper_topk", "off": "paper_topk_nopad"}, "miss": "off_topk"},
    "label": {"hit": {"on": "paper_label", "off": "paper_label_nopad"}, "miss": "off_label"},
}

# Timing workbook: padding setting -> the sidecar (all --mode paper) that has it.
PADDING_SIDECARS = {"off": DEFENDED, "distribution": "padding_distribution", "fixed": "padding_fixed"}

ALL_LABELS = 10

# Query-blinding levels of workbook 06 (``lab.adaptive.BlindSpec`` fields): random shift
# (px, edge padding), brightness offset and Gaussian noise per query; ``ensure``: the
# attacker escalates the noise until each query is farther than the threshold from all
# its earlier ones (hash) and its recent ones (pixels).
BLIND_LIGHT = {"name": "light", "max_shift": 1, "brightness": 4.0, "sigma": 4.0, "ensure": False}
BLIND_SHIFT2 = {"name": "shift2_noise8", "max_shift": 2, "brightness": 8.0, "sigma": 8.0, "ensure": False}
BLIND_NOISE16 = {"name": "noise16", "max_shift": 0, "brightness": 8.0, "sigma": 16.0, "ensure": False}
BLIND_ENSURE = {"name": "ensure", "max_shift": 1, "brightness": 4.0, "sigma": 4.0, "ensure": True}

PROFILES: dict[str, dict[str, dict]] = {
    "quick": {
        "jsma": {"models": ["cnn", "lenet"], "thetas": [0.1, 0.2, 0.3, 0.4], "n_images": 5,
                 "gamma": 0.1, "max_iter": 40, "seed": 0},
        "onepixel_targeted": {"models": ["lenet", "resnet"], "pixels": [1, 3, 5], "n_images": 5,
                              "popsize": 40, "maxiter": 5, "seed": 1},
        "onepixel_untargeted": {"models": ["lenet", "resnet"], "pixels": [1, 3, 5], "n_images": 3,
                                "targets_per_image": None, "popsize": 40, "maxiter": 5, "seed": 2},
        "benign": {"models": ["lenet"], "n_images": 200, "seed": 3},
        "timing": {"model": "lenet", "n": 200, "warmup": 20, "paddings": ["off", "distribution", "fixed"],
                   "fixed_target_ms": 20.0, "seed": 4},
        # 06: enough images and pixel counts that the undefended/paper-mode bypasses succeed
        # on some images (so "hardened lower than paper" is measurable), ~1 minute on 2 CPUs
        "adaptive": {"models": ["lenet"], "pixels": [1, 3, 5], "n_images": 8, "popsize": 40, "maxiter": 5,
                     "strategies": ["plain", "interleave", "fresh_session", "fresh_session:c1", "accounts",
                                    "blinding"],
                     "blinding": [BLIND_LIGHT, BLIND_ENSURE], "concurrency": 16, "accounts": 4,
                     "auth_accounts": False, "decoy_pool": 256, "seed": 5},
        "hsj": {"models": ["lenet"], "n_images": 3, "max_iter": 3, "max_eval": 50, "init_eval": 10,
                "init_size": 20, "budget": 400, "strategies": ["plain", "fresh_session"], "seed": 6},
        "hardening_cost": {"model": "lenet", "n_clean": 200, "users": 8, "popular": 10, "per_user": 25, "seed": 7},
        # 07
        "distinguisher": {"model": "lenet", "n": 100, "warmup": 30, "chunk": 10, "paddings": ["on", "off"],
                          "isolation": "process", "seed": 8},
        "oars": {"model": "lenet", "n_images": 3, "budget": 250, "eps": 8.0, "p_init": 0.05, "max_resamples": 6,
                 "policies": ["scores_exact", "scores_default"], "detectors": ["replay"], "seed": 9},
    },
    "full": {
        "jsma": {"models": ["cnn", "lenet", "resnet"], "thetas": [0.1, 0.2, 0.3, 0.4], "n_images": 500,
                 "gamma": 0.1, "max_iter": None, "seed": 0},
        "onepixel_targeted": {"models": ["lenet", "pure_cnn", "net_in_net", "resnet", "densenet", "wide_resnet"],
                              "pixels": [1, 3, 5], "n_images": 500, "popsize": 400, "maxiter": 75, "seed": 1},
        "onepixel_untargeted": {"models": ["lenet", "pure_cnn", "net_in_net", "resnet", "densenet", "wide_resnet"],
                                "pixels": [1, 3, 5], "n_images": 100, "targets_per_image": None,
                                "popsize": 400, "maxiter": 75, "seed": 2},
        "benign": {"models": ["cnn", "lenet", "pure_cnn", "net_in_net", "resnet", "densenet", "wide_resnet"],
                   "n_images": None, "seed": 3},
        "timing": {"model": "resnet", "n": 2000, "warmup": 50, "paddings": ["off", "distribution", "fixed"],
                   "fixed_target_ms": 100.0, "seed": 4},
        "adaptive": {"models": ["lenet", "resnet"], "pixels": [1, 3, 5], "n_images": 100, "popsize": 400,
                     "maxiter": 75,
                     "strategies": ["plain", "interleave", "fresh_session", "fresh_session:c1", "accounts",
                                    "blinding"],
                     "blinding": [BLIND_LIGHT, BLIND_SHIFT2, BLIND_NOISE16, BLIND_ENSURE], "concurrency": 16,
                     "accounts": 4, "auth_accounts": True, "decoy_pool": 1000, "seed": 5},
        "hsj": {"models": ["lenet", "resnet"], "n_images": 50, "max_iter": 20, "max_eval": 1000, "init_eval": 100,
                "init_size": 100, "budget": 10000, "strategies": ["plain", "fresh_session"], "seed": 6},
        "hardening_cost": {"model": "resnet", "n_clean": None, "users": 50, "popular": 50, "per_user": 100,
                           "seed": 7},
        "distinguisher": {"model": "resnet", "n": 300, "warmup": 100, "chunk": 10, "paddings": ["on", "off"],
                          "isolation": "process", "seed": 8},
        "oars": {"model": "resnet", "n_images": 100, "budget": 10000, "eps": 8.0, "p_init": 0.05,
                 "max_resamples": 6, "policies": ["scores_exact", "scores_default", "topk"],
                 "detectors": ["replay", "oracle"], "seed": 9},
    },
}


def config(section: str, profile: str, **overrides) -> dict:
    """The profile's settings for ``section`` with non-None ``overrides`` applied."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = dict(PROFILES[profile][section])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["profile"] = profile
    return cfg


def models_needed(profile: str) -> list[str]:
    """Every model the attack/benign/timing workbooks of ``profile`` use, zoo order."""
    from .zoo import MODELS

    p = PROFILES[profile]
    names = set()
    for sec in ("jsma", "onepixel_targeted", "onepixel_untargeted", "benign", "adaptive", "hsj"):
        names.update(p[sec]["models"])
    for sec in ("timing", "hardening_cost", "distinguisher", "oars"):
        names.add(p[sec]["model"])
    return [m for m in MODELS if m in names] + sorted(names - set(MODELS))


def spec_args(name: str, noise_key: str, fixed_target_ms: float = 0.0) -> tuple[str, ...]:
    """The command-line flags of ``SIDECARS[name]`` with the run's placeholders filled in."""
    return tuple(a.format(fixed_target_ms=fixed_target_ms, noise_key=noise_key)
                 for a in SIDECARS[name].get("args", []))


def sidecar_specs(profile: str, noise_key: str | None = None):
    """``SidecarSpec``s for every sidecar the workbooks of ``profile`` use (one random
    noise key per call unless given: the key of the default output policy)."""
    from .stack import SidecarSpec

    fixed_ms = PROFILES[profile]["timing"]["fixed_target_ms"]
    noise_key = noise_key or os.urandom(16).hex()
    specs = []
    for name, s in SIDECARS.items():
        if not s.get("start", True):
            continue
        args = spec_args(name, noise_key, fixed_ms)
        specs.append(SidecarSpec(name, mode=s["mode"], padding=s["padding"], args=args))
    return specs


# -- endpoints ------------------------------------------------------------------

@dataclass
class Endpoints:
    """Where the sidecars are: ``{name: {"address", "metrics_url", "mode", "padding"}}``."""

    sidecars: dict[str, dict]
    models_dir: Path
    backend: str | None = None

    @classmethod
    def from_json(cls, text: str | dict, models_dir: str | os.PathLike | None = None) -> "Endpoints":
        d = json.loads(text) if isinstance(text, str) else dict(text)
        return cls(d["sidecars"], Path(models_dir or d.get("models_dir") or "models").resolve(), d.get("backend"))

    def address(self, name: str) -> str:
        try:
            return self.sidecars[name]["address"]
        except KeyError:
            raise KeyError(f"no sidecar {name!r} in endpoints; have {sorted(self.sidecars)}") from None

    def config(self) -> dict:
        """Mode, padding and flags of every sidecar (for result provenance)."""
        return {n: {k: d.get(k) for k in ("mode", "padding", "args")} for n, d in self.sidecars.items()}

    def metrics(self, name: str):
        from .client import Metrics

        return Metrics(self.sidecars[name]["metrics_url"])

    def predictor(self, name: str, model: str, session_id: str | None = None, batch: bool = True,
                  **kw) -> SidecarPredictor:
        return SidecarPredictor(self.address(name), model, session_id, batch, **kw)


@contextlib.contextmanager
def connect(endpoints: str | dict | None, models_dir: str | os.PathLike, models: Sequence[str],
            profile: str = "quick", log_dir: str | os.PathLike | None = None) -> Iterator[Endpoints]:
    """Endpoints given by run_workbooks (JSON), or a Stack of our own for a standalone notebook."""
    if endpoints:
        yield Endpoints.from_json(endpoints, models_dir)
        return
    from .stack import Stack

    with Stack(models_dir, models, sidecars=sidecar_specs(profile), log_dir=log_dir) as st:
        yield Endpoints.from_json(st.endpoints(), models_dir)


# -- models and data ------------------------------------------------------------

def latest_version_dir(models_dir: str | os.PathLike, model: str) -> Path:
    from .export import version_dirs

    base = Path(models_dir) / model
    versions = version_dirs(base)
    if not versions:
        raise FileNotFoundError(f"no exported version of {model!r} under {base}")
    return base / str(versions[-1])


def model_info(models_dir: str | os.PathLike, model: str) -> dict:
    """Metadata of the served (latest) version: accuracy, params, profile it was trained in."""
    from .export import read_metadata

    try:
        vdir = latest_version_dir(models_dir, model)
    except FileNotFoundError:
        return {"model": model}
    meta = read_metadata(vdir)
    return {"model": model, "model_version": int(vdir.name),
            "model_test_accuracy": meta.get("test_accuracy"), "model_params": meta.get("params"),
            "model_profile": meta.get("profile"), "model_reference_accuracy": meta.get("reference_accuracy")}


def load_test_set():
    from .cifar10 import load_cifar10

    d = load_cifar10()
    return d.x_test, d.y_test, d.source


def select_correct(reference, x: np.ndarray, y: np.ndarray, n: int | None,
                   rng: np.random.Generator, chunk: int = 256) -> tuple[np.ndarray, dict]:
    """Random test images the reference (undefended) path classifies correctly.

    Returns (indices in random order, stats with how many were examined/correct).
    ``n=None``: all correctly classified images.
    """
    order = rng.permutation(len(x))
    chosen: list[int] = []
    examined = correct = sent = 0
    start = 0
    while start < len(order) and (n is None or len(chosen) < n):
        size = chunk if n is None else min(chunk, max(16, 2 * (n - len(chosen))))
        idx = order[start:start + size]
        start += size
        sent += len(idx)
        labels = answer_labels(reference, np.asarray(reference.predict(x[idx])))
        for i, lab in zip(idx, labels):
            examined += 1
            if lab == y[i]:
                correct += 1
                chosen.append(int(i))
                if n is not None and len(chosen) >= n:
                    break
    return np.asarray(chosen, dtype=np.int64), {
        "examined": examined, "correct": correct, "queries": sent,
        "selection_accuracy": correct / examined if examined else float("nan"),
        "requested": n, "selected": len(chosen),
    }


def random_targets(labels: np.ndarray, rng: np.random.Generator, num_classes: int = ALL_LABELS) -> np.ndarray:
    """One random wrong label per image."""
    off = rng.integers(1, num_classes, size=len(labels))
    return (np.asarray(labels) + off) % num_classes


def _session(kind: str, model: str, param, defense: str) -> str:
    return f"{kind}-{model}-{param}-{defense}-{uuid.uuid4().hex[:8]}"


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _distances(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(hash Hamming distance, differing pixels) between two images: the judgment's measures.

    Attacker-side analysis only (the sidecar never reveals them)."""
    from sidecar.phash import hamming, phash, pixel_diff

    return hamming(phash(a), phash(b)), pixel_diff(a, b)


# -- JSMA -----------------------------------------------------------------------

def run_jsma(ep: Endpoints, model: str, x: np.ndarray, y: np.ndarray, *, thetas: Sequence[float],
             n_images: int, gamma: float, max_iter: int | None, seed: int = 0,
             defenses: Sequence[str] = (UNDEFENDED, DEFENDED), progress: bool = True,
             gradients=None) -> tuple[list[dict], dict]:
    """JSMA on ``model`` for every theta and defense; returns (rows, selection stats)."""
    rng = np.random.default_rng([seed, _stable(model)])
    with ep.predictor(UNDEFENDED, model, session_id=_session("select", model, "jsma", "off")) as ref:
        idx, stats = select_correct(ref, x, y, n_images, rng)
    targets = random_targets(y[idx], rng)
    grads = gradients or jsma_mod.TFGradients(latest_version_dir(ep.models_dir, model))
    rows: list[dict] = []
    bar = _progress(len(thetas) * len(defenses) * len(idx), f"JSMA {model}", progress)
    for theta in thetas:
        for name in defenses:
            sid = _session("jsma", model, theta, defense_of(name))
            with ep.predictor(name, model, session_id=sid) as pred:
                for i, t in zip(idx, targets):
                    q0, t0 = pred.query_count, time.perf_counter()
                    r = jsma_mod.attack(pred, grads, x[i], int(y[i]), int(t), theta=theta, gamma=gamma,
                                        max_iter=max_iter)
                    n_hash, n_pixel = _distances(x[i], r.image)
                    rows.append({
                        "model": model, "theta": theta, "defense": defense_of(name), "sidecar": name,
                        "image_index": int(i), "true_label": int(y[i]), "target": int(t),
                        "success": bool(r.success), "final_label": r.label,
                        "queries": pred.query_count - q0, "iterations": r.iterations, "stop": r.stop,
                        "features_changed": r.features_changed, "pixels_changed": r.pixels_changed,
                        "hash_distance": n_hash, "pixel_distance": n_pixel,
                        "gamma": gamma, "max_iter": max_iter, "seconds": time.perf_counter() - t0,
                        "session_id": sid,
                    })
                    bar.update()
    bar.close()
    return rows, stats


# -- One Pixel Attack -------------------------------------------------------------

def run_onepixel(ep: Endpoints, model: str, x: np.ndarray, y: np.ndarray, *, targeted: bool,
                 pixels: Sequence[int], n_images: int, popsize: int, maxiter: int, seed: int = 0,
                 targets_per_image: int | None = None, defenses: Sequence[str] = (UNDEFENDED, DEFENDED),
                 progress: bool = True) -> tuple[list[dict], dict]:
    """One Pixel Attack on ``model``; returns (rows, selection stats).

    targeted: one random wrong label per image, success when the answer is the target.
    untargeted (the paper's Table 3): every wrong label (or ``targets_per_image``
    random ones) as a DE target in turn, success when the answer differs from the
    true label; rows are per (image, target) attempt.
    """
    rng = np.random.default_rng([seed, _stable(model), int(targeted)])
    with ep.predictor(UNDEFENDED, model, session_id=_session("select", model, "op", "off")) as ref:
        idx, stats = select_correct(ref, x, y, n_images, rng)
    if targeted:
        plan = [(int(i), [int(t)]) for i, t in zip(idx, random_targets(y[idx], rng))]
    else:
        plan = []
        for i in idx:
            wrong = [t for t in range(ALL_LABELS) if t != y[i]]
            if targets_per_image is not None:
                wrong = sorted(rng.choice(wrong, size=min(targets_per_image, len(wrong)), replace=False).tolist())
            plan.append((int(i), wrong))
    # One seed per (image, target, pixels): identical DE randomness in both columns.
    seeds = {(i, t, k): int(rng.integers(2**31)) for i, ts in plan for t in ts for k in pixels}
    cfg_by_k = {k: op_mod.DEConfig(popsize=popsize, maxiter=maxiter) for k in pixels}
    criterion = "target" if targeted else "misclassify"
    kind = "onepixel_targeted" if targeted else "onepixel_untargeted"
    rows: list[dict] = []
    total = len(pixels) * len(defenses) * sum(len(ts) for _, ts in plan)
    bar = _progress(total, f"one-pixel {'T' if targeted else 'U'} {model}", progress)
    for k in pixels:
        for name in defenses:
            sid = _session("op", model, f"{k}px-{criterion}", defense_of(name))
            with ep.predictor(name, model, session_id=sid) as pred:
                for i, ts in plan:
                    for t in ts:
                        q0, t0 = pred.query_count, time.perf_counter()
                        r = op_mod.attack(pred, x[i], int(y[i]), pixels=k, target=t, criterion=criterion,
                                          config=cfg_by_k[k], rng=seeds[(i, t, k)])
                        rows.append({
                            "model": model, "pixels": k, "attack": kind, "defense": defense_of(name),
                            "sidecar": name, "image_index": i, "true_label": int(y[i]), "target": t,
                            "success": bool(r.success), "final_label": r.label,
                            "queries": pred.query_count - q0, "generations": r.generations,
                            "early_stop": r.early_stop, "popsize": popsize, "maxiter": maxiter,
                            "seconds": time.perf_counter() - t0, "session_id": sid,
                            "candidate": json.dumps(r.candidate.tolist()),
                        })
                        bar.update()
    bar.close()
    return rows, stats


def _stable(name: str) -> int:
    """A run-independent integer for a string (Python's hash() is salted)."""
    return zlib.crc32(name.encode())


# -- summaries -------------------------------------------------------------------

METHODS = {
    "jsma": (
        "JSMA as in ART's SaliencyMapMethod with the query loop through the sidecar: each iteration "
        "increases the two features (pixel channels) with the largest gradient of the target class "
        "(from the attacker's local copy of the exported model) by theta on the [0,1] scale, i.e. "
        "round(255*theta) intensity levels, a feature leaving the search space at 255; the clean image "
        "and then every iteration's candidate are classified by the sidecar in the attacker's session; "
        "the attack stops when the sidecar answers the random target (success), when more than a "
        "fraction gamma of the features has been modified, or after max_iter iterations (None: no cap)."),
    "onepixel_targeted": (
        "One Pixel Attack: differential evolution over (x, y, r, g, b) tuples, best1bin, mutation "
        "dithered in (0.5, 1), recombination 1, Latin-hypercube initial population, each population "
        "classified by the sidecar as one ClassifyBatch in the attacker's session; stops at the first "
        "answer equal to the random target; verdict = the sidecar's answer to the returned image."),
    "onepixel_untargeted": (
        "One Pixel Attack, untargeted as in the paper: for each image the DE is run towards every wrong "
        "label in turn (fitness 1 - score[target]); an attempt succeeds when the sidecar's answer differs "
        "from the true label; an image counts as attacked successfully when any of its attempts succeeded "
        "(asr_*), the per-attempt rate is asr_attempts_*."),
}

PAPER_COLUMNS = {
    "jsma": ["model", "theta", "asr_without_defense", "asr_with_defense"],
    "onepixel_targeted": ["model", "pixels", "asr_without_defense", "asr_with_defense"],
    "onepixel_untargeted": ["model", "pixels", "asr_without_defense", "asr_with_defense"],
}

FILES = {
    "jsma": ("jsma_attempts.csv", "table1_jsma.csv"),
    "onepixel_targeted": ("onepixel_targeted_attempts.csv", "table2_onepixel_targeted.csv"),
    "onepixel_untargeted": ("onepixel_untargeted_attempts.csv", "table3_onepixel_untargeted.csv"),
}


def summarize(rows: list[dict], section: str, *, profile: str, models_dir: str | os.PathLike,
              selection: dict[str, dict] | None = None, settings: dict | None = None):
    """Per (model, parameter): the paper's columns plus counts, accuracy and settings.

    ASR = successes / attacked images (all of them correctly classified beforehand).
    For the untargeted table an image counts as a success when ANY of its target
    attempts succeeded (the paper: "when any the predicted label is inconsistent
    with the true label"); the per-attempt rate is reported beside it.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    param = PAPER_COLUMNS[section][1]
    out = []
    for (model, p), g in df.groupby(["model", param], sort=False):
        rec = {"model": model, param: p}
        for defense, suffix in (("off", "without_defense"), ("on", "with_defense")):
            gd = g[g.defense == defense]
            if section == "onepixel_untargeted":
                per_image = gd.groupby("image_index")["success"].any()
                rec[f"asr_{suffix}"] = float(per_image.mean()) if len(per_image) else float("nan")
                rec[f"n_images_{suffix}"] = int(len(per_image))
                rec[f"successes_{suffix}"] = int(per_image.sum())
                rec[f"asr_attempts_{suffix}"] = float(gd.success.mean()) if len(gd) else float("nan")
                rec[f"n_attempts_{suffix}"] = int(len(gd))
            else:
                rec[f"asr_{suffix}"] = float(gd.success.mean()) if len(gd) else float("nan")
                rec[f"n_images_{suffix}"] = int(len(gd))
                rec[f"successes_{suffix}"] = int(gd.success.sum())
            rec[f"mean_queries_{suffix}"] = float(gd.queries.mean()) if len(gd) else float("nan")
        info = model_info(models_dir, model)
        rec.update({k: v for k, v in info.items() if k != "model"})
        if selection and model in selection:
            rec["selection_accuracy"] = selection[model].get("selection_accuracy")
            rec["selection_examined"] = selection[model].get("examined")
        for k, v in (settings or {}).items():
            rec[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
        rec["profile"] = profile
        out.append(rec)
    table = pd.DataFrame(out)
    cols = PAPER_COLUMNS[section] + [c for c in table.columns if c not in PAPER_COLUMNS[section]]
    return table[cols]


def write_results(reports_dir: str | os.PathLike, section: str, rows: list[dict], table, *,
                  profile: str, settings: dict, selection: dict | None = None, extra: dict | None = None) -> dict:
    """Write the per-attempt CSV, the summary table CSV and a JSON of settings/provenance."""
    import pandas as pd

    rd = Path(reports_dir)
    rd.mkdir(parents=True, exist_ok=True)
    attempts, summary = FILES[section]
    pd.DataFrame(rows).to_csv(rd / attempts, index=False)
    table.to_csv(rd / summary, index=False)
    meta = provenance(profile, settings, selection=selection, **(extra or {}))
    meta["files"] = {"attempts": attempts, "table": summary}
    (rd / f"{section}.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    return meta


def provenance(profile: str, settings: dict, **extra) -> dict:
    from .cifar10 import resolve_source

    try:
        source = Path(str(resolve_source())).name
    except Exception:  # noqa: BLE001 - provenance only
        source = None
    return {"profile": profile, "settings": settings, "data_source": source,
            "created_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat(), **extra}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
