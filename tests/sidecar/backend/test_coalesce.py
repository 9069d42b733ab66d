"""CoalescingBackend: forwards beyond the in-flight limit go to the model together, and
every caller gets exactly its own rows; judgment and errors are unchanged."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sidecar.backend.base import ModelKey, ModelRef
from sidecar.backend.coalesce import CoalescingBackend
from sidecar.config import Settings
from sidecar.plane.dataplane import ImageCall
from sidecar.plane.images import Arrays
from sidecar.errors import BackendUnavailable
from sidecar.plane.identity import Caller
from sidecar.metrics import Metrics
from sidecar.server import build_plane
from sidecar.testing import FakeBackend, fake_scores

KEY = ModelKey("m", 2)


def batches(n: int, seed: int = 0, size: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, 32, 32, 3)).astype(np.float32) for _ in range(n)]


def own_scores(batch: np.ndarray) -> np.ndarray:
    return np.stack([fake_scores(img, KEY.version, 10) for img in batch])


@pytest.mark.asyncio
async def test_a_lone_forward_goes_out_at_once_and_alone():
    inner = FakeBackend()
    be = CoalescingBackend(inner, inflight=1, max_batch=64)
    (b,) = batches(1)
    scores, version = await be.predict(KEY, b)
    assert inner.calls["predict"] == 1 and be.batches == 0 and version == 2
    np.testing.assert_array_equal(scores, own_scores(b))


@pytest.mark.asyncio
async def test_forwards_beyond_the_limit_share_one_call_and_get_their_own_rows():
    inner = FakeBackend()
    inner.delay_s = 0.05
    be = CoalescingBackend(inner, inflight=1, max_batch=64)
    bs = batches(6, size=2)
    results = await asyncio.gather(*(be.predict(KEY, b) for b in bs))
    assert inner.calls["predict"] == 2  # the first alone, the five that waited together
    assert be.batches == 1 and inner.images == 12
    for b, (scores, version) in zip(bs, results):
        np.testing.assert_array_equal(scores, own_scores(b))
        assert version == 2


@pytest.mark.asyncio
async def test_a_batch_never_exceeds_max_batch():
    inner = FakeBackend()
    inner.delay_s = 0.02
    sizes = []
    original = inner.predict

    async def recording(key, batch):
        sizes.append(len(batch))
        return await original(key, batch)

    inner.predict = recording
    be = CoalescingBackend(inner, inflight=1, max_batch=5)
    bs = batches(12, size=2)
    results = await asyncio.gather(*(be.predict(KEY, b) for b in bs))
    assert max(sizes) <= 5 and sum(sizes) == 24
    for b, (scores, _) in zip(bs, results):
        np.testing.assert_array_equal(scores, own_scores(b))


@pytest.mark.asyncio
async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_call_works():
    inner = FakeBackend()
    inner.delay_s = 0.02
    be = CoalescingBackend(inner, inflight=1, max_batch=64)
    inner.fail_with = BackendUnavailable("backend down")
    results = await asyncio.gather(*(be.predict(KEY, b) for b in batches(4)), return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) for r in results)
    inner.fail_with = None
    (b,) = batches(1, seed=5)
    np.testing.assert_array_equal((await be.predict(KEY, b))[0], own_scores(b))
    assert be._lanes == {}  # nothing left behind


@pytest.mark.asyncio
async def test_a_caller_that_went_away_is_not_sent():
    inner = FakeBackend()
    inner.delay_s = 0.05
    be = CoalescingBackend(inner, inflight=1, max_batch=64)
    bs = batches(3)
    first = asyncio.create_task(be.predict(KEY, bs[0]))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(be.predict(KEY, bs[1]))
    stays = asyncio.create_task(be.predict(KEY, bs[2]))
    await asyncio.sleep(0.01)
    gone.cancel()
    await first
    scores, _ = await stays
    np.testing.assert_array_equal(scores, own_scores(bs[2]))
    assert inner.images == 2  # bs[0] and bs[2]; the cancelled caller's image never left


@pytest.mark.asyncio
async def test_through_the_data_plane_each_session_is_judged_as_without_batching():
    """Eight sessions at once, each an anchor then a 1-pixel copy: the copies are answered
    from their own session's anchor, the anchors by the model, with batching on and off."""
    rng = np.random.default_rng(1)
    anchors = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    copies = anchors.copy()
    copies[:, 0, 0] ^= 1

    async def run(inflight: int):
        inner = FakeBackend()
        inner.delay_s = 0.01
        plane = build_plane(Settings(mode="paper", padding="off", backend_inflight=inflight), Metrics("paper"), inner)

        async def ask(i, img):
            call = ImageCall("Classify", ModelRef("m"), Arrays(img[None]), Caller(peer="ipv4:10.0.0.1:1"), f"s{i}")
            return await plane.infer(call)

        first = await asyncio.gather(*(ask(i, a) for i, a in enumerate(anchors)))
        second = await asyncio.gather(*(ask(i, c) for i, c in enumerate(copies)))
        return inner, [o.answers[0].label for o in first], [o.answers[0].label for o in second], \
            [o.forwarded for o in second]

    inner_on, first_on, second_on, fwd_on = await run(1)
    inner_off, first_off, second_off, fwd_off = await run(0)
    assert first_on == first_off and second_on == second_off == first_on
    assert fwd_on == fwd_off == [0] * 8
    assert inner_on.images == inner_off.images == 8
    assert inner_on.calls["predict"] < inner_off.calls["predict"] == 8  # fewer, bigger calls
    assert isinstance(build_plane(Settings(backend_inflight=0), Metrics("paper"), FakeBackend()).backend, FakeBackend)
