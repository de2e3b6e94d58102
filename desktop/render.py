"""Turning arrays into things Qt can paint: grey levels through a window, mask and heatmap images.

Everything here is numpy over whole arrays (lookup tables, no per-pixel Python) so that a
3000 x 4600 16-bit mammogram re-renders in a few tens of milliseconds when the window changes.

Every ``QImage`` built here wraps a numpy buffer without copying; the buffer is kept alive by
:class:`BufferedImage`, which holds both, so Qt never reads freed memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PySide6.QtCore import QPointF
from PySide6.QtGui import QColor, QImage, QPainterPath, QPolygonF

INDEX_LEVELS = 65536  # entries in the grey-level lookup table (uint16 index image)
INDEX_MAX = INDEX_LEVELS - 1


@dataclass(frozen=True)
class BufferedImage:
    """A ``QImage`` and the numpy array whose memory it reads (kept together on purpose)."""

    image: QImage
    buffer: np.ndarray


def quantise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values in ``[lo, hi]`` to a uint16 index image (0 ... 65535), clipping outside.

    Parameters
    ----------
    values : (H, W) array of any real dtype
    lo, hi : the values that map to index 0 and 65535

    Returns
    -------
    (H, W) uint16, C-contiguous
    """
    span = float(hi) - float(lo)
    scale = INDEX_MAX / span if span > 0 else 0.0
    scaled = np.asarray(values, dtype=np.float32) - np.float32(lo)
    scaled *= np.float32(scale)
    np.clip(scaled, 0, INDEX_MAX, out=scaled)
    scaled += np.float32(0.5)
    return scaled.astype(np.uint16)


def window_lut(
    centre: float, width: float, lo: float, hi: float, invert: bool = False,
    function: str = "LINEAR",
) -> np.ndarray:
    """The 8-bit lookup table of a window over an index image quantised from ``[lo, hi]``.

    Parameters
    ----------
    centre, width : the window, in the same units as ``lo`` and ``hi``
    lo, hi : the values at index 0 and index 65535
    invert : white for low values instead of black
    function : "SIGMOID" for the DICOM sigmoid VOI function, 1 / (1 + exp(-4 (x - c) / w));
        anything else is a linear window

    Returns
    -------
    (65536,) uint8: grey level for each index
    """
    values = np.linspace(lo, hi, INDEX_LEVELS, dtype=np.float64)
    width = max(float(width), 1e-12)
    if function.upper() == "SIGMOID":
        with np.errstate(over="ignore"):
            grey = 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    else:
        grey = (values - (centre - width / 2.0)) / width
    np.clip(grey, 0.0, 1.0, out=grey)
    if invert:
        grey = 1.0 - grey
    return np.round(grey * 255.0).astype(np.uint8)


def grey_image(index: np.ndarray, lut: np.ndarray) -> BufferedImage:
    """An 8-bit grey ``QImage`` of ``lut[index]`` (index: (H, W) uint16; lut: (65536,) uint8)."""
    grey = np.take(lut, index)
    height, width = grey.shape
    image = QImage(grey.data, width, height, width, QImage.Format.Format_Grayscale8)
    return BufferedImage(image, grey)


def mask_image(mask: np.ndarray, colour: QColor) -> BufferedImage:
    """An indexed ``QImage`` of a boolean mask: ``colour`` where True, transparent elsewhere.

    Parameters
    ----------
    mask : (H, W) bool, full resolution
    colour : fill colour; its alpha is kept (the item's opacity scales it further)
    """
    buffer = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    height, width = buffer.shape
    image = QImage(buffer.data, width, height, width, QImage.Format.Format_Indexed8)
    image.setColorTable([QColor(0, 0, 0, 0).rgba(), colour.rgba()])
    return BufferedImage(image, buffer)


# Anchors of the heatmap colour scale (value, (r, g, b)): dark blue - cyan - yellow - red.
_HEAT_ANCHORS = (
    (0.00, (20, 20, 120)),
    (0.30, (0, 150, 220)),
    (0.55, (60, 210, 120)),
    (0.75, (250, 220, 40)),
    (1.00, (230, 30, 30)),
)


HEAT_FLOOR, HEAT_FULL = 0.15, 0.6  # heat levels where the colour starts to show / is opaque


def heatmap_colour_table() -> list[int]:
    """256 ARGB colours for heat 0 ... 1; low heat is see-through so the tissue stays visible."""
    stops = np.array([a[0] for a in _HEAT_ANCHORS])
    rgb = np.array([a[1] for a in _HEAT_ANCHORS], dtype=np.float64)
    levels = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(levels, stops, rgb[:, c]) for c in range(3)]
    # Below HEAT_FLOOR the map says "no effect": fully see-through, so weak heat does not tint
    # the whole breast; opaque from HEAT_FULL up (the item's opacity then scales it).
    alpha = np.clip((levels - HEAT_FLOOR) / (HEAT_FULL - HEAT_FLOOR), 0.0, 1.0) * 255.0
    return [
        QColor(int(r), int(g), int(b), int(a)).rgba()
        for r, g, b, a in zip(*channels, alpha, strict=True)
    ]


def heatmap_image(heat: np.ndarray) -> BufferedImage:
    """An indexed ``QImage`` of a (H, W) float heatmap in [0, 1] through the heat colour table."""
    levels = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0) * np.float32(255.0)
    buffer = np.ascontiguousarray((levels + np.float32(0.5)).astype(np.uint8))
    height, width = buffer.shape
    image = QImage(buffer.data, width, height, width, QImage.Format.Format_Indexed8)
    image.setColorTable(heatmap_colour_table())
    return BufferedImage(image, buffer)


def mask_outline(mask: np.ndarray) -> QPainterPath:
    """The boundary of a boolean mask as a path in pixel coordinates (pixel (x, y) spans x..x+1).

    The path runs through the centres of the mask's boundary pixels, so it lies half a pixel
    inside the mask; holes are included.
    """
    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    path = QPainterPath()
    for contour in contours:
        points = contour.reshape(-1, 2).astype(np.float64) + 0.5
        if len(points) == 1:
            x, y = points[0]
            path.addRect(x - 0.5, y - 0.5, 1.0, 1.0)
            continue
        polygon = QPolygonF([QPointF(float(x), float(y)) for x, y in points])
        path.addPolygon(polygon)
        path.closeSubpath()
    return path
