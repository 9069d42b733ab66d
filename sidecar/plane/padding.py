"""The time layer: a cached answer must not come back at a different time than a
forwarded one.

Design (issue 24): constant time by construction, not by calibration. When a call
arrives, before anything is judged, its release time is fixed:
``started + target``, where the target depends only on the model, the batch-size
bucket and the recent past, never on whether the answer will come from a cache.
Every answer, cached or forwarded, is then released by the same code: one
``await`` on a future that one timer per event loop completes at that absolute
deadline. A forwarded answer that is not ready by its deadline leaves when it is
ready (the timer fires at once); that tail is counted (``late``) and measured
(how late), because it is the one place where forwards and hits can differ.

Modes
- ``distribution`` (default): one release time per model and batch-size bucket,
  a step of a geometric grid (ratio ``step``) at or above the ``quantile`` of the
  recent forwarded latencies of that bucket (arrival to answer ready, measured
  inside the sidecar) plus ``margin_s``. It moves up as soon as that need rises
  above it and down one step at a time, only while the need is two steps or more
  below it: between load changes every answer of a bucket gets the same target,
  so a cached answer cannot be told apart by where in a spread of targets it
  fell (and the spread does not blur the comparison). With no forward of that
  bucket yet, the nearest bucket's target is used (a smaller one scaled by size,
  a larger one as it is).
- ``fixed``: target = ``fixed_target_s`` for every answer.
- ``off``: answers leave as soon as they are ready (no await at all).
Every mode keeps ``floor_s`` as the least target.

The timer. asyncio's own timers wake through ``epoll_wait``'s millisecond timeout,
rounded up from whenever the loop last went idle: an answer that finished its work
earlier (a hit) would wake at a different offset than one that finished later (a
miss). On Linux the release timer is a ``timerfd`` armed to the absolute deadline
(CLOCK_MONOTONIC, the clock of ``time.perf_counter``) and read by the event loop
like any socket, so the wake-up does not depend on when the loop went idle; other
platforms use ``loop.call_at`` (coarser, see docs/threat-model.md).
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import heapq
import itertools
import math
import os
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Awaitable, Callable

MODES = ("off", "fixed", "distribution")
Bucket = tuple[str, int]  # (model, batch-size bucket)


def size_bucket(n: int) -> int:
    """Batch sizes share a latency distribution per power of two."""
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class PaddingSettings:
    mode: str = "distribution"
    fixed_target_s: float = 0.0
    floor_s: float = 0.0
    window: int = 1000
    quantile: float = 0.99
    margin_s: float = 0.001
    step: float = 2 ** (1 / 6)  # grid ratio of release times: about 12% apart

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"padding mode must be one of {MODES}, got {self.mode!r}")
        if self.window < 1:
            raise ValueError("padding window must be >= 1")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"padding quantile must be within 0..1, got {self.quantile}")
        if not self.margin_s >= 0 or not self.floor_s >= 0 or not self.fixed_target_s >= 0:
            raise ValueError("padding margin, floor and fixed target must be >= 0")
        if not self.step > 1:
            raise ValueError(f"padding step must be > 1, got {self.step}")


_GRID_BASE = 1e-4  # seconds: grid steps are _GRID_BASE * step**k


class Schedule:
    """Release targets per (model, size bucket) on a geometric grid (step ``k`` is
    ``_GRID_BASE * step**k`` seconds), with hysteresis: up at once to the lowest step
    >= need, down one step when the need's step is at least two steps below the
    current one. Pure; driven by ``update``."""

    def __init__(self, step: float) -> None:
        self.step = step
        self._log_step = math.log(step)
        self._steps: dict[Bucket, int] = {}
        self.targets: dict[Bucket, float] = {}

    def index(self, seconds: float) -> int:
        """The lowest grid step at or above ``seconds``."""
        if seconds <= _GRID_BASE:
            return 0
        k = math.ceil(math.log(seconds / _GRID_BASE) / self._log_step)
        return k - 1 if _GRID_BASE * self.step ** (k - 1) >= seconds else k

    def seconds(self, k: int) -> float:
        return _GRID_BASE * self.step ** k

    def grid_up(self, seconds: float) -> float:
        return self.seconds(self.index(seconds))

    def update(self, key: Bucket, need: float) -> float:
        want = self.index(need)
        current = self._steps.get(key)
        if current is None or want > current:
            current = want
        elif want <= current - 2:
            current -= 1
        self._steps[key] = current
        self.targets[key] = target = self.seconds(current)
        return target


class LatencyModel:
    """Recent forwarded latencies per (model, size bucket), kept sorted too, so a
    quantile is one index; pure, no sleeping."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._recent: dict[Bucket, deque[float]] = defaultdict(deque)
        self._sorted: dict[Bucket, list[float]] = defaultdict(list)

    def observe(self, model: str, n: int, seconds: float) -> None:
        key = (model, size_bucket(n))
        recent, ordered = self._recent[key], self._sorted[key]
        if len(recent) >= self._window:
            old = recent.popleft()
            del ordered[bisect.bisect_left(ordered, old)]
        recent.append(seconds)
        bisect.insort(ordered, seconds)

    def quantile(self, model: str, n: int, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the bucket of ``n``; None before its first forward."""
        ordered = self._sorted.get((model, size_bucket(n)))
        if not ordered:
            return None
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def count(self, model: str, n: int = 1) -> int:
        return len(self._recent.get((model, size_bucket(n)), ()))


# ---------------------------------------------------------------------------- release timers
class LoopTimer:
    """Completes futures at absolute ``time.perf_counter`` deadlines with ``loop.call_at``
    (portable; wakes on the loop's millisecond-granular timeout)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def wait(self, deadline: float) -> asyncio.Future:
        fut = self.loop.create_future()
        when = self.loop.time() + (deadline - time.perf_counter())
        self.loop.call_at(when, _complete, fut)
        return fut

    def close(self) -> None:
        pass


def _complete(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC if sys.platform.startswith("linux") else 0
_libc = None


def _timerfd_libc():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                         ctypes.POINTER(_Itimerspec)]
        _libc = libc
    return _libc


class TimerfdTimer:
    """One Linux timerfd per event loop, armed for the earliest pending deadline and
    watched by the loop's selector: the release wakes the loop directly, at the
    deadline (CLOCK_MONOTONIC, nanosecond resolution), whatever the loop was doing
    before. Due futures are completed in deadline order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._libc = _timerfd_libc()
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_FLAGS)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd = fd
        self._heap: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()
        self._armed = math.inf
        self._spec = _Itimerspec()
        loop.add_reader(fd, self._fire)

    def wait(self, deadline: float) -> asyncio.Future:
        fut = self.loop.create_future()
        heapq.heappush(self._heap, (deadline, next(self._seq), fut))
        if deadline < self._armed:
            self._arm(deadline)
        return fut

    def _arm(self, deadline: float) -> None:
        ns = max(1, int(deadline * 1e9))  # all zero would disarm; a past time fires at once
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self._armed = deadline

    def _fire(self) -> None:
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        now = time.perf_counter()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _complete(heapq.heappop(heap)[2])
        self._armed = math.inf
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
        except Exception:  # noqa: BLE001 - the loop may be closed already
            pass
        os.close(self.fd)
        for _, _, fut in self._heap:
            _complete(fut)
        self._heap.clear()


def default_timer(loop: asyncio.AbstractEventLoop):
    """The precise timer where the platform has one, else ``LoopTimer``."""
    if sys.platform.startswith("linux"):
        try:
            return TimerfdTimer(loop)
        except (OSError, AttributeError, NotImplementedError):
            pass  # no timerfd, or a loop without add_reader
    return LoopTimer(loop)


# ---------------------------------------------------------------------------- the padder
class Padder:
    """``deadline`` when a call arrives, ``observe_forward`` when a pure forward is
    ready, ``release`` for every answer. ``clock`` and ``timer`` (a factory
    ``loop -> object with wait(deadline) -> awaitable``) are injectable for tests."""

    def __init__(self, settings: PaddingSettings, clock: Callable[[], float] = time.perf_counter,
                 timer: Callable[[asyncio.AbstractEventLoop], object] = default_timer) -> None:
        self.settings = settings
        self.latencies = LatencyModel(settings.window)
        self.schedule = Schedule(settings.step)
        self._clock = clock
        self._make_timer = timer
        self._timer = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def target(self, model: str, n: int) -> float:
        """Seconds after arrival before which no answer of this call may leave. It
        depends on the model, the batch bucket and recent forwards: the same for a
        call that will be answered from a cache and one that will be forwarded."""
        s = self.settings
        if s.mode == "off":
            return 0.0
        if s.mode == "fixed":
            return max(s.floor_s, s.fixed_target_s)
        bucket = size_bucket(n)
        targets = self.schedule.targets
        target = targets.get((model, bucket))
        if target is None:  # no forward of this size yet: the nearest size's target
            buckets = [b for (m, b) in targets if m == model]
            smaller = [b for b in buckets if b < bucket]
            if smaller:
                target = targets[(model, max(smaller))] * n / max(smaller)
            elif buckets:
                target = targets[(model, min(buckets))]
        return max(s.floor_s, target or 0.0)

    def deadline(self, started: float, model: str, n: int) -> float:
        """The absolute release time (``clock`` seconds) of a call that arrived at ``started``."""
        return started + self.target(model, n)

    def observe_forward(self, model: str, n: int, seconds: float) -> None:
        """A call whose every image was forwarded was ready ``seconds`` after arrival."""
        self.latencies.observe(model, n, seconds)
        if self.settings.mode == "distribution":
            q = self.latencies.quantile(model, n, self.settings.quantile)
            if q is not None:  # always: this forward was just observed
                self.schedule.update((model, size_bucket(n)), q + self.settings.margin_s)

    def timer(self):
        loop = asyncio.get_running_loop()
        if self._timer_loop is not loop:
            if self._timer is not None:
                self._timer.close()
            self._timer, self._timer_loop = self._make_timer(loop), loop
        return self._timer

    async def release(self, deadline: float) -> float:
        """Wait until ``deadline`` (at once if it passed, through the same timer);
        returns the seconds waited. ``off`` never waits."""
        if self.settings.mode == "off":
            return 0.0
        now = self._clock()
        waiter: Awaitable = self.timer().wait(deadline)
        await waiter
        return self._clock() - now

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = self._timer_loop = None
