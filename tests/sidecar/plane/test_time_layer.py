"""The time layer in the data plane: cached and forwarded answers leave through the
same release, on a deadline fixed before the call is judged. Behaviour only: the
release timer is a recording double, no wall-clock figure is asserted."""

from __future__ import annotations

import asyncio

import pytest

from fake_sidecar import image, one_pixel
from sidecar.backend.base import ModelRef
from sidecar.metrics import Metrics
from sidecar.plane.dataplane import DataPlane, ImageCall, JudgmentSettings
from sidecar.plane.images import Arrays
from sidecar.plane.identity import Caller
from sidecar.plane.padding import Padder, PaddingSettings
from sidecar.judge.policy import OutputPolicy
from sidecar.state.sessions import MemorySessionStore
from sidecar.testing import FakeBackend
from fake_timer import RecordingTimer


class Log(list):
    pass


class SpyPadder(Padder):
    def __init__(self, settings, log):
        self.log, self.timers = log, []
        super().__init__(settings, timer=self._timer)

    def _timer(self, loop):
        self.timers.append(RecordingTimer(loop, self.log))
        return self.timers[-1]

    def deadline(self, started, model, n):
        self.log.append("deadline")
        return super().deadline(started, model, n)


class SpyBackend(FakeBackend):
    def __init__(self, log):
        super().__init__()
        self.log = log

    async def predict(self, key, batch):
        self.log.append("predict")
        return await super().predict(key, batch)


def plane(settings: PaddingSettings, noise: float = 0.2):
    log = Log()
    padder = SpyPadder(settings, log)
    p = DataPlane(JudgmentSettings("paper"), SpyBackend(log), MemorySessionStore(), padder, Metrics("paper"),
                  policy=OutputPolicy(noise=noise, key=b"k" * 16))
    return p, padder, log


def call(img, session="s"):
    return ImageCall("test", ModelRef("m"), Arrays([img]), Caller(peer="ipv4:10.0.0.1:99"), session_id=session)


async def released(p, padder, img, session="s"):
    """Run one call to its release point, check it waits there, then let it go."""
    task = asyncio.create_task(p.infer(call(img, session)))
    for _ in range(50):
        await asyncio.sleep(0)
        if padder.timers and any(not f.done() for _, f in padder.timers[-1].waits):
            break
    assert not task.done(), "an answer left before the release timer fired"
    padder.timers[-1].fire()
    return await task


def sample(p, name, **labels):
    return p.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_hits_and_misses_take_the_same_release_on_a_deadline_fixed_before_judgment():
    p, padder, log = plane(PaddingSettings("distribution"))
    a = image(3)
    for warm in range(3):  # forwards in other sessions give the bucket a target
        await released(p, padder, image(40 + warm), session=f"w{warm}")
    target = padder.target("m", 1)
    assert target > 0
    log.clear()
    miss = await released(p, padder, a)
    assert log == ["deadline", "predict", "release"] and miss.forwarded == 1
    log.clear()
    hit = await released(p, padder, one_pixel(a, 1))
    assert log == ["deadline", "release"] and hit.forwarded == 0
    assert len(padder.timers) == 1 and len(padder.timers[0].waits) == 5  # one timer for every answer
    # both answers went through the output policy: the hit is not a replay of the miss
    assert hit.answers[0].label == miss.answers[0].label
    assert hit.answers[0].scores.tolist() != miss.answers[0].scores.tolist()


async def test_the_deadline_does_not_depend_on_the_cache_decision():
    p, padder, _ = plane(PaddingSettings("fixed", fixed_target_s=0.25))
    a = image(5)
    await released(p, padder, a)
    await released(p, padder, one_pixel(a, 1))
    (d_miss, _), (d_hit, _) = padder.timers[-1].waits
    assert padder.target("m", 1) == 0.25
    # each deadline is its call's arrival + 0.25: arrivals differ, targets do not
    starts = [d - 0.25 for d in (d_miss, d_hit)]
    assert starts[0] < starts[1]


async def test_answers_not_ready_by_their_deadline_are_counted_as_late_by_kind():
    p, padder, _ = plane(PaddingSettings("fixed", fixed_target_s=1e-9))
    a = image(8)
    await released(p, padder, a)
    await released(p, padder, one_pixel(a, 1))
    assert sample(p, "hashguard_padding_late_total", model="m", cached="false") == 1
    assert sample(p, "hashguard_padding_late_total", model="m", cached="true") == 1
    assert sample(p, "hashguard_padding_lateness_seconds_count", model="m") == 2


async def test_on_time_answers_are_not_late_and_off_never_waits():
    p, padder, _ = plane(PaddingSettings("fixed", fixed_target_s=3600.0))
    await released(p, padder, image(9))
    assert sample(p, "hashguard_padding_late_total", model="m", cached="false") == 0
    off, off_padder, log = plane(PaddingSettings("off"))
    out = await off.infer(call(image(9)))  # no timer to fire: returns by itself
    assert out.forwarded == 1 and "release" not in log and not off_padder.timers


@pytest.mark.parametrize("mode", ["distribution", "fixed"])
async def test_only_pure_forwards_feed_the_latency_window(mode):
    p, padder, _ = plane(PaddingSettings(mode, fixed_target_s=0.01))
    a = image(12)
    await released(p, padder, a)
    await released(p, padder, one_pixel(a, 1))
    assert padder.latencies.count("m") == 1


def covered_plane(mode: str = "paper"):
    log = Log()
    padder = SpyPadder(PaddingSettings("fixed", fixed_target_s=0.01), log)
    backend = SpyBackend(log)
    p = DataPlane(JudgmentSettings(mode, cover=True), backend, MemorySessionStore(), padder, Metrics(mode),
                  policy=OutputPolicy(noise=0.0, key=b"k" * 16))
    return p, padder, log, backend


async def test_cover_a_cached_answer_costs_a_forward_and_still_gives_the_anchors_answer():
    p, padder, log, backend = covered_plane()
    a = image(21)
    miss = await released(p, padder, a)
    log.clear()
    hit = await released(p, padder, one_pixel(a, 1))
    assert log == ["deadline", "predict", "release"]  # the same steps as a miss
    assert hit.forwarded == 0 and backend.images == 2
    assert hit.answers[0].scores.tolist() == miss.answers[0].scores.tolist()  # the anchor's answer, not the copy's
    assert sample(p, "hashguard_cover_forwards_total", model="m") == 1
    assert sample(p, "hashguard_forwards_total", model="m", mode="paper") == 1  # cover is not a forward
    assert padder.latencies.count("m") == 1  # nor a latency sample


async def test_a_failed_cover_forward_leaves_the_cached_answer():
    p, padder, _, backend = covered_plane()
    a = image(22)
    miss = await released(p, padder, a)
    backend.fail_with = RuntimeError("backend gone")
    hit = await released(p, padder, one_pixel(a, 1))
    assert hit.answers[0].scores.tolist() == miss.answers[0].scores.tolist()
    assert sample(p, "hashguard_cover_forwards_failed_total", model="m") == 1


async def test_no_cover_for_a_caller_that_gave_up():
    p, padder, log, backend = covered_plane()
    a = image(23)
    await released(p, padder, a)
    log.clear()
    gone = ImageCall("test", ModelRef("m"), Arrays([one_pixel(a, 1)]),
                     Caller(peer="ipv4:10.0.0.1:99", gone=lambda: "cancelled"), session_id="s")
    task = asyncio.create_task(p.infer(gone))
    for _ in range(50):
        await asyncio.sleep(0)
    padder.timers[-1].fire()
    out = await task
    assert out.forwarded == 0 and "predict" not in log and backend.images == 1


async def test_cover_sends_a_mixed_batch_whole_in_hardened_mode():
    from sidecar.state.crosssession import CrossSessionIndex

    log = Log()
    padder = SpyPadder(PaddingSettings("fixed", fixed_target_s=0.01), log)
    backend = SpyBackend(log)
    p = DataPlane(JudgmentSettings("hardened", cover=True), backend, MemorySessionStore(), padder,
                  Metrics("hardened"), CrossSessionIndex(100, 0.0, 0.66, 1),
                  policy=OutputPolicy(noise=0.0, key=b"k" * 16))
    a, b = image(24), image(25)
    first = await released(p, padder, a)
    task = asyncio.create_task(p.infer(ImageCall("test", ModelRef("m"), Arrays([a, b]),
                                                 Caller(peer="ipv4:10.0.0.1:99"), session_id="s")))
    for _ in range(50):
        await asyncio.sleep(0)
    padder.timers[-1].fire()
    out = await task
    assert out.forwarded == 1  # b only
    assert backend.images == 1 + 2  # but the model saw the whole batch, as if nothing were cached
    assert out.answers[0].scores.tolist() == first.answers[0].scores.tolist()
    assert sample(p, "hashguard_cover_forwards_total", model="m") == 1
