"""Issue 23's lab kit: the blinding families and the photometric training augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from lab import blinding as B


@pytest.mark.parametrize("family", sorted(B.FAMILIES))
def test_every_family_returns_a_changed_uint8_image_of_the_same_shape(family, test_images):
    rng = np.random.default_rng(0)
    img = test_images[3]
    for s in B.FAMILIES[family]:
        outs = [B.transform(family, s)(img, rng) for _ in range(4)]
        assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
        assert any(not np.array_equal(o, img) for o in outs), (family, s)


def test_fresh_draws_differ_and_strength_grows_the_change(test_images):
    rng = np.random.default_rng(1)
    img = test_images[4]
    a, b = B.field(img, rng, 32), B.field(img, rng, 32)
    assert not np.array_equal(a, b)
    small = np.abs(B.field(img, rng, 8).astype(int) - img).max()
    large = np.abs(B.field(img, rng, 48).astype(int) - img).max()
    assert small <= 9 and large > small


def test_photometric_jitter_changes_images_within_range():
    tf = pytest.importorskip("tensorflow")
    from lab.train import photometric_jitter, plan

    gen = tf.random.Generator.from_seed(0)
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32))
    y = photometric_jitter(x, gen).numpy()
    assert y.shape == (8, 32, 32, 3) and y.min() >= 0 and y.max() <= 255
    assert np.abs(y - x.numpy()).mean() > 1
    assert plan("cnn", photometric=True).photometric and not plan("cnn").photometric
