"""Cross-session index of recently forwarded images' 256-bit perceptual hashes.

``HashIndex`` keeps the ``window`` most recent (hash, payload) entries (FIFO: the
oldest goes first when a new one arrives at a full window), optionally forgets
entries older than ``ttl_s`` (age >= ttl_s: expired), and answers "closest live
entry within Hamming radius r" exactly. It is pure: no I/O, no threads, no
asyncio. It is NOT thread-safe (it reuses scratch buffers): serialize calls,
e.g. with one lock.

Layout
------
- Ring buffer ``np.uint64[ring, 4]`` of packed hashes (``ring`` = window, rounded
  up to a multiple of the MIH segment size when MIH is on), ``slot = seq % ring``
  where ``seq`` counts every ``add``. Live entries are always the contiguous seq
  range ``[live, head)``, at most ``window`` long: the window evicts the oldest
  and, as timestamps only grow with ``seq``, so does the TTL. Expired entries are
  dropped lazily (on the next call): ``live`` moves forward by a binary search
  over the timestamps and their payloads are released.
- Hashes are stored with their bits shuffled by one fixed permutation (Hamming
  distance is invariant under it). It only matters for multi-index hashing: real
  pHashes are far from uniform (about 30% of bits set; high DCT frequencies are
  mostly 0), and shuffling spreads the biased bits over the substrings: about
  1.5x fewer candidates on CIFAR-10 pHashes than the natural row-by-row split.
- Distances: XOR against the query tiled to a (rows, 4) block (a broadcast
  4-word row makes numpy run its inner loop 4 elements at a time, 2x slower),
  ``np.bitwise_count``, and the 4 per-word counts summed as the top byte of
  ``uint32 * 0x01010101`` (numpy's sum over a length-4 axis is slow). That byte
  sum wraps only at 256 (an exact complement), so hits are recounted exactly.

Search strategies (same answers, checked against each other in the tests)
-------------------------------------------------------------------------
- ``brute``: the distance pipeline over the live ring rows, 16k rows at a time
  (scratch stays in L2): ~3.5 ns/entry, 3.5-4 ms for 1M entries on this host.
- ``mih``: multi-index hashing (Norouzi, Punjani, Fleet, CVPR 2012). The 256
  bits are cut into m = 16 substrings of 16 bits. If d(h, g) <= r then, for ANY
  per-substring radii r_j with sum(r_j + 1) > r, some substring j has
  d_j(h, g) <= r_j (otherwise d >= sum(r_j + 1) > r). With r = 16 s + a
  (0 <= a < 16) we take r_j = s on a+1 substrings and s - 1 on the others: for
  radius 25 that is radius 1 (17 probes) on 10 substrings and exact match
  (1 probe) on 6, i.e. 176 bucket probes. Which 10 get radius 1 is chosen per
  query: those whose radius-1 probes add the fewest candidates (bucket sizes are
  read before any candidate is touched).
  Why m = 16: 16-bit keys give 65536 buckets per substring, ~15 entries each at
  1M uniform hashes (~2.7k candidates a query), addressed directly through an
  offsets array, no search. m = 32 (8 bits) gives 256 buckets: far too dense.
  Fewer, longer substrings cut candidates on real pHashes (measured on CIFAR-10
  pHashes scaled to 1M: m = 13, 20-bit keys: 16k mean / 124k p99 candidates;
  m = 16: 21k / 158k; m = 10: 2.9k / 39k) but need 2^20+-entry tables (so
  sorted keys and binary searches: cache misses) and, for m <= 12, radius-2
  probes (684 to 2060 of them).

  Tables are immutable CSR "segments" of ``seg`` (<= 65535) consecutive entries:
  per substring, ``offsets[key] .. offsets[key + 1]`` delimit the in-segment
  positions with that key in ``perm`` (both uint16: seg <= 65535 keeps them
  2 bytes). A segment's tables are built once it is full (per substring a
  stable radix argsort + bincount + cumsum, ~1 ms for 65535 entries), one
  substring per add over the next 16 adds, so no add stalls for the whole
  ~15 ms; until then it is scanned by brute force like the open segment.
  Eviction never edits a table (the "generation number" scheme): a candidate
  is a ring slot, verified against
  the slot's current occupant, whose seq is recovered from the slot and kept
  only if >= live. A candidate from an evicted entry thus stands for the newer
  entry now in its slot, which is harmless: that entry is reported only if it
  is itself within r. A segment's storage is reused once all its entries are
  gone. All segments live in two preallocated 2-D arrays, so a query is a fixed
  number of numpy calls whatever the number of segments.
  When the bucket sizes say that verifying the candidates would cost more than
  scanning (one candidate ~ 4 scanned rows), the sealed segments are scanned
  instead: MIH is never much slower than brute force.

``mih`` is used once the index holds more than ``mih_threshold`` entries (the
tables are only maintained when ``window > mih_threshold``).

Memory (``memory_bytes``, all preallocated for the full window): per entry 32 B
of ring + 8 B payload slot (+ 8 B timestamp with a TTL); with MIH also 32 B of
positions and 2 MiB of offsets per segment (~32 B per entry with full 65535-entry
segments): ~110 B/entry at 1M, ~143 B/entry at 100k, 80 B at 10k (brute force,
scratch included). Payload objects are the caller's and not counted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from itertools import combinations
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

HASH_BYTES = 32
HASH_BITS = 256
WORDS = 4
SUB_BITS = 16
N_SUB = HASH_BITS // SUB_BITS  # m = 16 substrings
N_KEYS = 1 << SUB_BITS
MAX_SEGMENT = N_KEYS - 1  # positions and offsets fit uint16
MAX_SUB_RADIUS = 2  # per-substring probe radius beyond which brute force wins anyway
_CHUNK = 16384  # rows per brute-force step: scratch stays in L2
# a verified candidate costs about this many scanned rows (measured ~17 vs ~3.7 ns a row)
_CANDIDATE_COST = 4

_PERM = np.random.default_rng(0x5EED_1DE).permutation(HASH_BITS)  # fixed bit shuffle


def _flip_masks(radius: int) -> np.ndarray:
    """Every 16-bit mask with at most ``radius`` bits set, ordered by popcount."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << i for i in c) for c in combinations(range(SUB_BITS), k)]
    return np.asarray(masks, dtype=np.uint16)


_MASKS = _flip_masks(MAX_SUB_RADIUS)
_N_MASKS = [1, 1 + SUB_BITS, 1 + SUB_BITS + SUB_BITS * (SUB_BITS - 1) // 2]  # probes for radius 0, 1, 2
_TABLE = np.arange(N_SUB, dtype=np.int64)


def _check(h: bytes) -> np.ndarray:
    if len(h) != HASH_BYTES:
        raise ValueError(f"hash must be {HASH_BYTES} bytes, got {len(h)}")
    return np.frombuffer(h, dtype=np.uint8)


def _encode(h: bytes) -> np.ndarray:
    """32 hash bytes -> the bit-shuffled hash as 4 native uint64 words."""
    return np.packbits(np.unpackbits(_check(h))[_PERM]).view(np.uint64)


def _row_popcount(x: np.ndarray) -> np.ndarray:
    """Popcount of each (4-word) row of x, as uint32 (summing the 4 per-word byte
    counts as one uint32 avoids numpy's slow reduction over a length-4 axis)."""
    c = np.bitwise_count(x).view(np.uint32).ravel()  # 4 counts <= 64, one per byte
    c = (c & 0x00FF00FF) + ((c >> 8) & 0x00FF00FF)
    return (c & 0xFFFF) + (c >> 16)


class HashIndex(Generic[T]):
    """Bounded, optionally expiring, exact Hamming-radius index of 256-bit hashes."""

    def __init__(
        self,
        window: int,
        ttl_s: float = 0,
        clock: Callable[[], float] = time.monotonic,
        mih_threshold: int = 20_000,
        *,
        segment: int | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0 (0 = no TTL), got {ttl_s}")
        if mih_threshold < 0:
            raise ValueError(f"mih_threshold must be >= 0, got {mih_threshold}")
        self.window = int(window)
        self.ttl_s = float(ttl_s)
        self.mih_threshold = int(mih_threshold)
        self._clock = clock
        self._mih = self.window > self.mih_threshold
        ring = self.window
        if self._mih:
            seg = min(MAX_SEGMENT, self.window) if segment is None else int(segment)
            if not 1 <= seg <= min(MAX_SEGMENT, self.window):
                raise ValueError(f"segment must be in [1, min({MAX_SEGMENT}, window)], got {seg}")
            self._seg = seg
            ring = -(-self.window // seg) * seg  # a multiple of seg: a segment is contiguous in the ring
            # segments with live entries <= window // seg + 1; np.empty: pages are only
            # touched when a segment is sealed
            self._rows = self.window // seg + 1
            self._offsets = np.empty((self._rows, N_SUB * (N_KEYS + 1)), dtype=np.uint16)
            self._perm = np.empty((self._rows, N_SUB * seg), dtype=np.uint16)
            self._sealed = 0  # segments [0, sealed) have their tables
            self._building = -1  # segment whose tables are being built, one per add; -1: none
            self._built = 0  # its tables built so far
            self._offsets_flat = self._offsets.reshape(-1)
            self._perm_flat = self._perm.reshape(-1)
        self._ring = ring  # slots; seq s lives in slot s % ring, live seqs span <= window of them
        self._codes = np.zeros((ring, WORDS), dtype=np.uint64)
        self._stamps = np.zeros(ring, dtype=np.float64) if self.ttl_s > 0 else None
        self._last_stamp = -np.inf
        self._payloads: list[T | None] = [None] * ring
        self._head = 0  # seq of the next add
        self._live = 0  # seq of the oldest live entry
        self._evictions = {"window": 0, "ttl": 0}
        self._chunk = min(_CHUNK, ring)  # rows per distance step, and scratch for them
        self._x = np.empty((self._chunk, WORDS), dtype=np.uint64)
        self._c = np.empty((self._chunk, WORDS), dtype=np.uint8)
        self._u = np.empty(self._chunk, dtype=np.uint32)
        self.last_candidates = 0  # rows compared by the last query (diagnostics)

    # -- public API -----------------------------------------------------------------

    def add(self, h: bytes, payload: T) -> None:
        code = _encode(h)
        if self._stamps is not None:
            now = max(float(self._clock()), self._last_stamp)  # keep stamps sorted by seq
            self._last_stamp = now
            self._expire(now)
        head = self._head
        if head - self._live == self.window:
            self._evictions["window"] += 1
            self._payloads[self._live % self._ring] = None
            self._live += 1
        slot = head % self._ring
        self._codes[slot] = code
        if self._stamps is not None:
            self._stamps[slot] = now
        self._payloads[slot] = payload
        self._head = head + 1
        if self._mih:
            if self._building >= 0:
                self._build_table()
            if self._head % self._seg == 0:
                while self._building >= 0:  # only when seg < 16: finish the previous one
                    self._build_table()
                self._building = head // self._seg
                self._build_table()

    def nearest(self, h: bytes, radius: int) -> tuple[int, T] | None:
        """Closest live entry with Hamming distance <= radius, as (distance, payload);
        among equally close ones the most recently added. None if there is none."""
        seqs, dists = self._search(h, radius)
        if seqs.size == 0:
            return None
        best = dists.min()
        seq = int(seqs[dists == best].max())
        return int(best), self._payloads[seq % self._ring]  # type: ignore[return-value]

    def within(self, h: bytes, radius: int, limit: int | None = None) -> list[tuple[int, T]]:
        """All live entries with distance <= radius, closest first (ties: most recent
        first), at most ``limit`` of them."""
        seqs, dists = self._search(h, radius)
        if seqs.size == 0:
            return []
        seqs, first = np.unique(seqs, return_index=True)  # MIH may report an entry per substring
        dists = dists[first]
        order = np.lexsort((-seqs, dists))
        if limit is not None:
            order = order[: max(0, limit)]
        ring = self._ring
        return [(int(dists[i]), self._payloads[int(seqs[i]) % ring]) for i in order]  # type: ignore[misc]

    def __len__(self) -> int:
        self._expire_now()
        return self._head - self._live

    @property
    def evictions(self) -> dict[str, int]:
        """Entries dropped so far, by reason: "window" (pushed out by newer ones) and
        "ttl" (expired)."""
        self._expire_now()
        return dict(self._evictions)

    @property
    def strategy(self) -> str:
        """What a lookup uses at the current size: "mih" or "brute"."""
        return "mih" if self._mih and len(self) > self.mih_threshold else "brute"

    def memory_bytes(self) -> int:
        """Bytes held by the index itself, preallocated for the full window (ring,
        timestamps, payload slots, MIH tables, scratch); payload objects excluded."""
        arrays = [self._codes, self._x, self._c, self._u]
        if self._stamps is not None:
            arrays.append(self._stamps)
        if self._mih:
            arrays += [self._offsets, self._perm]
        return sum(a.nbytes for a in arrays) + sys.getsizeof(self._payloads)

    # -- internals ------------------------------------------------------------------

    def _expire_now(self) -> None:
        if self._stamps is not None:
            self._expire(float(self._clock()))

    def _expire(self, now: float) -> None:
        """Drop the entries with age >= ttl_s: a prefix of [live, head)."""
        n = self._head - self._live
        if n == 0:
            return
        cutoff = now - self.ttl_s
        st = self._stamps
        assert st is not None
        lo = self._live % self._ring
        if st[lo] > cutoff:
            return
        first = st[lo : lo + n]
        dead = int(np.searchsorted(first, cutoff, side="right"))
        if dead == first.size and first.size < n:
            dead += int(np.searchsorted(st[: n - first.size], cutoff, side="right"))
        for a, b in self._slices(self._live, self._live + dead):
            self._payloads[a:b] = [None] * (b - a)
        self._live += dead
        self._evictions["ttl"] += dead

    def _slices(self, a: int, b: int) -> list[tuple[int, int]]:
        """Seqs [a, b) (b - a <= ring) as ring slot ranges [lo, hi)."""
        if a >= b:
            return []
        ring = self._ring
        lo = a % ring
        if lo + (b - a) <= ring:
            return [(lo, lo + b - a)]
        return [(lo, ring), (0, b - a - (ring - lo))]

    def _search(self, h: bytes, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """(seqs, distances) of live entries within radius; an entry may repeat."""
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        q = _encode(h)
        self._expire_now()
        r = min(int(radius), HASH_BITS)
        live, head = self._live, self._head
        n = head - live
        if n == 0:
            self.last_candidates = 0
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint32)
        qt = np.tile(q, (min(n, self._chunk), 1))  # the query on every row: XORs stay contiguous
        if n <= self.mih_threshold or not self._mih or r // N_SUB > MAX_SUB_RADIUS:
            self.last_candidates = n
            slots, dists = self._scan(live, head, qt, r)
        else:
            sealed_hi = self._sealed  # segments [live // seg, sealed_hi) have tables
            open_lo = max(live, sealed_hi * self._seg)
            self.last_candidates = head - open_lo
            slots, dists = self._scan(open_lo, head, qt, r)
            if open_lo > live:
                s2, d2 = self._probe(live // self._seg, sealed_hi, q, qt, r, live, open_lo)
                slots, dists = np.concatenate((slots, s2)), np.concatenate((dists, d2))
        # slot -> seq of its current occupant; candidates from evicted entries whose slot
        # was reused were verified against the occupant, so they stand for it
        seqs = (head - 1) - ((head - 1) - slots) % self._ring
        ok = seqs >= live
        return seqs[ok], dists[ok]

    def _match(self, rows: np.ndarray, qt: np.ndarray, r: int, out: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Indices and distances of the rows (n <= chunk, 4 words) within r of the query."""
        n = rows.shape[0]
        if qt.shape[0] < n:
            qt = np.tile(qt[0], (n, 1))
        x = np.bitwise_xor(rows, qt[:n], out=rows if out is None else out[:n])
        c = np.bitwise_count(x, out=self._c[:n]).view(np.uint32).ravel()  # 4 byte counts <= 64
        # byte sum in the top byte; exact except 256 (all four words 64) wraps to 0, so
        # the few hits are recounted exactly
        u = np.multiply(c, np.uint32(0x01010101), out=self._u[:n])
        u >>= 24
        hit = np.flatnonzero(u <= r)
        if hit.size == 0:
            return hit, np.empty(0, dtype=np.uint32)
        d = _row_popcount(x[hit])
        ok = d <= r
        return hit[ok], d[ok]

    def _scan(self, a: int, b: int, qt: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over seqs [a, b): (slots, distances) within r."""
        slots: list[np.ndarray] = []
        dists: list[np.ndarray] = []
        for lo, hi in self._slices(a, b):
            for s in range(lo, hi, self._chunk):
                k = min(self._chunk, hi - s)
                hit, d = self._match(self._codes[s : s + k], qt, r, out=self._x)
                if hit.size:
                    slots.append(hit + s)
                    dists.append(d)
        if not slots:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint32)
        return np.concatenate(slots), np.concatenate(dists)

    def _build_table(self) -> None:
        """Build the next substring table of the segment being built. A full segment's
        16 tables are spread over 16 adds (~1 ms each for 65535 entries instead of
        one ~15 ms add); meanwhile the segment is scanned like the open one. Rows
        overwritten in the meantime (tiny windows) only make a slot's entry
        unreachable through this table, and that entry has left the window anyway."""
        k, j, seg = self._building, self._built, self._seg
        row = k % self._rows
        lo = (k * seg) % self._ring
        keys = np.ascontiguousarray(self._codes[lo : lo + seg].view(np.uint16)[:, j])
        self._perm[row, j * seg : (j + 1) * seg] = np.argsort(keys, kind="stable")  # radix sort
        off = self._offsets[row, j * (N_KEYS + 1) : (j + 1) * (N_KEYS + 1)]
        off[0] = 0
        np.cumsum(np.bincount(keys, minlength=N_KEYS), out=off[1:])
        self._built += 1
        if self._built == N_SUB:
            self._sealed, self._building, self._built = k + 1, -1, 0

    def _probe(self, k_lo: int, k_hi: int, q: np.ndarray, qt: np.ndarray, r: int, live: int, seq_hi: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """MIH over the sealed segments k_lo..k_hi-1 (seqs [live, seq_hi)): verified
        (slots, distances); slots may hold newer entries than the probed ones."""
        seg = self._seg
        s, a = divmod(r, N_SUB)
        n_s = _N_MASKS[s]
        n_prev = _N_MASKS[s - 1] if s > 0 else 0
        ks = np.arange(k_lo, k_hi, dtype=np.int64)
        rows = ks % self._rows
        keys = q.view(np.uint16)[:, None] ^ _MASKS[None, :n_s]  # (16, n_s) probed keys
        cols = (_TABLE[:, None] * (N_KEYS + 1) + keys).ravel()
        at = (rows * (N_SUB * (N_KEYS + 1)))[:, None] + cols  # (S, 16 * n_s) into _offsets_flat
        start = np.take(self._offsets_flat, at)
        lens = np.take(self._offsets_flat, at + 1) - start  # uint16: offsets only grow
        # radius s on the a+1 substrings where it costs least, s - 1 on the rest
        per_probe = lens.sum(axis=0, dtype=np.int64).reshape(N_SUB, n_s)
        use = np.zeros((N_SUB, n_s), dtype=bool)
        use[:, :n_prev] = True
        use[np.argsort(per_probe[:, n_prev:].sum(axis=1), kind="stable")[: a + 1], n_prev:] = True
        total = int(per_probe[use].sum())
        if total * _CANDIDATE_COST >= seq_hi - live:
            self.last_candidates += seq_hi - live
            return self._scan(live, seq_hi, qt, r)
        self.last_candidates += total
        if total == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint32)
        sel = np.flatnonzero((lens != 0) & use.ravel())  # non-empty chosen buckets, (segment, probe)
        i, p = np.divmod(sel, N_SUB * n_s)
        lens = lens.ravel()[sel].astype(np.int64)
        start = start.ravel()[sel] + rows[i] * (N_SUB * seg) + (p // n_s) * seg  # into _perm_flat
        # the ranges [start, start + len) of _perm_flat, concatenated without a Python loop
        ends = np.cumsum(lens)
        at = np.repeat(start - (ends - lens), lens) + np.arange(total)
        slots = np.repeat((ks[i] * seg) % self._ring, lens) + np.take(self._perm_flat, at)
        out_s: list[np.ndarray] = []
        out_d: list[np.ndarray] = []
        for c in range(0, total, self._chunk):
            sl = slots[c : c + self._chunk]
            hit, d = self._match(np.take(self._codes, sl, axis=0), qt, r)
            out_s.append(sl[hit])
            out_d.append(d)
        return np.concatenate(out_s), np.concatenate(out_d)
