"""Grey levels through a window, and overlay images, pixel for pixel."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
from PySide6.QtCore import QPointF
from PySide6.QtGui import QColor, QImage

from desktop import render


def test_identity_window_maps_unit_range_onto_0_255():
    pixels = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    index = render.quantise(pixels, 0.0, 1.0)
    assert index.dtype == np.uint16
    assert index.tolist() == [[0, 16384, 32768, 65535]]
    grey = np.take(render.window_lut(0.5, 1.0, 0.0, 1.0), index)
    assert grey.tolist() == [[0, 64, 128, 255]]


def test_window_clips_outside_and_inverts():
    # Raw values 0..4095 (12-bit), window centre 1000 width 200: 900 -> black, 1100 -> white.
    raw = np.array([[0, 900, 1000, 1100, 4095]], np.uint16)
    index = render.quantise(raw, 0, 4095)
    lut = render.window_lut(1000, 200, 0, 4095)
    grey = np.take(lut, index)
    assert grey[0, 0] == 0 and grey[0, 1] == 0 and grey[0, 3] == 255 and grey[0, 4] == 255
    assert abs(int(grey[0, 2]) - 128) <= 2
    inverted = np.take(render.window_lut(1000, 200, 0, 4095, invert=True), index)
    assert (inverted.astype(int) + grey.astype(int) == 255).all()


def test_grey_image_reads_the_buffer_it_keeps_alive():
    index = np.arange(12 * 7, dtype=np.uint16).reshape(7, 12) * 700
    lut = render.window_lut(0.5, 1.0, 0.0, 1.0)
    shown = render.grey_image(index, lut)
    gc.collect()
    image: QImage = shown.image
    assert (image.width(), image.height()) == (12, 7)  # odd width: bytesPerLine is explicit
    for x, y in ((0, 0), (11, 0), (5, 6), (11, 6)):
        assert QColor(image.pixel(x, y)).red() == int(shown.buffer[y, x])
    # The image reads the very buffer the record holds (no copy), so keeping it keeps Qt safe.
    shown.buffer[0, 0] = 77
    assert QColor(image.pixel(0, 0)).red() == 77


def test_mask_image_is_coloured_inside_and_clear_outside():
    mask = np.zeros((9, 13), bool)
    mask[2:5, 3:8] = True
    shown = render.mask_image(mask, QColor(10, 200, 30))
    image = shown.image
    assert QColor.fromRgba(image.pixel(4, 3)).getRgb() == (10, 200, 30, 255)
    assert QColor.fromRgba(image.pixel(0, 0)).alpha() == 0
    assert QColor.fromRgba(image.pixel(8, 3)).alpha() == 0


def test_outline_encloses_the_mask_pixels_only():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 15:30] = True
    path = render.mask_outline(mask)
    assert path.contains(QPointF(20.5, 15.5))
    assert not path.contains(QPointF(5.5, 5.5))
    assert not path.contains(QPointF(35.5, 15.5))
    box = path.boundingRect()
    assert box.left() == pytest.approx(15.5) and box.right() == pytest.approx(29.5)


def test_heatmap_low_heat_is_transparent_high_heat_opaque():
    heat = np.array([[0.0, 1.0]], np.float32)
    image = render.heatmap_image(heat).image
    assert QColor.fromRgba(image.pixel(0, 0)).alpha() == 0
    assert QColor.fromRgba(image.pixel(1, 0)).alpha() == 255


def test_full_size_mammogram_renders_fast():
    # A 16-bit detector image, 2592 x 4688 as in CBIS-DDSM. The LUT path takes ~0.05 s on an
    # idle machine; per-pixel Python would take minutes. The bound only separates the two, so a
    # busy CI machine does not fail it.
    rng = np.random.default_rng(0)
    pixels = rng.random((4688, 2592), dtype=np.float32)
    index = render.quantise(pixels, 0.0, 1.0)
    start = time.perf_counter()
    shown = render.grey_image(index, render.window_lut(0.4, 0.5, 0.0, 1.0))
    elapsed = time.perf_counter() - start
    assert shown.image.width() == 2592
    assert elapsed < 3.0, f"window re-render took {elapsed:.3f} s"
