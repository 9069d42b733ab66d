"""A REST request body, bounded before anything is materialised.

``json.loads`` builds every list, number and string of a body before a single
limit can be checked: 10^6 tiny ``instances`` became 10^6 Python lists (and
then numpy arrays) before ``--max-batch`` said no, 5000 nested brackets
overflow its recursion, a 5000-digit integer exceeds Python's int-conversion
limit, and those errors were 500s. Here a body is first MEASURED, in
vectorised passes over its bytes (numpy, 256 KiB at a time, so the scan's own
memory is bounded and the GIL is released; the REST adapter runs it off the
event loop for large bodies):

* nesting depth (``MAX_DEPTH``): a predict body needs 6 levels at most;
* the length of every number (``MAX_NUMBER_CHARS``);
* the number of instances: members of the top-level object's list values
  (``{"instances": [...]}``, ``{"inputs": [...]}``) or of the lists inside
  an object value (``{"inputs": {"image": [...]}}``), against ``max_batch``.

Only a body within these bounds is parsed, with numbers that must be finite
(``1e400``, ``NaN`` and ``Infinity`` are refused). Errors are ``InvalidInput``
(400) or ``TooLarge`` (413) with a message, never a traceback.

``inflate`` undoes a ``Content-Encoding`` (gzip or deflate, one layer) with a
bound on the output: it stops at ``max_bytes + 1`` bytes of output, so a
1 MiB -> 1 GiB bomb costs 16 MiB of inflating at most, and zlib releases the
GIL (the adapter runs it in a thread, after authentication).
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np

from ..errors import InvalidInput, TooLarge

MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40  # a float32 pixel written in full ("-1.2345678901234567e+38") is 23
CHUNK = 1 << 18  # 256 KiB: the scan's own arrays stay under about 5 MB
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN_LIST, _CLOSE_LIST, _OPEN_OBJ, _CLOSE_OBJ, _COMMA = (ord(c) for c in "[]{},")
# "[" | 32 == "{" and "]" | 32 == "}"; an opening bracket has bit 1 set, a closing one not


def inflate(body: bytes | bytearray, encoding: str, max_bytes: int) -> bytes | bytearray:
    """The body without its Content-Encoding, at most ``max_bytes`` (else TooLarge)."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    wbits = ENCODINGS.get(enc)
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding[:40]!r} is not accepted; send identity, gzip or deflate "
                           "(one layer)")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, max_bytes + 1)
        if len(out) <= max_bytes and not d.eof and not d.unconsumed_tail:
            out += d.flush(max_bytes + 1 - len(out))
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {enc} data: {exc}") from None
    if len(out) > max_bytes:
        raise TooLarge(f"request body inflates to more than the limit of {max_bytes} bytes")
    if not d.eof:
        raise InvalidInput(f"request body is truncated {enc} data")
    if d.unused_data:
        raise InvalidInput(f"request body has bytes after its {enc} data (one layer is accepted)")
    return out


class Shape:
    """What ``measure`` found: depth, longest number, instance counts."""

    def __init__(self) -> None:
        self.depth = 0
        self.longest_number = 0
        self.numbers = 0  # number tokens outside strings
        self.lists_at_2 = 0  # top-level members that are lists (instances / inputs)
        self.objects_at_2 = 0  # ... that are objects ({"inputs": {name: [...]}})
        self.commas_at_2 = 0
        self.opens_at_3 = 0
        self.commas_at_3 = 0

    @property
    def instances(self) -> int:
        """Images the body can hold: members of the top-level lists, plus members of
        the lists inside top-level objects (an upper bound for any other shape)."""
        n = self.lists_at_2 + self.commas_at_2 if self.lists_at_2 else 0
        if self.objects_at_2:
            n += self.opens_at_3 + self.commas_at_3
        return n


def measure(body: bytes | bytearray, stop_depth: int = MAX_DEPTH, stop_number: int = MAX_NUMBER_CHARS,
            stop_instances: int | None = None) -> Shape:
    """One pass over ``body`` (bytes of JSON, maybe invalid) in ``CHUNK`` pieces. A
    backslash-escaped quote is found as a quote after an odd run of backslashes; a
    byte is inside a string when an odd number of real quotes precede it. The
    pass stops early once the depth, a number or the instances exceed a bound."""
    shape = Shape()
    buf = np.frombuffer(body, np.uint8)
    in_string = False
    run_before = 0  # backslashes that ended the previous chunk
    depth = 0
    number_run = 0  # number characters that ended the previous chunk
    for start in range(0, buf.size, CHUNK):
        c = buf[start:start + CHUNK]
        n = c.size
        quotes = np.flatnonzero(c == _QUOTE)
        is_bs = c == _BACKSLASH
        if is_bs.any():
            idx = np.arange(n, dtype=np.int32)
            last_other = np.maximum.accumulate(np.where(is_bs, np.int32(-1), idx))  # last non-backslash <= i
            del idx
            if quotes.size:
                prev = quotes - 1
                safe = np.maximum(prev, 0)
                runs = np.where(prev >= 0, prev - last_other[safe], 0)
                runs = runs + np.where((prev < 0) | (last_other[safe] < 0), run_before, 0)
                quotes = quotes[runs % 2 == 0]
            tail = n - 1 - int(last_other[-1])
            run_before = tail + run_before if last_other[-1] < 0 else tail
            del last_other
        else:
            if quotes.size and quotes[0] == 0 and run_before % 2:
                quotes = quotes[1:]  # escaped by the backslashes that ended the previous chunk
            run_before = 0
        if quotes.size:
            toggles = np.zeros(n, np.int8)
            toggles[quotes] = 1
            outside = (np.cumsum(toggles, dtype=np.int32) & 1) == (1 if in_string else 0)
            del toggles
        else:
            outside = np.full(n, not in_string)
        in_string ^= bool(quotes.size & 1)
        # numbers: the longest run of number characters outside strings (runs may span chunks)
        num = ((c - 48) < 10) | (c == 46) | (c == 45) | (c == 43) | ((c | 32) == 101)
        num &= outside
        if n > 1:
            starts = np.flatnonzero(num[1:] & ~num[:-1]) + 1
            ends = np.flatnonzero(num[:-1] & ~num[1:]) + 1
        else:
            starts = ends = np.zeros(0, np.int64)
        if num[0]:
            starts = np.concatenate(([0], starts))
        if num[-1]:
            ends = np.concatenate((ends, [n]))
        if starts.size:
            lengths = ends - starts
            if starts[0] == 0:
                lengths[0] += number_run
            shape.numbers += int(starts.size) - (1 if starts[0] == 0 and number_run else 0)
            shape.longest_number = max(shape.longest_number, int(lengths.max()))
            number_run = int(lengths[-1]) if ends[-1] == n else 0
        else:
            number_run = 0
        del num, starts, ends
        # structure: depth after every bracket, and where the commas are
        pos = np.flatnonzero(((c == _COMMA) | ((c | 32) == _OPEN_OBJ) | ((c | 32) == _CLOSE_OBJ)) & outside)
        del outside
        if pos.size:
            kind = c[pos]
            commas = kind == _COMMA
            delta = np.where(commas, 0, np.where(kind & 2, 1, -1)).astype(np.int8)
            levels = depth + np.cumsum(delta, dtype=np.int32)
            shape.depth = max(shape.depth, int(levels.max()))
            depth = int(levels[-1])
            opens = delta > 0
            at2, at3 = levels == 2, levels == 3
            shape.lists_at_2 += int(np.count_nonzero((kind == _OPEN_LIST) & at2))
            shape.objects_at_2 += int(np.count_nonzero((kind == _OPEN_OBJ) & at2))
            shape.commas_at_2 += int(np.count_nonzero(commas & at2))
            shape.opens_at_3 += int(np.count_nonzero(opens & at3))
            shape.commas_at_3 += int(np.count_nonzero(commas & at3))
        if shape.depth > stop_depth or shape.longest_number > stop_number or \
                (stop_instances is not None and shape.instances > stop_instances):
            break
    return shape


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidInput(f"request body holds the number {text[:20]}, which is not a finite float")
    return value


def _constant(name: str):
    raise InvalidInput(f"request body holds {name}; JSON numbers must be finite")


def check(body: bytes | bytearray, max_batch: int) -> Shape:
    """Refuse a body whose depth, numbers or instance count are out of bounds."""
    shape = measure(body, stop_instances=max_batch)
    if shape.depth > MAX_DEPTH:
        raise InvalidInput(f"request body is nested deeper than {MAX_DEPTH} levels")
    if shape.longest_number > MAX_NUMBER_CHARS:
        raise InvalidInput(f"request body holds a number of {shape.longest_number} or more characters; "
                           f"at most {MAX_NUMBER_CHARS} are accepted")
    if shape.instances > max_batch:
        raise TooLarge(f"{shape.instances} instances in one request; the limit is {max_batch}")
    return shape


def loads(body: bytes | bytearray):
    """Parse a body that ``check`` accepted: JSON, numbers finite."""
    try:
        return json.loads(body, parse_float=_finite, parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # bounded by check(); kept as a clear 400 all the same
        raise InvalidInput(f"request body cannot be read: {str(exc)[:120]}") from None
