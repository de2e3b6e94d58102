"""The image viewer: a mammogram at full resolution with its overlays, zoom, pan and window/level.

One scene unit is one image pixel: the image item sits at the scene origin unscaled, and every
overlay (lesion mask fill and outline, explanation heatmap) is an item in the same coordinates,
stacked above it. Zoom and the horizontal flip live in the view's transform, so they never move
an overlay relative to the image.

Window/level works on a uint16 index image through a 65536-entry lookup table. Two sources:
``"display"`` is the display-ready ``Mammogram.pixels`` (window in [0, 1] units, the default),
``"raw"`` is ``Mammogram.raw`` (window in stored units, used by the DICOM's own windows).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import (
    QBrush,
    QColor,
    QMouseEvent,
    QPainter,
    QPainterPath,
    QPen,
    QPixmap,
    QTransform,
    QWheelEvent,
)
from PySide6.QtWidgets import (
    QFrame,
    QGraphicsItem,
    QGraphicsPathItem,
    QGraphicsPixmapItem,
    QGraphicsScene,
    QGraphicsView,
)

from desktop import render

log = logging.getLogger(__name__)

ZOOM_STEP = 1.25  # factor per wheel notch or zoom shortcut
ZOOM_MIN, ZOOM_MAX = 0.01, 32.0  # screen px per image px
WHEEL_NOTCH = 120  # angleDelta units per wheel notch
WL_DRAG_SPAN = 600.0  # screen px of right-drag that sweeps the whole value range
WL_RENDER_INTERVAL = 30  # ms between re-renders while dragging the window


@dataclass(frozen=True)
class WindowPreset:
    """A named window: ``centre`` and ``width`` in the units of ``source`` ("display" or "raw")."""

    name: str
    centre: float
    width: float
    source: str = "display"
    function: str = "LINEAR"  # or "SIGMOID", the DICOM VOI LUT Function of the file's windows


DEFAULT_PRESET = WindowPreset("Default (as read)", 0.5, 1.0, "display")

MASK_OUTLINE, MASK_FILL = "outline", "fill"


class ImageViewerWidget(QGraphicsView):
    """Shows one mammogram and its overlays; emits where the cursor is and how far it is zoomed."""

    cursor_moved = Signal(int, int)  # image column, row under the cursor
    cursor_left = Signal()  # the cursor is no longer over the image
    zoom_changed = Signal(float)  # screen pixels per image pixel
    window_changed = Signal(float, float, str)  # centre, width, source
    files_dropped = Signal(list)  # local paths (str) dropped on the viewer

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setScene(QGraphicsScene(self))
        self.setBackgroundBrush(QBrush(QColor(16, 16, 16)))
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorViewCenter)
        self.setResizeAnchor(QGraphicsView.ViewportAnchor.AnchorViewCenter)
        self.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        self.setViewportUpdateMode(QGraphicsView.ViewportUpdateMode.FullViewportUpdate)
        self.setMouseTracking(True)
        self.setAcceptDrops(True)
        # The right button adjusts the window; no context menu should steal it.
        self.setContextMenuPolicy(Qt.ContextMenuPolicy.PreventContextMenu)

        self._image_item = self._add_pixmap_item(z=0.0)
        self._heatmap_item = self._add_pixmap_item(z=1.0)
        self._mask_fill_item = self._add_pixmap_item(z=2.0)
        self._mask_outline_item = QGraphicsPathItem()
        self._mask_outline_item.setZValue(3.0)
        self.scene().addItem(self._mask_outline_item)

        self._pixels: np.ndarray | None = None
        self._raw: np.ndarray | None = None
        self._raw_range: tuple[float, float] = (0.0, 1.0)
        self._raw_inverted = False  # MONOCHROME1: high stored values are less dense
        self._index_cache: dict[str, np.ndarray] = {}
        self._rendered: render.BufferedImage | None = None
        self._presets: list[WindowPreset] = [DEFAULT_PRESET]
        self._window = DEFAULT_PRESET
        self._inverted = False
        self._flipped = False
        self._fit_mode = True

        self._mask: np.ndarray | None = None
        self._fill_stale = False
        self._mask_visible = True
        self._mask_mode = MASK_OUTLINE
        self._mask_colour = QColor(255, 64, 64)
        self._mask_opacity = 0.45
        self._heatmap: np.ndarray | None = None
        self._heatmap_visible = False
        self._heatmap_opacity = 0.5

        self._wl_drag_origin: QPointF | None = None
        self._wl_drag_start: WindowPreset | None = None
        self._wl_timer = QTimer(self)
        self._wl_timer.setSingleShot(True)
        self._wl_timer.setInterval(WL_RENDER_INTERVAL)
        self._wl_timer.timeout.connect(self._render_preview)

    def _add_pixmap_item(self, z: float) -> QGraphicsPixmapItem:
        item = QGraphicsPixmapItem()
        item.setZValue(z)
        item.setTransformationMode(Qt.TransformationMode.SmoothTransformation)
        item.setShapeMode(QGraphicsPixmapItem.ShapeMode.BoundingRectShape)
        # Re-scaling a 13-megapixel pixmap on every paint is what makes panning slow; the cache
        # keeps the item at screen resolution until the zoom changes.
        item.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
        self.scene().addItem(item)
        return item

    # ----------------------------------------------------------------------------------------
    # Image

    def set_image(
        self,
        pixels: np.ndarray,
        raw: np.ndarray | None = None,
        windows: list | tuple = (),
        photometric: str | None = None,
        *,
        inverted: bool | None = None,
        stored_range: tuple[float, float] | None = None,
        window_function: str = "LINEAR",
    ) -> None:
        """Show a new image, fitted to the view, with the default window and no overlays.

        Parameters
        ----------
        pixels : (H, W) float32 in [0, 1], display-ready (``Mammogram.pixels``)
        raw : (H, W) stored values (``Mammogram.raw``), for the DICOM's own windows
        windows : the DICOM's windows, ``(centre, width, explanation)`` in raw units
        photometric : DICOM photometric interpretation; MONOCHROME1 inverts raw windows
        inverted : whether high raw values are less dense (``meta["inverted"]``: MONOCHROME1 or
            Presentation LUT Shape INVERSE); given, it wins over ``photometric``
        stored_range : every value ``raw`` can hold (``meta["stored_range"]``), for the "Full
            stored range" preset; without it, the image's own minimum and maximum
        window_function : the DICOM VOI LUT Function of ``windows`` ("LINEAR" or "SIGMOID")
        """
        self.clear_overlays()
        self._pixels = pixels
        self._raw = raw
        self._index_cache = {}
        self._raw_inverted = ((photometric or "").upper() == "MONOCHROME1" if inverted is None
                              else bool(inverted))
        self._presets = [DEFAULT_PRESET]
        if raw is not None and raw.size:
            lo, hi = float(np.min(raw)), float(np.max(raw))
            full_lo, full_hi = (lo, hi) if stored_range is None else map(float, stored_range)
            # Quantised over everything a preset can show, so the stored range fits too
            top = max(hi, full_hi)
            self._raw_range = (min(lo, full_lo), top if top > min(lo, full_lo) else top + 1.0)
            for number, window in enumerate(windows or (), start=1):
                centre, width = float(window[0]), float(window[1])
                explanation = str(window[2]) if len(window) > 2 and window[2] else ""
                name = explanation or f"DICOM window {number}"
                self._presets.append(WindowPreset(f"{name} (C {centre:g} / W {width:g})", centre,
                                                  width, "raw", window_function.upper()))
            self._presets.append(WindowPreset(
                "Full stored range", (full_lo + full_hi) / 2.0, max(full_hi - full_lo, 1.0), "raw"))
            if (lo, hi) != (full_lo, full_hi):
                self._presets.append(
                    WindowPreset("Image minimum to maximum", (lo + hi) / 2.0, max(hi - lo, 1.0), "raw"))
        self._window = DEFAULT_PRESET
        height, width = pixels.shape
        self.scene().setSceneRect(QRectF(0, 0, width, height))
        self._render_image()
        self.fit_to_window()
        self.window_changed.emit(self._window.centre, self._window.width, self._window.source)

    def clear(self) -> None:
        """Show nothing."""
        self.clear_overlays()
        self._pixels = self._raw = None
        self._index_cache = {}
        self._rendered = None
        self._image_item.setPixmap(QPixmap())
        self._presets = [DEFAULT_PRESET]
        self._window = DEFAULT_PRESET

    def has_image(self) -> bool:
        return self._pixels is not None

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the image in pixels, (0, 0) when empty."""
        if self._pixels is None:
            return (0, 0)
        height, width = self._pixels.shape
        return (width, height)

    def image_item(self) -> QGraphicsPixmapItem:
        return self._image_item

    def rendered_grey(self) -> np.ndarray | None:
        """The (H, W) uint8 grey levels currently shown (before invert/flip by the view)."""
        return None if self._rendered is None else self._rendered.buffer

    def _index(self, source: str) -> np.ndarray:
        if source not in self._index_cache:
            if source == "raw" and self._raw is not None:
                self._index_cache[source] = render.quantise(self._raw, *self._raw_range)
            else:
                self._index_cache[source] = render.quantise(self._pixels, 0.0, 1.0)
        return self._index_cache[source]

    def _source_range(self, source: str) -> tuple[float, float]:
        return self._raw_range if source == "raw" and self._raw is not None else (0.0, 1.0)

    def _render_image(self, preview: bool = False) -> None:
        """Grey levels through the current window into the image item.

        ``preview`` (while right-dragging): when zoomed out, render only every n-th pixel,
        n screen-pixel-sized, and scale the item up by n, so the window follows the mouse on a
        13-megapixel image; the release renders the full image again.
        """
        if self._pixels is None:
            return
        source = self._window.source if self._raw is not None else "display"
        lo, hi = self._source_range(source)
        invert = self._inverted != (source == "raw" and self._raw_inverted)
        lut = render.window_lut(self._window.centre, self._window.width, lo, hi, invert,
                                self._window.function)
        index = self._index(source)
        step = max(1, math.floor(1.0 / self.zoom())) if preview else 1
        if step > 1:
            shown = render.grey_image(np.ascontiguousarray(index[::step, ::step]), lut)
            self._image_item.setPixmap(QPixmap.fromImage(shown.image))
            self._image_item.setScale(step)
            return
        self._rendered = render.grey_image(index, lut)
        self._image_item.setPixmap(QPixmap.fromImage(self._rendered.image))
        self._image_item.setScale(1.0)

    def _render_preview(self) -> None:
        self._render_image(preview=True)

    # ----------------------------------------------------------------------------------------
    # Window / level, invert, flip

    def window_presets(self) -> list[WindowPreset]:
        """Default first, then the DICOM's own windows, then the full stored range."""
        return list(self._presets)

    def window(self) -> WindowPreset:
        return self._window

    def set_window(self, centre: float, width: float, source: str = "display") -> None:
        lo, hi = self._source_range(source)
        minimum = (hi - lo) / render.INDEX_MAX * 2.0
        self._window = WindowPreset("Custom", float(centre), max(float(width), minimum), source)
        self._render_image()
        self.window_changed.emit(self._window.centre, self._window.width, self._window.source)

    def apply_preset(self, preset: WindowPreset) -> None:
        self._window = preset
        self._render_image()
        self.window_changed.emit(preset.centre, preset.width, preset.source)

    def reset_window(self) -> None:
        self.apply_preset(DEFAULT_PRESET)

    def set_inverted(self, inverted: bool) -> None:
        if inverted != self._inverted:
            self._inverted = inverted
            self._render_image()

    def is_inverted(self) -> bool:
        return self._inverted

    def set_flipped(self, flipped: bool) -> None:
        """Mirror the view left-right; scene (image) coordinates stay as they are."""
        if flipped != self._flipped:
            self._flipped = flipped
            self._apply_scale(self.zoom())

    def is_flipped(self) -> bool:
        return self._flipped

    # ----------------------------------------------------------------------------------------
    # Zoom

    def zoom(self) -> float:
        """Screen pixels per image pixel."""
        return abs(self.transform().m11()) or 1.0

    def _apply_scale(self, scale: float) -> None:
        scale = min(max(scale, ZOOM_MIN), ZOOM_MAX)
        self.setTransform(QTransform.fromScale(-scale if self._flipped else scale, scale))
        self.zoom_changed.emit(scale)

    def zoom_by(self, factor: float, anchor: QPointF | None = None) -> None:
        """Zoom by ``factor`` keeping the image point under ``anchor`` (viewport px) in place.

        Without an anchor the centre of the view stays put. Done by hand rather than with
        ``AnchorUnderMouse``, which follows the real pointer and so ignores where a wheel
        event says it happened.
        """
        self._fit_mode = False
        if anchor is None:
            anchor = QPointF(self.viewport().rect().center())
        point = anchor.toPoint()
        fixed = self.mapToScene(point)
        previous = self.transformationAnchor()
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.NoAnchor)
        self._apply_scale(self.zoom() * factor)
        self.setTransformationAnchor(previous)
        drift = self.mapFromScene(fixed) - point
        self.horizontalScrollBar().setValue(self.horizontalScrollBar().value() + drift.x())
        self.verticalScrollBar().setValue(self.verticalScrollBar().value() + drift.y())

    def zoom_in(self) -> None:
        self.zoom_by(ZOOM_STEP)

    def zoom_out(self) -> None:
        self.zoom_by(1.0 / ZOOM_STEP)

    def zoom_actual(self) -> None:
        """One image pixel per screen pixel."""
        self._fit_mode = False
        self._apply_scale(1.0)

    def fit_to_window(self) -> None:
        """The whole image in view, and kept so when the window resizes."""
        self._fit_mode = True
        width, height = self.image_size()
        if not width or not height:
            return
        view = self.viewport().rect()
        margin = 8  # px around the image
        scale = min(
            max(view.width() - 2 * margin, 1) / width, max(view.height() - 2 * margin, 1) / height
        )
        self._apply_scale(scale)
        self.centerOn(width / 2.0, height / 2.0)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self._fit_mode:
            self.fit_to_window()

    def wheelEvent(self, event: QWheelEvent) -> None:
        delta = event.angleDelta().y()
        if not delta or self._pixels is None:
            return
        self.zoom_by(ZOOM_STEP ** (delta / WHEEL_NOTCH), event.position())
        event.accept()

    # ----------------------------------------------------------------------------------------
    # Mouse: cursor readout, right-drag window/level (left-drag pans: ScrollHandDrag)

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.RightButton and self._pixels is not None:
            self._wl_drag_origin = event.position()
            self._wl_drag_start = self._window
            self.viewport().setCursor(Qt.CursorShape.SizeAllCursor)
            event.accept()
            return
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._wl_drag_origin is not None and self._wl_drag_start is not None:
            delta = event.position() - self._wl_drag_origin
            start = self._wl_drag_start
            lo, hi = self._source_range(start.source)
            per_px = (hi - lo) / WL_DRAG_SPAN
            # Right widens the window (less contrast); down lowers the centre (brighter image).
            width = start.width + delta.x() * per_px
            centre = start.centre - delta.y() * per_px
            lo_w = (hi - lo) / render.INDEX_MAX * 2.0
            self._window = WindowPreset("Custom", centre, max(width, lo_w), start.source, start.function)
            self.window_changed.emit(self._window.centre, self._window.width, start.source)
            if not self._wl_timer.isActive():
                self._wl_timer.start()
            event.accept()
        else:
            super().mouseMoveEvent(event)
        self._report_cursor(event.position())

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.RightButton and self._wl_drag_origin is not None:
            self._wl_drag_origin = self._wl_drag_start = None
            self._wl_timer.stop()
            self._render_image()
            self.viewport().unsetCursor()
            event.accept()
            return
        super().mouseReleaseEvent(event)

    def leaveEvent(self, event) -> None:
        self.cursor_left.emit()
        super().leaveEvent(event)

    def _report_cursor(self, position: QPointF) -> None:
        pixel = self.image_pixel_at(position)
        if pixel is None:
            self.cursor_left.emit()
        else:
            self.cursor_moved.emit(*pixel)

    def image_pixel_at(self, view_position: QPointF) -> tuple[int, int] | None:
        """(column, row) of the image pixel under a viewport position, None outside the image."""
        if self._pixels is None:
            return None
        scene = self.mapToScene(view_position.toPoint())
        x, y = math.floor(scene.x()), math.floor(scene.y())
        height, width = self._pixels.shape
        if 0 <= x < width and 0 <= y < height:
            return (x, y)
        return None

    # ----------------------------------------------------------------------------------------
    # Drag and drop of files and folders

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()
        else:
            super().dragEnterEvent(event)

    def dragMoveEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()
        else:
            super().dragMoveEvent(event)

    def dropEvent(self, event) -> None:
        paths = [url.toLocalFile() for url in event.mimeData().urls() if url.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.files_dropped.emit(paths)
        else:
            super().dropEvent(event)

    # ----------------------------------------------------------------------------------------
    # Overlays

    def clear_overlays(self) -> None:
        self._mask = None
        self._heatmap = None
        self._mask_fill_item.setPixmap(QPixmap())
        self._mask_outline_item.setPath(QPainterPath())
        self._heatmap_item.setPixmap(QPixmap())
        self._update_overlay_visibility()

    def set_mask(self, mask: np.ndarray | None) -> None:
        """The lesion mask, (H, W) bool at the image's full resolution."""
        if mask is not None and self._pixels is not None and mask.shape != self._pixels.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image {self._pixels.shape}")
        self._mask = mask
        if mask is None:
            self._mask_fill_item.setPixmap(QPixmap())
            self._mask_outline_item.setPath(QPainterPath())
        else:
            self._fill_stale = True  # rendered when first shown: outline mode never needs it
            self._mask_fill_item.setPixmap(QPixmap())
            self._mask_outline_item.setPath(render.mask_outline(mask))
            self._style_outline()
        self._update_overlay_visibility()

    def mask(self) -> np.ndarray | None:
        return self._mask

    def _render_mask_fill(self) -> None:
        if self._mask is None:
            return
        fill = render.mask_image(self._mask, self._mask_colour)
        self._mask_fill_item.setPixmap(QPixmap.fromImage(fill.image))
        self._fill_stale = False

    def _style_outline(self) -> None:
        pen = QPen(self._mask_colour)
        pen.setCosmetic(True)  # the same 2 screen px at any zoom
        pen.setWidthF(2.0)
        self._mask_outline_item.setPen(pen)

    def set_mask_style(
        self,
        mode: str | None = None,
        colour: QColor | None = None,
        opacity: float | None = None,
    ) -> None:
        """Outline or fill, the colour, and the fill's opacity (0 ... 1)."""
        if mode is not None:
            self._mask_mode = MASK_FILL if mode == MASK_FILL else MASK_OUTLINE
        if colour is not None and QColor(colour) != self._mask_colour:
            self._mask_colour = QColor(colour)
            self._fill_stale = True
            self._style_outline()
        if opacity is not None:
            self._mask_opacity = min(max(float(opacity), 0.0), 1.0)
        self._update_overlay_visibility()

    def mask_style(self) -> tuple[str, QColor, float]:
        return (self._mask_mode, QColor(self._mask_colour), self._mask_opacity)

    def set_mask_visible(self, visible: bool) -> None:
        self._mask_visible = bool(visible)
        self._update_overlay_visibility()

    def is_mask_visible(self) -> bool:
        return self._mask_visible

    def set_heatmap(self, heat: np.ndarray | None) -> None:
        """The explanation heatmap, (H, W) float in [0, 1] at the image's full resolution."""
        if heat is not None and self._pixels is not None and heat.shape != self._pixels.shape:
            raise ValueError(f"heatmap shape {heat.shape} differs from image {self._pixels.shape}")
        self._heatmap = heat
        if heat is None:
            self._heatmap_item.setPixmap(QPixmap())
        else:
            self._heatmap_item.setPixmap(QPixmap.fromImage(render.heatmap_image(heat).image))
        self._update_overlay_visibility()

    def heatmap(self) -> np.ndarray | None:
        return self._heatmap

    def set_heatmap_visible(self, visible: bool) -> None:
        self._heatmap_visible = bool(visible)
        self._update_overlay_visibility()

    def is_heatmap_visible(self) -> bool:
        return self._heatmap_visible

    def set_heatmap_opacity(self, opacity: float) -> None:
        self._heatmap_opacity = min(max(float(opacity), 0.0), 1.0)
        self._update_overlay_visibility()

    def heatmap_opacity(self) -> float:
        return self._heatmap_opacity

    def mask_fill_item(self) -> QGraphicsPixmapItem:
        return self._mask_fill_item

    def mask_outline_item(self) -> QGraphicsPathItem:
        return self._mask_outline_item

    def heatmap_item(self) -> QGraphicsPixmapItem:
        return self._heatmap_item

    def _update_overlay_visibility(self) -> None:
        has_mask = self._mask is not None
        if has_mask and self._mask_visible and self._mask_mode == MASK_FILL and self._fill_stale:
            self._render_mask_fill()
        self._mask_fill_item.setVisible(
            has_mask and self._mask_visible and self._mask_mode == MASK_FILL
        )
        self._mask_fill_item.setOpacity(self._mask_opacity)
        self._mask_outline_item.setVisible(
            has_mask and self._mask_visible and self._mask_mode == MASK_OUTLINE
        )
        self._heatmap_item.setVisible(self._heatmap is not None and self._heatmap_visible)
        self._heatmap_item.setOpacity(self._heatmap_opacity)
