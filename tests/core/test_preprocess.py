"""core.preprocess on real films: the breast crop, the canonical side, the exact inverse transform."""

from __future__ import annotations

import numpy as np
import pytest

from core.io import Mammogram, read_image
from core.preprocess import (
    PreprocessConfig,
    breast_mask,
    chest_wall_on_right,
    prepare,
    working_image,
)

CFG = PreprocessConfig()


def _synthetic(shape=(400, 300), right=False) -> Mammogram:
    """A half-disc 'breast' against one edge, plus a bright square 'label' far from it."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cx = w if right else 0
    pixels = (((xx - cx) ** 2 + (yy - h / 2) ** 2) < (0.6 * h) ** 2 * 0.5).astype(np.float32) * 0.6
    lx = 10 if right else w - 40
    pixels[20:50, lx : lx + 30] = 1.0
    meta = {"format": "png", "width": w, "height": h, "pixel_spacing_mm": None}
    return Mammogram(pixels=pixels, raw=pixels, meta=meta, path=None)


def test_mias_crop_excludes_film_label(mias_dir):
    # mdb002 carries a bright "LM" film label in its top right, away from the breast.
    m = read_image(mias_dir / "mdb002.png")
    mask = breast_mask(m.pixels)
    label_region = m.pixels[100:230, 725:805]
    assert (label_region > 0.9).mean() > 0.3, "the film label is where this test expects it"
    assert not mask[100:230, 725:805].any()
    p = working_image(m, CFG, mask)
    x0, y0, x1, y1 = p.transform.box
    assert x1 < 725  # the crop stops before the label


def test_breast_mask_keeps_breast_and_drops_background(mias_dir):
    m = read_image(mias_dir / "mdb001.png")
    mask = breast_mask(m.pixels)
    frac = mask.mean()
    assert 0.15 < frac < 0.8
    assert m.pixels[mask].mean() > 3 * m.pixels[~mask].mean()


def test_left_and_right_face_the_same_way(mias_dir):
    # MIAS: odd films are right breasts, even films left; in the originals they face opposite ways.
    right = read_image(mias_dir / "mdb001.png")
    left = read_image(mias_dir / "mdb002.png")
    assert chest_wall_on_right(breast_mask(right.pixels)) != chest_wall_on_right(breast_mask(left.pixels))
    for m in (right, left):
        p = prepare(m, CFG)
        cols = p.breast.sum(axis=0)
        half = p.image.shape[1] // 2
        assert cols[:half].sum() > cols[half:].sum(), "chest wall must end up on the left"


@pytest.mark.parametrize("right", [False, True])
def test_point_round_trip_within_one_pixel(right):
    m = _synthetic(right=right)
    p = prepare(m, CFG, size=256)
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = p.transform.box
    pts = np.column_stack([rng.uniform(x0, x1, 50), rng.uniform(y0, y1, 50)])
    back = p.transform.inverse(p.transform.forward(pts))
    assert np.abs(back - pts).max() < 1.0


def test_forward_lands_on_the_same_pixel_content(mias_dir):
    m = read_image(mias_dir / "mdb010.png")
    p = prepare(m, CFG, size=512)
    # A bright pixel of the original should map to a bright pixel of the model input.
    ys, xs = np.nonzero(p.breast)
    rng = np.random.default_rng(1)
    pick = rng.choice(len(ys), 200, replace=False)
    model_xy = np.column_stack([xs[pick] + 0.5, ys[pick] + 0.5])
    orig = p.transform.inverse(model_xy)
    vals_model = p.image[ys[pick], xs[pick]]
    vals_orig = m.pixels[orig[:, 1].astype(int), orig[:, 0].astype(int)]
    assert np.corrcoef(vals_model, vals_orig)[0, 1] > 0.9


def test_map_back_to_full_resolution_is_aligned():
    m = _synthetic(shape=(600, 420), right=True)
    p = prepare(m, CFG, size=256)
    # A disc drawn in model space maps back onto the same place in the original.
    yy, xx = np.mgrid[:256, :256]
    c = np.array([[80.0, 120.0]])
    disc = (xx + 0.5 - c[0, 0]) ** 2 + (yy + 0.5 - c[0, 1]) ** 2 < 15**2
    full = p.transform.to_original(disc)
    assert full.shape == m.pixels.shape and full.dtype == bool
    ys, xs = np.nonzero(full)
    centre = np.array([[xs.mean() + 0.5, ys.mean() + 0.5]])
    expected = p.transform.inverse(c)
    assert np.abs(centre - expected).max() < 1.5


def test_prepare_outputs_model_ready_square():
    m = _synthetic()
    p = prepare(m, PreprocessConfig(input_size=128))
    assert p.image.shape == (128, 128) and p.image.dtype == np.float32
    assert 0.0 <= p.image.min() and p.image.max() <= 1.0
    assert p.breast.shape == (128, 128)


def test_config_round_trip_and_unknown_keys():
    cfg = PreprocessConfig(input_size=300, threshold=0.1)
    d = cfg.to_dict()
    d["from_a_newer_version"] = 1
    assert PreprocessConfig.from_dict(d) == cfg


def test_blank_image_does_not_crash():
    blank = Mammogram(pixels=np.zeros((100, 80), np.float32), raw=np.zeros((100, 80)),
                      meta={"pixel_spacing_mm": None}, path=None)
    p = prepare(blank, CFG, size=64)
    assert p.image.shape == (64, 64)
