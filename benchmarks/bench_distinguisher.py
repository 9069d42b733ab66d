"""Can an attacker tell a cached answer from a fresh one? Distinguisher accuracy
per output policy, padding on and off (0.5 = coin flip; target <= 0.55 with
padding on and the default policy)."""

from __future__ import annotations

import os

from lab.cifar10 import load_cifar10
from lab.distinguisher import accuracy, observe
from lab.launcher import Lab as Stack
from lab.launcher import SidecarSpec

POLICIES = {
    "scores_exact": ("--output", "scores", "--score-noise", "0", "--score-precision", "0"),
    "scores_default": (),
    "scores_noise0.05": ("--score-noise", "0.05"),
    "scores_noise0.1": ("--score-noise", "0.1"),
    "topk3": ("--output", "topk", "--topk", "3", "--score-precision", "2"),
    "label": ("--output", "label"),
}


def specs(key: str) -> list[SidecarSpec]:
    out = [SidecarSpec(name, mode="paper", padding="distribution", args=(*flags, "--noise-key", key))
           for name, flags in POLICIES.items()]
    out.append(SidecarSpec("scores_default-nopad", mode="paper", padding="off", args=("--noise-key", key)))
    return out


def interleaved(address: str, model: str, images, chunk: int = 10):
    """Hits and misses from one sidecar in alternating small chunks, so machine
    load drifts the same way for both; a hit and a miss never share an image."""
    hits, misses = [], []
    for i in range(0, len(images), 2 * chunk):
        hits += observe(address, model, images[i:i + chunk], True, seed=i)
        misses += observe(address, model, images[i + chunk:i + 2 * chunk], False, seed=i + 1)
    return hits, misses


def run(models_dir: str = "models", model: str = "cnn", n: int = 300) -> dict:
    images = load_cifar10().x_test
    key = os.urandom(16).hex()
    result = {}
    with Stack(models_dir, [model], sidecars=specs(key)) as st:
        for name in [*POLICIES, "scores_default-nopad"]:
            address = st.sidecar(name).address
            observe(address, model, images[-100:], True, seed=99)  # warm the latency distribution
            hits, misses = interleaved(address, model, images[:2 * n])
            if name == "scores_default-nopad":
                result["scores_default"]["padding_off"] = accuracy(hits + misses)
                continue
            result[name] = {
                "padding_on": accuracy(hits + misses),
                "content_only": accuracy(hits + misses, ("content",)),
            }
    result["default_policy"] = "scores_default"
    result["target_accuracy_at_most"] = 0.55
    return result
