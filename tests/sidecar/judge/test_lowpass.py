"""The low-pass measure of hardened mode and the batched perceptual hash."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.judge.judgment import HARDENED_TAU, Fingerprint, Thresholds, compare, fingerprints
from sidecar.judge.lowpass import distance, lowpass, mask_bound, pixel_bound, project, projection
from sidecar.judge.phash import phash, phash_batch, phash_cv2

HARD = Thresholds(lowpass_tau=HARDENED_TAU)
EPS = 16 / 255


def test_batched_phash_equals_cv2_on_every_test_image(test_images):
    batched = phash_batch(test_images)
    ref = np.stack([np.frombuffer(phash_cv2(img), np.uint8) for img in test_images])
    assert batched.shape == (len(test_images), 32)
    assert np.array_equal(batched, ref)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_batched_phash_equals_cv2_on_random_images(dtype):
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, (500, 32, 32, 3)).astype(dtype)
    if dtype == np.float32:
        imgs += rng.uniform(0, 1, imgs.shape).astype(np.float32)
    ref = np.stack([np.frombuffer(phash_cv2(img), np.uint8) for img in imgs])
    assert np.array_equal(phash_batch(imgs), ref)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1), (48, 40, 3), (64, 64, 3)])
def test_batched_phash_other_shapes(shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    assert phash(img) == phash_cv2(img)


def test_fingerprints_of_a_batch_equal_one_by_one(test_images):
    imgs = list(test_images[:20]) + [np.zeros((16, 16, 3), np.uint8)]
    batch = fingerprints(imgs, with_lowpass=True)
    for img, fp in zip(imgs, batch):
        one = Fingerprint.of(img, with_lowpass=True)
        assert fp.hash == one.hash == phash_cv2(img)
        assert np.array_equal(fp.lowpass, one.lowpass)


def test_bounds_are_the_coordinators_figures():
    assert mask_bound(EPS) == pytest.approx(16 / 255 * 16 * 3 ** 0.5)
    assert mask_bound(EPS) == pytest.approx(1.739, abs=1e-3)
    assert pixel_bound(1) == pytest.approx(0.433, abs=1e-3)
    assert 2 * mask_bound(EPS) > HARDENED_TAU > mask_bound(EPS) + pixel_bound(1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.integers(1, 16), index=st.integers(0, 845),
       kind=st.sampled_from(["sign", "uniform", "blocks", "sparse"]))
def test_any_mask_within_eps_of_the_anchor_is_similar(test_images, seed, eps, index, kind):
    """The bound: whatever a mask with L-inf <= 16/255 does to hash bits, the
    low-pass distance stays below mask_bound and the query is similar."""
    rng = np.random.default_rng(seed)
    img = test_images[index]
    if kind == "sign":
        mask = rng.choice([-eps, eps], img.shape)
    elif kind == "uniform":
        mask = rng.integers(-eps, eps + 1, img.shape)
    elif kind == "blocks":  # constant on 2x2 blocks: the worst case of the area mean
        mask = np.kron(rng.choice([-eps, eps], (16, 16, 3)), np.ones((2, 2, 1))).astype(int)
    else:
        mask = rng.choice([-eps, eps], img.shape) * (rng.random(img.shape) < 0.3)
    q = np.clip(img.astype(int) + mask, 0, 255).astype(np.uint8)
    a, b = fingerprints([img, q], with_lowpass=True)
    d = float(distance(a.lowpass, b.lowpass))
    assert d <= mask_bound(eps / 255) + 1e-5
    assert compare(a, b, HARD).similar


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 845), k=st.integers(1, 3))
def test_masked_plus_k_pixels_is_similar(test_images, seed, index, k):
    rng = np.random.default_rng(seed)
    img = test_images[index]
    q = np.clip(img.astype(int) + rng.choice([-16, 16], img.shape), 0, 255).astype(np.uint8)
    for f in rng.choice(1024, k, replace=False):
        q[f // 32, f % 32] = rng.integers(0, 256, 3)
    a, b = fingerprints([img, q], with_lowpass=True)
    assert float(distance(a.lowpass, b.lowpass)) <= mask_bound(EPS) + pixel_bound(k) + 1e-5
    assert compare(a, b, HARD).similar


def test_projection_is_orthonormal_and_never_increases_distances(test_images):
    p = projection(3)
    assert p.shape == (64, 768)
    assert np.allclose(p @ p.T, np.eye(64), atol=1e-5)
    v = lowpass(test_images[:200])
    full = distance(v[:, None], v[None])
    proj = distance(project(v)[:, None], project(v)[None])
    assert (proj <= full + 1e-4).all()
    assert np.median(proj / np.maximum(full, 1e-6)) > 0.5  # the low frequencies carry most of it


def test_distinct_test_images_are_different_in_hardened(test_images):
    """False cache within one session: distinct real images judged similar."""
    v = lowpass(test_images)
    nearest = []
    for i in range(0, len(v), 32):  # all pairs, 32 rows at a time (all at once is gigabytes)
        d = distance(v[i:i + 32, None], v[None])
        d[np.arange(len(d)), np.arange(i, i + len(d))] = np.inf
        nearest.append(d.min(axis=1))
    rate = float(np.mean(np.concatenate(nearest) <= HARDENED_TAU))
    print(f"images with a distinct neighbour within tau: {rate:.4f}")
    assert rate <= 0.005


def test_paper_thresholds_ignore_the_lowpass(test_images):
    img = test_images[5]
    q = np.clip(img.astype(int) + 40, 0, 255).astype(np.uint8)  # a big brightness change
    a, b = fingerprints([img, q], with_lowpass=True)
    paper = compare(a, b, Thresholds())
    assert paper.lowpass is None
    assert compare(Fingerprint.of(img), Fingerprint.of(q), Thresholds()) == paper
