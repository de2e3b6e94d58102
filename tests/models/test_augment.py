"""Augmentation keeps image and mask aligned, stays in [0, 1] and is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from models.augment import Augmenter

H, W = 96, 80  # px; not square, so a transposed axis would show


def disc_pair(cy: float = 30, cx: float = 50, r: float = 12) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with one bright disc off-centre, and the disc's mask."""
    rows, cols = np.ogrid[:H, :W]
    mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
    image = np.full((H, W), 0.1, np.float32)
    image[mask] = 0.9
    return image, mask


def centroid(a: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(a)
    return np.array([rows.mean(), cols.mean()])


@pytest.mark.parametrize("seed", range(12))
def test_disc_and_mask_stay_together(seed):
    image, mask = disc_pair()
    out, out_mask = Augmenter()(image, mask, rng=np.random.default_rng(seed))
    assert out.shape == (H, W) and out.dtype == np.float32
    assert out_mask.shape == (H, W) and out_mask.dtype == bool
    # The disc is where the mask is: the mask's pixels are the bright ones. Intensity jitter is
    # monotonic, so "bright" is relative to the transformed background.
    bright = out > (out[out_mask].mean() + np.median(out)) / 2
    assert out_mask.sum() > 0.7 * mask.sum()
    overlap = (bright & out_mask).sum() / (bright | out_mask).sum()
    assert overlap > 0.9, overlap
    assert np.abs(centroid(bright) - centroid(out_mask)).max() < 1.5


def test_the_transform_really_moves_things():
    """Without this, a no-op augmenter would pass the alignment test."""
    image, mask = disc_pair()
    moved = 0
    for seed in range(12):
        _, out_mask = Augmenter()(image, mask, rng=np.random.default_rng(seed))
        moved += np.abs(centroid(out_mask) - centroid(mask)).max() > 3
    assert moved >= 6


def test_flips_are_exact():
    image, mask = disc_pair()
    flip_only = Augmenter(
        hflip_p=1.0,
        vflip_p=1.0,
        rotation_deg=0,
        scale=(1, 1),
        brightness=0,
        contrast=(1, 1),
        gamma=(1, 1),
    )
    out, out_mask = flip_only(image, mask, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out_mask, mask[::-1, ::-1])
    np.testing.assert_allclose(out, image[::-1, ::-1], atol=1e-6)


def test_output_in_unit_range_even_with_strong_jitter():
    rng = np.random.default_rng(1)
    image = rng.random((H, W), dtype=np.float32)
    strong = Augmenter(brightness=0.5, contrast=(0.2, 3.0), gamma=(0.3, 3.0))
    for seed in range(10):
        out, none = strong(image, rng=np.random.default_rng(seed))
        assert none is None
        assert out.shape == image.shape
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_equal_seeds_equal_outputs_and_different_seeds_differ():
    image, mask = disc_pair()
    a = Augmenter()(image, mask, rng=np.random.default_rng(7))
    b = Augmenter()(image, mask, rng=np.random.default_rng(7))
    c = Augmenter()(image, mask, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_same_image_result_with_or_without_mask():
    image, mask = disc_pair()
    with_mask, _ = Augmenter()(image, mask, rng=np.random.default_rng(3))
    without, _ = Augmenter()(image, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(with_mask, without)


def test_mask_dtype_and_channels_kept_and_nearest_sampled():
    image, mask = disc_pair()
    labels = np.stack([mask.astype(np.uint8) * 1, mask.astype(np.uint8) * 2], axis=-1)
    _, out = Augmenter()(image, labels, rng=np.random.default_rng(5))
    assert out.shape == (H, W, 2) and out.dtype == np.uint8
    # Nearest-neighbour: no value in between the input's values.
    assert set(np.unique(out[..., 0])) <= {0, 1}
    assert set(np.unique(out[..., 1])) <= {0, 2}


def test_input_arrays_are_not_modified_or_shared():
    image, mask = disc_pair()
    image0, mask0 = image.copy(), mask.copy()
    no_geometry = Augmenter(hflip_p=0, vflip_p=0, rotation_deg=0, scale=(1, 1))
    out, out_mask = no_geometry(image, mask, rng=np.random.default_rng(0))
    out_mask[:] = False
    np.testing.assert_array_equal(image, image0)
    np.testing.assert_array_equal(mask, mask0)


def test_misaligned_mask_is_refused():
    image, _ = disc_pair()
    with pytest.raises(ValueError, match="aligned"):
        Augmenter()(image, np.zeros((H + 1, W), bool), rng=np.random.default_rng(0))
