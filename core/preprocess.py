"""The one preprocessing used by both training and inference.

From a :class:`core.io.Mammogram` to model inputs, and back::

    full-resolution pixels ──breast_mask──▶ breast region (drops background, film labels, markers)
        ──crop to the breast's box──▶ ──flip so the chest wall is on the left──▶
        ──scale to the working resolution (about 0.2 mm/px, MIAS' native)──▶ working image
        ──letterbox (resize keeping the aspect ratio, pad) to input_size──▶ model input

Every step is recorded in a :class:`Transform`, so a point, a mask or a heatmap computed on the
working image or the model input maps back onto the full-resolution image exactly.

Coordinates are continuous: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``, so
its centre is ``(col + 0.5, row + 0.5)`` as ``(x, y)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from core.io import Mammogram

MASK_WORK_SIDE = 512  # px, long side at which the breast is segmented (speed; edges upsampled)


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; model bundles store them in ``model.json``.

    Attributes
    ----------
    input_size : int
        Side of the square whole-breast model input, px.
    target_spacing_mm : float
        Working resolution, mm per pixel (0.2 mm: MIAS' native pixel).
    fallback_height_px : int
        When the pixel spacing is unknown, the image height is scaled to this many px
        (a ~20 cm film at 0.2 mm/px).
    threshold : float
        Grey level in [0, 1] separating breast from background, after smoothing.
    margin_px : int
        Margin kept around the breast's bounding box, in working-resolution px.
    pad_value : float
        Value of the letterbox padding, in [0, 1].
    """

    input_size: int = 512
    target_spacing_mm: float = 0.2
    fallback_height_px: int = 1024
    threshold: float = 0.08
    margin_px: int = 8
    pad_value: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Build from a mapping, ignoring unknown keys (bundles from newer versions)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Transform:
    """Maps full-resolution image coordinates to an output image and back.

    Forward: crop ``box`` (x0, y0, x1, y1) of the original, flip horizontally within the crop if
    ``flipped``, scale by ``(sx, sy)`` to ``scaled_shape``, then place at ``offset`` (ox, oy) in
    an output of ``output_shape`` (rows, cols).
    """

    original_shape: tuple[int, int]
    box: tuple[int, int, int, int]
    flipped: bool
    sx: float
    sy: float
    scaled_shape: tuple[int, int]
    offset: tuple[int, int]
    output_shape: tuple[int, int]

    def forward(self, points_xy: np.ndarray) -> np.ndarray:
        """Original ``(x, y)`` points, shape (N, 2), to output coordinates (float64)."""
        p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        x0, y0, x1, _ = self.box
        x = (x1 - p[:, 0]) if self.flipped else (p[:, 0] - x0)
        y = p[:, 1] - y0
        return np.stack([x * self.sx + self.offset[0], y * self.sy + self.offset[1]], axis=1)

    def inverse(self, points_xy: np.ndarray) -> np.ndarray:
        """Output ``(x, y)`` points, shape (N, 2), back to original coordinates (float64)."""
        p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        x0, y0, x1, _ = self.box
        x = (p[:, 0] - self.offset[0]) / self.sx
        y = (p[:, 1] - self.offset[1]) / self.sy
        return np.stack([(x1 - x) if self.flipped else (x + x0), y + y0], axis=1)

    def apply(self, image: np.ndarray, *, nearest: bool = False, pad_value: float = 0.0) -> np.ndarray:
        """Resample a full-resolution array (H, W) into the output frame."""
        x0, y0, x1, y1 = self.box
        crop = image[y0:y1, x0:x1]
        if self.flipped:
            crop = crop[:, ::-1]
        h, w = self.scaled_shape
        if nearest:
            scaled = cv2.resize(crop.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            scaled = scaled.astype(image.dtype)
        else:
            shrinking = w < crop.shape[1]
            interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            scaled = cv2.resize(np.ascontiguousarray(crop, dtype=np.float32), (w, h), interpolation=interp)
        out = np.full(self.output_shape, pad_value, dtype=scaled.dtype)
        ox, oy = self.offset
        out[oy : oy + h, ox : ox + w] = scaled
        return out

    def to_original(self, output_map: np.ndarray, *, nearest: bool = False, fill: float = 0.0) -> np.ndarray:
        """Map an array in the output frame (e.g. a lesion probability map) back to full resolution.

        Parameters
        ----------
        output_map : np.ndarray
            (rows, cols) equal to ``output_shape``; float or bool.
        nearest : bool
            Nearest-neighbour resampling (for label masks); otherwise bilinear.
        fill : float
            Value outside the cropped breast box.

        Returns
        -------
        np.ndarray
            ``original_shape``, float32 (bool when ``output_map`` is bool).
        """
        is_bool = output_map.dtype == bool
        ox, oy = self.offset
        h, w = self.scaled_shape
        region = output_map[oy : oy + h, ox : ox + w].astype(np.float32)
        if self.flipped:
            region = region[:, ::-1]
        x0, y0, x1, y1 = self.box
        interp = cv2.INTER_NEAREST if (nearest or is_bool) else cv2.INTER_LINEAR
        back = cv2.resize(np.ascontiguousarray(region), (x1 - x0, y1 - y0), interpolation=interp)
        out = np.full(self.original_shape, fill, dtype=np.float32)
        out[y0:y1, x0:x1] = back
        return out > 0.5 if is_bool else out


@dataclass(frozen=True)
class Prepared:
    """A model-ready image and how it maps back.

    Attributes
    ----------
    image : np.ndarray
        (rows, cols) float32 in [0, 1].
    breast : np.ndarray
        (rows, cols) bool, the breast region in the same frame.
    transform : Transform
        Full resolution <-> this frame.
    """

    image: np.ndarray
    breast: np.ndarray
    transform: Transform


def breast_mask(pixels: np.ndarray, threshold: float = 0.08) -> np.ndarray:
    """Segment the breast: smoothed threshold, opening, largest connected component, holes filled.

    Film labels, markers and scanner borders are separate components (an opening cuts thin
    bridges to them), so keeping the largest component drops them.

    Parameters
    ----------
    pixels : np.ndarray
        (H, W) float32 in [0, 1], brighter = denser.
    threshold : float
        Grey level separating tissue from background.

    Returns
    -------
    np.ndarray
        (H, W) bool. All False only for a blank image.
    """
    h, w = pixels.shape
    f = MASK_WORK_SIDE / max(h, w)
    small = cv2.resize(pixels.astype(np.float32), (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (5, 5), 0)
    binary = (small > threshold).astype(np.uint8)
    # 25 px at the 512 px working side (about 1 cm): wide enough to cut film-edge bands and
    # markers off the breast, narrow enough to keep its outline.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (25, 25))
    opened = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    if opened.any():
        binary = opened
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return np.zeros((h, w), dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (labels == largest).astype(np.uint8)
    # Fill holes: flood the background from the border; whatever it cannot reach is a hole.
    padded = np.pad(mask, 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    mask = padded[1:-1, 1:-1] | (1 - flood[1:-1, 1:-1])
    full = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return full.astype(bool)


def chest_wall_on_right(mask: np.ndarray) -> bool:
    """Whether the chest wall is on the image's right: more breast touches that side.

    The breast is widest at the chest wall and tapers to the nipple, so the side holding more
    breast pixels (column-weighted) is the chest wall.
    """
    cols = mask.sum(axis=0).astype(np.float64)
    if cols.sum() == 0:
        return False
    half = mask.shape[1] / 2.0
    centre = (cols * (np.arange(cols.size) + 0.5)).sum() / cols.sum()
    return bool(centre > half)


def working_scale(mammogram: Mammogram, config: PreprocessConfig) -> float:
    """Factor from full-resolution px to working px (about ``target_spacing_mm`` per px)."""
    spacing = mammogram.meta.get("pixel_spacing_mm")
    if spacing:
        row_mm = float(spacing[0] if isinstance(spacing, (tuple, list)) else spacing)
        if row_mm > 0:
            return row_mm / config.target_spacing_mm
    return config.fallback_height_px / mammogram.pixels.shape[0]


def _breast_box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, 0, w, h
    return (max(0, cols[0] - margin), max(0, rows[0] - margin),
            min(w, cols[-1] + 1 + margin), min(h, rows[-1] + 1 + margin))


def working_image(mammogram: Mammogram, config: PreprocessConfig,
                  mask: np.ndarray | None = None) -> Prepared:
    """The breast cropped, turned chest-wall-left and scaled to the working resolution (no padding).

    Parameters
    ----------
    mammogram : Mammogram
        Full-resolution input.
    config : PreprocessConfig
        Parameters.
    mask : np.ndarray, optional
        A precomputed :func:`breast_mask` of ``mammogram.pixels`` (saves recomputing it).
    """
    pixels = mammogram.pixels
    if mask is None:
        mask = breast_mask(pixels, config.threshold)
    t = working_image_transform(mammogram, config, mask)
    return Prepared(t.apply(pixels), t.apply(mask, nearest=True).astype(bool), t)


def letterbox(transform: Transform, size: int) -> Transform:
    """The same crop and flip, scaled to fit ``size`` x ``size`` keeping the aspect ratio, centred."""
    x0, y0, x1, y1 = transform.box
    cw, ch = x1 - x0, y1 - y0
    f = size / max(cw, ch)
    w, h = max(1, min(size, int(round(cw * f)))), max(1, min(size, int(round(ch * f))))
    # Chest wall stays flush left (x offset 0); centred vertically.
    return dataclasses.replace(
        transform, sx=w / cw, sy=h / ch, scaled_shape=(h, w), offset=(0, (size - h) // 2),
        output_shape=(size, size),
    )


def prepare(mammogram: Mammogram, config: PreprocessConfig, size: int | None = None,
            mask: np.ndarray | None = None) -> Prepared:
    """The whole-breast model input: cropped, chest wall left, letterboxed to a square.

    Parameters
    ----------
    mammogram : Mammogram
        Full-resolution input.
    config : PreprocessConfig
        Parameters; ``config.input_size`` unless ``size`` is given.
    size : int, optional
        Side of the square output, px.
    mask : np.ndarray, optional
        Precomputed full-resolution breast mask.

    Returns
    -------
    Prepared
        ``image`` (size, size) float32 in [0, 1].
    """
    if mask is None:
        mask = breast_mask(mammogram.pixels, config.threshold)
    base = working_image_transform(mammogram, config, mask)
    t = letterbox(base, size or config.input_size)
    image = t.apply(mammogram.pixels, pad_value=config.pad_value)
    return Prepared(np.clip(image, 0.0, 1.0), t.apply(mask, nearest=True).astype(bool), t)


def working_image_transform(mammogram: Mammogram, config: PreprocessConfig,
                            mask: np.ndarray) -> Transform:
    """The :func:`working_image` transform without resampling any pixels."""
    scale = working_scale(mammogram, config)
    margin = int(round(config.margin_px / scale))
    x0, y0, x1, y1 = _breast_box(mask, margin)
    h = max(1, int(round((y1 - y0) * scale)))
    w = max(1, int(round((x1 - x0) * scale)))
    return Transform(
        original_shape=mammogram.pixels.shape, box=(x0, y0, x1, y1),
        flipped=chest_wall_on_right(mask), sx=w / (x1 - x0), sy=h / (y1 - y0),
        scaled_shape=(h, w), offset=(0, 0), output_shape=(h, w),
    )
