"""The attacker-side distinguisher: exact replays are caught; the default output
policy leaves content that a classifier cannot separate (content features only,
so the result is deterministic for a fixed noise key and fixed images)."""

from __future__ import annotations

import asyncio


from lab.distinguisher import accuracy, observe
from real_sidecar import start_sidecar

KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


async def collect(target, images, **policy):
    server = await start_sidecar(target, mode="paper", noise_key=KEY, **policy)
    try:
        address = f"127.0.0.1:{server.port}"
        hits = await asyncio.to_thread(observe, address, "tiny", images[:120], True, 1)
        misses = await asyncio.to_thread(observe, address, "tiny", images[120:240], False, 2)
    finally:
        await server.stop(0)
    assert server.metrics.registry.get_sample_value(
        "hashguard_cache_answers_total", {"model": "tiny", "mode": "paper", "source": "session"}) == 120
    return hits + misses


async def test_exact_scores_are_caught_by_replay(serving, test_images):
    obs = await collect(serving.target, test_images, score_noise=0.0, score_precision=0)
    acc = accuracy(obs, ("content",))
    print("exact scores:", acc)
    assert acc["rule_accuracy"] >= 0.95


async def test_default_policy_content_is_a_coin_flip(serving, test_images):
    obs = await collect(serving.target, test_images, score_noise=0.05, score_precision=4)
    acc = accuracy(obs, ("content",))
    print("default policy:", acc)
    assert acc["rule_accuracy"] <= 0.55
    assert acc["accuracy"] <= 0.62  # 240 samples: 0.5 +- ~0.06 is chance
