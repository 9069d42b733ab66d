"""Hash, pixel count and Algorithm 1, on real CIFAR-10 images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sidecar import PAPER_THRESHOLD, Anchor, Fingerprint, Thresholds, compare, hamming, judge, phash, pixel_diff, plan, resolve
from sidecar.judge.phash import HASH_BYTES
from real_sidecar import perturb

TH = Thresholds()


def test_paper_threshold_is_ten_percent_of_16x16():
    assert PAPER_THRESHOLD == pytest.approx(25.6)


def test_identical_image_has_distance_zero(test_images):
    img = test_images[0]
    assert hamming(phash(img), phash(img.copy())) == 0
    assert pixel_diff(img, img.copy()) == 0
    assert len(phash(img)) == HASH_BYTES == 32


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_pixel_change_is_similar(test_images, k):
    for i in range(50):
        img = test_images[i]
        cmp = compare(Fingerprint.of(img), Fingerprint.of(perturb(img, k, seed=i)), TH)
        assert cmp.n_pixel == k
        assert cmp.similar, (i, cmp)


def test_distinct_real_images_are_different_in_99_percent_of_pairs(test_images):
    imgs = test_images[:300]
    fps = [Fingerprint.of(x) for x in imgs]
    pairs = different = 0
    for i in range(len(fps)):
        for j in range(i + 1, len(fps)):
            pairs += 1
            different += not compare(fps[i], fps[j], TH).similar
    rate = different / pairs
    print(f"distinct-pair rate {rate:.5f} over {pairs} pairs")
    assert rate >= 0.99


def test_pixel_diff_counts_positions_not_channels():
    a = np.zeros((32, 32, 3), np.uint8)
    b = a.copy()
    b[0, 0] = [1, 2, 3]
    b[5, 5, 1] = 9
    assert pixel_diff(a, b) == 2
    assert pixel_diff(a, b, tolerance=5) == 1
    assert pixel_diff(a, np.zeros((16, 16, 3), np.uint8)) == 1024


def test_hash_works_for_float_and_uint8_alike(test_images):
    img = test_images[3]
    assert phash(img) == phash(img.astype(np.float32))


# --- Algorithm 1 -----------------------------------------------------------

def test_no_anchor_forwards():
    fp = Fingerprint.of(np.zeros((32, 32, 3), np.uint8))
    assert judge(None, fp, TH).forward


def test_similar_query_answered_by_anchor_and_anchor_kept(test_images):
    clean = test_images[0]
    anchor = Anchor(Fingerprint.of(clean), "cat")
    p1 = Fingerprint.of(perturb(clean, 3, 1))
    d = judge(anchor, p1, TH)
    assert not d.forward and d.anchor is anchor
    # plan form: the anchor stays the clean image after any number of cached answers
    steps = [Fingerprint.of(perturb(clean, k, s)) for s, k in enumerate([1, 3, 5, 5, 1])]
    pl = plan([anchor], steps, TH)
    assert not pl.forwarded
    answers, anchors = resolve(pl, [])
    assert answers == ["cat"] * 5
    assert anchors == (anchor,)


def test_different_query_forwards_and_replaces_anchor(test_images):
    a, b = test_images[0], test_images[1]
    anchor = Anchor(Fingerprint.of(a), "cat")
    d = judge(anchor, Fingerprint.of(b), TH)
    assert d.forward and d.comparison.n_hash > TH.n_threshold and d.comparison.n_pixel > TH.n_threshold
    pl = plan([anchor], [Fingerprint.of(b)], TH)
    answers, anchors = resolve(pl, ["ship"])
    assert answers == ["ship"] and anchors[0].result == "ship" and anchors[0].fingerprint is pl.forwarded[0]


def test_only_both_measures_above_threshold_forward(test_images):
    """Large pixel change but equal hash (uniform brightness shift keeps DCT signs) -> similar."""
    a = test_images[7].astype(np.float32)
    brighter = np.clip(a * 0.9 + 10, 0, 255).astype(np.float32)
    cmp = compare(Fingerprint.of(a), Fingerprint.of(brighter), TH)
    assert cmp.n_pixel > TH.n_threshold
    assert cmp.n_hash <= TH.n_threshold
    assert cmp.similar


def test_plan_in_order_matches_one_by_one(test_images):
    """Batch judgment equals sequential Algorithm 1 (clean, perturbed, perturbed, new, perturbed of new)."""
    a, b = test_images[10], test_images[11]
    seq = [a, perturb(a, 1), perturb(a, 5), b, perturb(b, 3), a]
    fps = [Fingerprint.of(x) for x in seq]
    pl = plan([], fps, TH)
    assert [s.forward for s in pl.steps] == [True, False, False, True, False, True]
    answers, anchors = resolve(pl, ["A", "B", "A2"])
    assert answers == ["A", "A", "A", "B", "B", "A2"]
    # one by one
    anchor = None
    got = []
    for fp, res in zip(fps, ["A", None, None, "B", None, "A2"]):
        d = judge(anchor, fp, TH)
        if d.forward:
            anchor = Anchor(fp, res)
        got.append(anchor.result)
    assert got == answers


def test_resolve_rejects_wrong_result_count(test_images):
    pl = plan([], [Fingerprint.of(test_images[0])], TH)
    with pytest.raises(ValueError):
        resolve(pl, [])


# --- properties --------------------------------------------------------------

images = arrays(np.uint8, (32, 32, 3))


@settings(max_examples=60, deadline=None)
@given(images)
def test_hash_is_deterministic_and_self_distance_zero(img):
    h = phash(img)
    assert len(h) == 32 and phash(img.copy()) == h and hamming(h, h) == 0


@settings(max_examples=60, deadline=None)
@given(images, images)
def test_hamming_is_symmetric_and_bounded(a, b):
    ha, hb = phash(a), phash(b)
    assert hamming(ha, hb) == hamming(hb, ha)
    assert 0 <= hamming(ha, hb) <= 256


@settings(max_examples=40, deadline=None)
@given(images, st.integers(0, 25), st.integers(0, 2**31))
def test_fewer_changed_pixels_than_threshold_is_always_similar(img, k, seed):
    q = perturb(img, k, seed)
    assert compare(Fingerprint.of(img), Fingerprint.of(q), TH).similar


@pytest.mark.parametrize("hardened", [False, True])
def test_compare_many_equals_compare_row_by_row(test_images, hardened):
    """The batch pass gives compare()'s own figures: pixel counts, Hamming counts,
    float32 low-pass distances and decisions, for uint8, float32 and odd-shaped queries."""
    th = Thresholds(lowpass_tau=2.4) if hardened else TH
    from sidecar.judge.judgment import compare_many

    a = test_images[20]
    rng = np.random.default_rng(3)
    queries = [perturb(a, k, seed=k) for k in (1, 5, 30, 200)] + [test_images[21], a.astype(np.float32),
                np.clip(a.astype(np.float32) + rng.normal(0, 3, a.shape), 0, 255).astype(np.float32),
                test_images[22][:16]]
    anchor = Fingerprint.of(a, with_lowpass=hardened)
    fps = [Fingerprint.of(q, with_lowpass=hardened) for q in queries]
    assert compare_many(anchor, fps, th) == [compare(anchor, fp, th) for fp in fps]


@pytest.mark.parametrize("hardened", [False, True])
def test_plan_of_a_long_batch_matches_one_by_one(test_images, hardened):
    """A 300-query batch mixing runs of near-copies and new images (the look-ahead's
    growing chunks and its restarts) decides exactly as judge() query by query."""
    th = Thresholds(lowpass_tau=2.4) if hardened else TH
    rng = np.random.default_rng(7)
    seq, base = [], test_images[30]
    for i in range(300):
        if rng.random() < 0.1:
            base = test_images[31 + i % 40]
            seq.append(base)
        else:
            seq.append(perturb(base, int(rng.integers(1, 40)), seed=i))
    fps = [Fingerprint.of(x, with_lowpass=hardened) for x in seq]
    got = [s.forward for s in plan([], fps, th).steps]
    anchor, want = None, []
    for fp in fps:
        d = judge(anchor, fp, th)
        want.append(d.forward)
        if d.forward:
            anchor = Anchor(fp, None)
    assert got == want
    assert 5 < sum(got) < 250  # both branches of the look-ahead ran
