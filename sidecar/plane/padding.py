"""The time layer: cached answers must not come back faster than real ones.

Modes
- ``off``: answers leave as soon as they are ready.
- ``fixed``: every answer, cached or forwarded, is held until ``fixed_target_s``
  after the request arrived (a forward slower than that is not delayed).
- ``distribution`` (default): a cached answer is held until a total latency drawn
  from the recent latencies of forwarded requests of the same model and batch
  size bucket; a forwarded answer is only held up to ``floor_s``.

Latencies are measured inside the sidecar from request arrival to response
ready. The last ~2 ms of a hold yield to the event loop instead of sleeping on
its millisecond-granular timers, so hit latencies track miss latencies rather
than miss + timer overshoot.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Hashable

MODES = ("off", "fixed", "distribution")


def size_bucket(n: int) -> int:
    """Batch sizes share a latency distribution per power of two."""
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class PaddingSettings:
    mode: str = "distribution"
    fixed_target_s: float = 0.0
    floor_s: float = 0.0
    window: int = 200
    fallback_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"padding mode must be one of {MODES}, got {self.mode!r}")
        if self.window < 1:
            raise ValueError("padding window must be >= 1")


class LatencyModel:
    """Recent forwarded latencies per (model, size bucket); pure, no sleeping."""

    def __init__(self, window: int, rng: random.Random | None = None) -> None:
        self._samples: dict[Hashable, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self._rng = rng or random.SystemRandom()

    def observe(self, model: str, n: int, seconds: float) -> None:
        self._samples[(model, size_bucket(n))].append(seconds)

    def sample(self, model: str, n: int) -> float | None:
        bucket = size_bucket(n)
        samples = self._samples.get((model, bucket))
        if samples:
            return self._rng.choice(samples)
        # No forward of this size yet: scale the nearest smaller bucket's sample.
        smaller = [b for (m, b) in self._samples if m == model and b < bucket and self._samples[(m, b)]]
        if smaller:
            b = max(smaller)
            return self._rng.choice(self._samples[(model, b)]) * n / b
        return None

    def count(self, model: str, n: int = 1) -> int:
        return len(self._samples.get((model, size_bucket(n)), ()))


class Padder:
    def __init__(self, settings: PaddingSettings, clock: Callable[[], float] = time.perf_counter,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.latencies = LatencyModel(settings.window, rng)
        self._clock = clock
        self.spin_s = 0.002
        self._late = 0.0  # learned lateness of a wake-up, seconds

    def target(self, model: str, n: int, cached: bool) -> float:
        """Total latency (seconds since arrival) the answer must not beat."""
        s = self.settings
        if s.mode == "off":
            return 0.0
        if s.mode == "fixed":
            return s.fixed_target_s
        if not cached:
            return s.floor_s
        drawn = self.latencies.sample(model, n)
        return max(s.floor_s, drawn if drawn is not None else s.fallback_s)

    def observe_forward(self, model: str, n: int, seconds: float) -> None:
        self.latencies.observe(model, n, seconds)

    async def hold(self, started: float, target_s: float) -> float:
        """Wait until ``started + target_s``; returns the seconds waited.

        The event loop's timers fire up to a millisecond late, which would make
        padded answers measurably slower than the latencies they imitate. So
        sleep until ``spin_s`` before the deadline, then yield to the loop
        (other calls keep running) until the deadline passes. One loop turn
        still overshoots by tens of microseconds; that lateness is learned
        (moving average) and taken off the next deadlines.
        """
        now = self._clock()
        deadline = started + target_s - self._late
        if deadline <= now:
            return 0.0
        coarse = deadline - self.spin_s - now
        if coarse > 0:
            await asyncio.sleep(coarse)
        while self._clock() < deadline:
            await asyncio.sleep(0)
        woke = self._clock()
        error = woke - (started + target_s)  # > 0: still late after compensation
        self._late = min(max(self._late + 0.05 * error, 0.0), self.spin_s)
        return woke - now
