"""The bounded REST body (sidecar/wire/jsonbody.py): the vectorised measure agrees
with a plain tokenizer on random JSON (escapes, strings with brackets and digits,
chunk borders anywhere), limits refuse what they should, inflate is bounded."""

from __future__ import annotations

import gzip
import json
import random
import zlib

import pytest

import badinput as bad
from sidecar.errors import InvalidInput, TooLarge
from sidecar.wire import jsonbody as jb


def reference(text: str) -> dict:
    out = dict(depth=0, longest_number=0, numbers=0, lists_at_2=0, objects_at_2=0, commas_at_2=0,
               opens_at_3=0, commas_at_3=0)
    depth, inside, escaped, run = 0, False, False, 0
    for ch in text:
        if inside:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inside = False
            run = 0
            continue
        if ch == '"':
            inside, run = True, 0
            continue
        if ch in "0123456789+-.eE":
            if run == 0:
                out["numbers"] += 1
            run += 1
            out["longest_number"] = max(out["longest_number"], run)
            continue
        run = 0
        if ch in "[{":
            depth += 1
            out["depth"] = max(out["depth"], depth)
            if depth == 2:
                out["lists_at_2" if ch == "[" else "objects_at_2"] += 1
            if depth == 3:
                out["opens_at_3"] += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth in (2, 3):
            out[f"commas_at_{depth}"] += 1
    return out


def random_json(rng: random.Random, d: int = 0):
    r = rng.random()
    if d > 6 or r < 0.3:
        return rng.choice([rng.randint(-10 ** rng.randint(0, 30), 10 ** 30), rng.random() * 10 ** rng.randint(-5, 30),
                           'a\\"b\\\\', 's"q[{,1e5', "\\\\\\\"", True, None, "ü]}"])
    if r < 0.65:
        return [random_json(rng, d + 1) for _ in range(rng.randint(0, 5))]
    return {str(rng.random()) + '\\"' * rng.randint(0, 2) + "[": random_json(rng, d + 1) for _ in range(rng.randint(0, 4))}


@pytest.mark.parametrize("chunk", [jb.CHUNK, 1, 2, 3, 7, 64])
def test_measure_agrees_with_a_tokenizer_across_chunk_borders(monkeypatch, chunk):
    monkeypatch.setattr(jb, "CHUNK", chunk)
    rng = random.Random(chunk)
    for _ in range(150):
        text = json.dumps(random_json(rng), ensure_ascii=rng.random() < 0.5)
        assert vars(jb.measure(text.encode())) == reference(text), text


def test_instances_count_both_formats():
    row = json.dumps({"signature_name": "x,[y]", "instances": [[[[1]]]] * 7}).encode()
    col = json.dumps({"inputs": {"image": [[[[1, 2]]]] * 5}}).encode()
    assert jb.measure(row).instances == 7 and jb.measure(col).instances == 5


@pytest.mark.parametrize("body, error", [
    (b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", InvalidInput),
    (b'{"instances": [[[[' + b"1" * 5000 + b"]]]]}", InvalidInput),
    (b'{"instances": [' + b",".join([b"[[[0]]]"] * 9) + b"]}", TooLarge),
    (b'{"inputs": {"image": [' + b",".join([b"[[[0]]]"] * 9) + b"]}}", TooLarge),
])
def test_check_refuses_out_of_bounds(body, error):
    with pytest.raises(error):
        jb.check(body, max_batch=8)


@pytest.mark.parametrize("body", [b'[1e400]', b'[-1e999]', b"[NaN]", b"[Infinity]", b"{bad", b"\xff\xfe"])
def test_loads_refuses_non_finite_and_invalid(body):
    with pytest.raises(InvalidInput):
        jb.loads(body)


def test_loads_keeps_ordinary_numbers():
    assert jb.loads(b'{"a": [1, 2.5, -3e2]}') == {"a": [1, 2.5, -300.0]}


def test_inflate_is_bounded_and_strict():
    body = b'{"instances": []}'
    assert jb.inflate(gzip.compress(body), "gzip", 100) == body
    assert jb.inflate(zlib.compress(body), "Deflate", 100) == body
    assert jb.inflate(body, "identity", 100) == body
    with pytest.raises(TooLarge):
        jb.inflate(bad.gzip_bomb(1 << 30), "gzip", 1 << 20)
    with pytest.raises(TooLarge):
        jb.inflate(gzip.compress(b" " * 101), "gzip", 100)
    for data, enc in ((body, "gzip"), (gzip.compress(body)[:-3], "gzip"), (gzip.compress(body) + b"x", "gzip"),
                      (gzip.compress(body), "br"), (gzip.compress(gzip.compress(body)), "gzip, gzip")):
        with pytest.raises(InvalidInput):
            jb.inflate(data, enc, 1 << 20)
