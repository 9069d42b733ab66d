"""Experiment sizes per profile and the sidecars the workbooks talk to.

``quick`` (CI: the whole chain in minutes on 2 CPU cores; shows the pipeline works, not
the paper's numbers), ``cpu`` (Tables 1-3 at n >= 100 per cell on all six zoo models in
about 3 h on 2 cores: DE cut to ``population`` x ``max_iter``, ``de_check`` measures the
cut at the paper's 400 x 75 on a subset; the other sections are quick's) and ``full``
(the paper's sizes). Another profile is one more
entry of ``PROFILES`` with the same keys. ``config(section, profile, **overrides)``
gives a section's settings with the notebook's non-None parameters applied.

``SIDECARS``: name -> ``SidecarSpec``. Attack sidecars are named by their judgment
mode (``off``, ``paper``, ``hardened``), so a row's ``defense`` is its sidecar's name;
all of them answer with the model's exact scores (the paper's output: rounding and
keyed noise are not part of its method). ``{noise_key}`` and ``{fixed_ms}`` are
filled in per run by ``specs``.
"""

from __future__ import annotations

import os

from .launcher import SidecarSpec

EXACT = ("--output", "scores", "--score-precision", "0", "--score-noise", "0")
KEYED = ("--noise-key", "{noise_key}")  # the deployment default: rounded scores + keyed noise

SIDECARS = {
    "off": SidecarSpec("off", mode="off", args=EXACT),
    "paper": SidecarSpec("paper", mode="paper", args=EXACT),
    "hardened": SidecarSpec("hardened", mode="hardened", args=EXACT),
    "paper_pad_distribution": SidecarSpec("paper_pad_distribution", mode="paper", padding="distribution", args=EXACT),
    "paper_pad_fixed": SidecarSpec("paper_pad_fixed", mode="paper", padding="fixed",
                                   args=EXACT + ("--padding-target-ms", "{fixed_ms}")),
    # 07: the default output policy (and top-k / label only), padding on or off, and --mode off twins
    "paper_default": SidecarSpec("paper_default", mode="paper", padding="distribution", args=KEYED),
    "paper_default_nopad": SidecarSpec("paper_default_nopad", mode="paper", args=KEYED),
    "off_default": SidecarSpec("off_default", mode="off", padding="distribution", args=KEYED),
    "hardened_default": SidecarSpec("hardened_default", mode="hardened", padding="distribution", args=KEYED),
    "paper_topk": SidecarSpec("paper_topk", mode="paper", padding="distribution",
                              args=("--output", "topk", "--topk", "3") + KEYED),
    "off_topk": SidecarSpec("off_topk", mode="off", padding="distribution", args=("--output", "topk", "--topk", "3") + KEYED),
    "paper_label": SidecarSpec("paper_label", mode="paper", padding="distribution", args=("--output", "label") + KEYED),
    "off_label": SidecarSpec("off_label", mode="off", padding="distribution", args=("--output", "label") + KEYED),
}

# 06 query-blinding levels (lab.routing.BlindSpec fields)
BLIND_LIGHT = {"name": "light", "max_shift": 1, "brightness": 4.0, "sigma": 4.0, "ensure": False}
BLIND_ENSURE = {"name": "ensure", "max_shift": 1, "brightness": 4.0, "sigma": 4.0, "ensure": True}
BLIND_NOISE16 = {"name": "noise16", "max_shift": 0, "brightness": 8.0, "sigma": 16.0, "ensure": False}

ZOO6 = ["lenet", "pure_cnn", "net_in_net", "resnet", "densenet", "wide_resnet"]

PROFILES: dict[str, dict[str, dict]] = {
    "quick": {
        "train": {"models": ["cnn", "lenet", "resnet"]},
        # quick: off and paper only (the CI chain's time); hardened cells are tested on their own
        "jsma": {"models": ["cnn", "lenet"], "thetas": [0.1, 0.2, 0.3, 0.4], "n_images": 5, "gamma": 0.03, "seed": 0,
                 "defenses": ["off", "paper"]},
        "onepixel_targeted": {"models": ["lenet", "resnet"], "pixels": [1, 3, 5], "n_images": 5, "max_iter": 2,
                              "seed": 1, "defenses": ["off", "paper"]},
        "onepixel_untargeted": {"models": ["lenet", "resnet"], "pixels": [1, 3, 5], "n_images": 5, "max_iter": 2,
                                "seed": 2, "defenses": ["off", "paper"]},
        "benign": {"models": ["lenet"], "n_images": 200, "seed": 3},
        "timing": {"model": "lenet", "n": 200, "warmup": 20, "paddings": ["off", "distribution", "fixed"],
                   "fixed_ms": 20.0, "seed": 4},
        "adaptive": {"model": "lenet", "pixels": [1, 3], "n_images": 4, "max_iter": 2,
                     "strategies": ["plain", "interleave", "fresh_session", "accounts", "blinding"],
                     "blinding": [BLIND_LIGHT, BLIND_ENSURE], "accounts": 4, "concurrency": 16, "seed": 5},
        "decision": {"model": "lenet", "n_images": 3, "attacks": ["HopSkipJump", "SimBA"],
                     "strategies": ["plain", "fresh_session"], "hsj_max_iter": 3, "hsj_max_eval": 50,
                     "hsj_init_eval": 10, "simba_max_iter": 200, "simba_epsilon": 24.0, "max_queries": 5_000,
                     "seed": 6},
        "blinding": {"model": "lenet", "n_images": 2, "routers": ["phash_masks", "lowpass_masks", "random_blinding"],
                     "eps": 16.0, "max_iter": 1, "defenses": ["paper", "hardened"], "seed": 10},
        "hardening_cost": {"model": "lenet", "n_clean": 200, "users": 8, "popular": 10, "per_user": 25, "seed": 7},
        "distinguisher": {"model": "lenet", "n": 100, "warmup": 30, "chunk": 10, "seed": 8},
        "oars": {"model": "lenet", "n_images": 3, "max_iter": 150, "eps": 8.0, "p_init": 0.05, "max_resamples": 6,
                 "defenses": ["off", "paper", "hardened"], "seed": 9},
    },
    "full": {
        "train": {"models": ["cnn", *ZOO6]},
        "jsma": {"models": ["cnn", "lenet", "resnet"], "thetas": [0.1, 0.2, 0.3, 0.4], "n_images": 500,
                 "gamma": 0.1, "seed": 0},
        "onepixel_targeted": {"models": ZOO6, "pixels": [1, 3, 5], "n_images": 500, "max_iter": 75, "seed": 1},
        "onepixel_untargeted": {"models": ZOO6, "pixels": [1, 3, 5], "n_images": 100, "max_iter": 75, "seed": 2},
        "benign": {"models": ["cnn", *ZOO6], "n_images": None, "seed": 3},
        "timing": {"model": "resnet", "n": 2000, "warmup": 50, "paddings": ["off", "distribution", "fixed"],
                   "fixed_ms": 100.0, "seed": 4},
        "adaptive": {"model": "resnet", "pixels": [1, 3, 5], "n_images": 100, "max_iter": 75,
                     "strategies": ["plain", "interleave", "fresh_session", "accounts", "blinding"],
                     "blinding": [BLIND_LIGHT, BLIND_NOISE16, BLIND_ENSURE], "accounts": 4, "concurrency": 16,
                     "seed": 5},
        "decision": {"model": "resnet", "n_images": 50, "attacks": ["HopSkipJump", "SimBA"],
                     "strategies": ["plain", "fresh_session"], "hsj_max_iter": 20, "hsj_max_eval": 1000,
                     "hsj_init_eval": 100, "simba_max_iter": 3000, "simba_epsilon": 24.0, "max_queries": 100_000,
                     "seed": 6},
        "blinding": {"model": "resnet", "n_images": 100, "routers": ["phash_masks", "lowpass_masks", "random_blinding"],
                     "eps": 16.0, "max_iter": 10, "defenses": ["paper", "hardened"], "seed": 10},
        "hardening_cost": {"model": "resnet", "n_clean": None, "users": 50, "popular": 50, "per_user": 100, "seed": 7},
        "distinguisher": {"model": "resnet", "n": 300, "warmup": 100, "chunk": 10, "seed": 8},
        "oars": {"model": "resnet", "n_images": 100, "max_iter": 10000, "eps": 8.0, "p_init": 0.05,
                 "max_resamples": 6, "defenses": ["off", "paper", "hardened"], "seed": 9},
    },
}


PROFILES["cpu"] = {
    **PROFILES["quick"],
    "train": {"models": ["cnn", *ZOO6]},
    "jsma": {"models": ["cnn", "lenet", "resnet"], "thetas": [0.1, 0.2, 0.3, 0.4], "n_images": 100, "gamma": 0.1,
             "seed": 0},
    "onepixel_targeted": {"models": ZOO6, "pixels": [1, 3, 5], "n_images": 100, "max_iter": 10, "population": 100,
                          "seed": 1},
    "onepixel_untargeted": {"models": ZOO6, "pixels": [1, 3, 5], "n_images": 100, "max_iter": 10, "population": 100,
                            "seed": 2},
    # the paper's DE (400 x 75) on the first images of the same selection, undefended only
    "de_check": {"models": ["lenet", "resnet"], "pixels": [3], "n_images": 20, "max_iter": 75, "population": 400,
                 "defenses": ["off"]},
}


def config(section: str, profile: str, **overrides) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = dict(PROFILES[profile][section])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return {**cfg, "profile": profile}


def models_needed(profile: str) -> list[str]:
    from .zoo import MODELS

    p, names = PROFILES[profile], set()
    for sec in p.values():
        names.update(sec.get("models", []))
        if "model" in sec:
            names.add(sec["model"])
    return [m for m in MODELS if m in names]


def specs(*names: str, noise_key: str | None = None, fixed_ms: float = 20.0) -> list[SidecarSpec]:
    """The named sidecars with this run's noise key (one per call unless given) filled in."""
    key = noise_key or os.urandom(16).hex()
    out = []
    for n in names:
        s = SIDECARS[n]
        out.append(SidecarSpec(s.name, s.mode, s.padding, tuple(a.format(noise_key=key, fixed_ms=fixed_ms)
                                                              for a in s.args)))
    return out
