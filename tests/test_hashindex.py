"""HashIndex: exact answers (both strategies agree with brute force), window and
TTL eviction, payloads, radius boundary, validation."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar import hashindex
from sidecar.hashindex import HashIndex
from sidecar.phash import hamming

RADIUS = 25


def rand_hash(rng: np.random.Generator) -> bytes:
    return rng.integers(0, 256, size=32, dtype=np.uint8).tobytes()


def flip(h: bytes, k: int, rng: np.random.Generator) -> bytes:
    bits = np.unpackbits(np.frombuffer(h, dtype=np.uint8))
    bits[rng.choice(256, size=k, replace=False)] ^= 1
    out = np.packbits(bits).tobytes()
    assert hamming(h, out) == k
    return out


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def reference(live: list[tuple[int, bytes]], q: bytes, radius: int) -> list[tuple[int, int]]:
    """(distance, payload) within radius, closest first, most recent first on ties."""
    hits = [(hamming(q, h), i) for i, h in live if hamming(q, h) <= radius]
    return sorted(hits, key=lambda t: (t[0], -t[1]))


# strategy configurations: brute force; MIH with the candidate path forced; MIH with
# the "too many candidates, scan instead" fallback forced; MIH with its cost model
CONFIGS = {
    "brute": dict(mih_threshold=10**9),
    "mih": dict(mih_threshold=0, segment=64),
    "mih-candidates": dict(mih_threshold=0, segment=50, cost=0),
    "mih-fallback": dict(mih_threshold=0, segment=64, cost=10**9),
}


def make(config: str, window: int, monkeypatch, **kw) -> HashIndex:
    opts = dict(CONFIGS[config])
    if "cost" in opts:
        monkeypatch.setattr(hashindex, "_CANDIDATE_COST", opts.pop("cost"))
    return HashIndex(window, **opts, **kw)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_exact_vs_bruteforce_random_and_planted(config, monkeypatch):
    rng = np.random.default_rng(1)
    window = 500
    ix = make(config, window, monkeypatch)
    hashes: list[bytes] = []
    for i in range(3 * window + 37):  # wraps the ring several times, seals many segments
        if hashes and rng.random() < 0.4:  # near-duplicate clusters -> ties and dense buckets
            h = flip(hashes[int(rng.integers(len(hashes)))], int(rng.integers(0, 8)), rng)
        else:
            h = rand_hash(rng)
        hashes.append(h)
        ix.add(h, i)
    assert len(ix) == window
    live = list(enumerate(hashes))[-window:]
    if config != "brute":
        assert ix.strategy == "mih"
    for _ in range(150):
        base = hashes[-1 - int(rng.integers(window + 100))]  # some already evicted
        d = int(rng.integers(0, RADIUS + 3))  # planted at 0 .. radius + 2
        q = flip(base, d, rng) if rng.random() < 0.8 else rand_hash(rng)
        r = int(rng.choice([0, 5, 15, 16, 25, 31, 32, 40]))
        want = reference(live, q, r)
        assert ix.nearest(q, r) == (want[0] if want else None)
        assert ix.within(q, r) == want
        assert ix.within(q, r, limit=2) == want[:2]


@pytest.mark.parametrize("config", ["brute", "mih"])
def test_strategies_agree_on_the_same_stream(config, monkeypatch):
    rng = np.random.default_rng(7)
    a = make("brute", 300, monkeypatch)
    b = make(config, 300, monkeypatch)
    stream = [rand_hash(rng) for _ in range(700)]
    for i, h in enumerate(stream):
        a.add(h, i)
        b.add(h, i)
    for _ in range(100):
        q = flip(stream[-1 - int(rng.integers(300))], int(rng.integers(0, 30)), rng)
        assert a.nearest(q, RADIUS) == b.nearest(q, RADIUS)


@pytest.mark.parametrize("config", ["mih", "mih-candidates"])
def test_queries_between_adds_while_tables_are_built(config, monkeypatch):
    # a full segment gets its 16 substring tables over the next 16 adds: query at every step
    rng = np.random.default_rng(13)
    window = 120
    ix = make(config, window, monkeypatch)
    hashes: list[bytes] = []
    for i in range(400):
        h = flip(hashes[-int(rng.integers(1, len(hashes) + 1))], int(rng.integers(0, 10)), rng) \
            if hashes and rng.random() < 0.5 else rand_hash(rng)
        hashes.append(h)
        ix.add(h, i)
        live = list(enumerate(hashes))[-window:]
        q = flip(hashes[-1 - int(rng.integers(min(len(hashes), window + 20)))], int(rng.integers(0, 28)), rng)
        want = reference(live, q, RADIUS)
        assert ix.nearest(q, RADIUS) == (want[0] if want else None)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_radius_boundary(config, monkeypatch):
    rng = np.random.default_rng(2)
    ix = make(config, 200, monkeypatch)
    for i in range(200):
        ix.add(rand_hash(rng), -1)
    stored = rand_hash(rng)
    ix.add(stored, "target")
    for d in (0, 1, RADIUS - 1, RADIUS, RADIUS + 1, RADIUS + 2):
        q = flip(stored, d, rng)
        got = ix.nearest(q, RADIUS)
        if d <= RADIUS:
            assert got == (d, "target")
        else:
            assert got is None or got[1] != "target"
    q = flip(stored, RADIUS, rng)
    assert ix.nearest(q, RADIUS - 1) is None or ix.nearest(q, RADIUS - 1)[1] != "target"


@pytest.mark.parametrize("config", ["brute", "mih"])
def test_ties_go_to_the_most_recent(config, monkeypatch):
    rng = np.random.default_rng(3)
    ix = make(config, 100, monkeypatch)
    h = rand_hash(rng)
    for i in range(100):
        ix.add(h if i % 10 == 0 else rand_hash(rng), i)
    assert ix.nearest(h, 0) == (0, 90)
    assert [p for _, p in ix.within(h, 0)] == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]


def test_payload_is_returned_as_is():
    rng = np.random.default_rng(4)
    ix: HashIndex[object] = HashIndex(10)
    payload = {"label": 3, "probs": [0.1, 0.9]}
    h = rand_hash(rng)
    ix.add(h, payload)
    d, got = ix.nearest(flip(h, 3, rng), RADIUS)
    assert d == 3 and got is payload
    assert ix.nearest(rand_hash(rng), RADIUS) is None  # random hashes are ~128 apart


@pytest.mark.parametrize("config", ["brute", "mih"])
def test_window_evicts_oldest_first(config, monkeypatch):
    rng = np.random.default_rng(5)
    ix = make(config, 100, monkeypatch)
    hs = [rand_hash(rng) for _ in range(130)]
    for i, h in enumerate(hs):
        ix.add(h, i)
        assert len(ix) == min(i + 1, 100)
    assert ix.evictions == {"window": 30, "ttl": 0}
    for i in range(30):
        assert ix.nearest(hs[i], 0) is None
    for i in range(30, 130):
        assert ix.nearest(hs[i], 0) == (0, i)


def test_window_of_one():
    rng = np.random.default_rng(6)
    ix: HashIndex[int] = HashIndex(1)
    a, b = rand_hash(rng), rand_hash(rng)
    ix.add(a, 1)
    ix.add(b, 2)
    assert ix.nearest(a, 0) is None and ix.nearest(b, 0) == (0, 2)
    assert len(ix) == 1 and ix.evictions["window"] == 1


@pytest.mark.parametrize("config", ["brute", "mih"])
def test_ttl_with_fake_clock(config, monkeypatch):
    rng = np.random.default_rng(8)
    clock = FakeClock()
    ix = make(config, 1000, monkeypatch, ttl_s=10.0, clock=clock)
    hs = [rand_hash(rng) for _ in range(300)]
    for i, h in enumerate(hs):  # 100 entries at t=100, 101, 102
        clock.t = 100.0 + i // 100
        ix.add(h, i)
    clock.t = 109.999
    assert len(ix) == 300 and ix.nearest(hs[0], 0) == (0, 0)
    clock.t = 110.0  # age == ttl: expired
    assert ix.nearest(hs[0], 0) is None
    assert ix.nearest(hs[99], 0) is None and ix.nearest(hs[100], 0) == (0, 100)
    assert len(ix) == 200
    assert ix.evictions == {"window": 0, "ttl": 100}
    near = flip(hs[150], 7, rng)
    assert ix.nearest(near, RADIUS) == (7, 150)
    assert ix.within(hs[50], RADIUS) == []
    clock.t = 1000.0
    assert len(ix) == 0 and ix.nearest(hs[250], 0) is None
    assert ix.evictions == {"window": 0, "ttl": 300}
    assert all(p is None for p in ix._payloads)  # expired payloads are released
    ix.add(hs[0], "again")  # usable after everything expired
    assert ix.nearest(hs[0], 0) == (0, "again") and len(ix) == 1


def test_ttl_and_window_count_each_entry_once():
    rng = np.random.default_rng(9)
    clock = FakeClock(0.0)
    ix: HashIndex[int] = HashIndex(10, ttl_s=5.0, clock=clock, mih_threshold=0, segment=4)
    for i in range(20):  # a burst: the window pushes out the first 10
        ix.add(rand_hash(rng), i)
    assert ix.evictions == {"window": 10, "ttl": 0}
    clock.t = 5.0  # the other 10 expire: counted once, as ttl
    ix.add(rand_hash(rng), 20)
    assert len(ix) == 1 and ix.evictions == {"window": 10, "ttl": 10}
    for i in range(21, 40):  # refill past the window at t=5: only window evictions
        ix.add(rand_hash(rng), i)
    assert len(ix) == 10 and ix.evictions == {"window": 20, "ttl": 10}


def test_clock_going_backwards_keeps_order():
    rng = np.random.default_rng(10)
    clock = FakeClock(50.0)
    ix: HashIndex[int] = HashIndex(10, ttl_s=5.0, clock=clock)
    h1, h2 = rand_hash(rng), rand_hash(rng)
    ix.add(h1, 1)
    clock.t = 40.0  # stamped as 50, not 40
    ix.add(h2, 2)
    clock.t = 54.0
    assert len(ix) == 2
    clock.t = 55.0
    assert len(ix) == 0


def test_hash_length_and_argument_validation():
    ix: HashIndex[int] = HashIndex(10)
    for bad in (b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 64):
        with pytest.raises(ValueError):
            ix.add(bad, 1)
        with pytest.raises(ValueError):
            ix.nearest(bad, 5)
        with pytest.raises(ValueError):
            ix.within(bad, 5)
    ix.add(bytearray(32), 1)  # any bytes-like of 32 bytes
    assert ix.nearest(memoryview(bytes(32)), 0) == (0, 1)
    with pytest.raises(ValueError):
        ix.nearest(bytes(32), -1)
    for kw in ({"window": 0}, {"window": 5, "ttl_s": -1}, {"window": 5, "mih_threshold": -1},
               {"window": 100, "mih_threshold": 0, "segment": 101}):
        with pytest.raises(ValueError):
            HashIndex(**kw)


def test_strategy_switches_with_size_and_large_radius_is_exact(monkeypatch):
    rng = np.random.default_rng(11)
    ix: HashIndex[int] = HashIndex(400, mih_threshold=150, segment=64)
    hs = [rand_hash(rng) for _ in range(400)]
    for i, h in enumerate(hs):
        ix.add(h, i)
        if i + 1 == 150:
            assert ix.strategy == "brute"
    assert ix.strategy == "mih"
    assert ix.memory_bytes() > 400 * 32
    q = flip(hs[123], 60, rng)  # radius 60 > 47: per-substring radius 3, scanned instead
    assert ix.nearest(q, 60) == (60, 123)
    assert ix.nearest(hs[5], 256)[0] == 0 and len(ix.within(hs[5], 256)) == 400
    forced: HashIndex[int] = HashIndex(100, mih_threshold=0)
    forced.add(hs[0], 0)
    assert HashIndex(10).strategy == "brute" and forced.strategy == "mih"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_complement_is_256_apart_not_0(config, monkeypatch):
    rng = np.random.default_rng(12)
    ix = make(config, 300, monkeypatch)
    hs = [rand_hash(rng) for _ in range(300)]
    for i, h in enumerate(hs):
        ix.add(h, i)
    comp = bytes(255 - b for b in hs[200])
    assert ix.nearest(comp, 0) is None
    assert all(p != 200 for _, p in ix.within(comp, 255))
    assert (256, 200) in ix.within(comp, 256)


def test_empty_index():
    ix: HashIndex[int] = HashIndex(1000, mih_threshold=0, segment=10)
    assert len(ix) == 0 and ix.nearest(bytes(32), 256) is None and ix.within(bytes(32), 10) == []
