"""The viewer: zoom, fit, flip, window/level by right-drag and presets, cursor readout."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPointF, Qt
from PySide6.QtGui import QColor, QMouseEvent, QWheelEvent
from PySide6.QtWidgets import QApplication

from core.io import read_image
from desktop.viewer import DEFAULT_PRESET, MASK_FILL, ImageViewerWidget


@pytest.fixture
def viewer(qtbot):
    widget = ImageViewerWidget()
    qtbot.addWidget(widget)
    widget.resize(600, 800)
    widget.show()
    qtbot.waitExposed(widget)
    return widget


def ramp(height=400, width=300) -> np.ndarray:
    """Display values rising left to right, 0 ... 1."""
    return np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))


def send_mouse(widget, kind, pos, button=Qt.MouseButton.NoButton, buttons=None):
    buttons = button if buttons is None else buttons
    event = QMouseEvent(
        kind, QPointF(pos), widget.mapToGlobal(QPointF(pos)), button, buttons,
        Qt.KeyboardModifier.NoModifier,
    )  # fmt: skip
    QApplication.sendEvent(widget, event)


def test_fit_shows_the_whole_image_and_keeps_one_scene_unit_per_pixel(viewer):
    viewer.set_image(ramp(400, 300))
    rect = viewer.mapToScene(viewer.viewport().rect()).boundingRect()
    assert rect.contains(viewer.image_item().boundingRect())
    assert viewer.image_item().boundingRect().size().toTuple() == (300, 400)
    assert viewer.zoom() == pytest.approx(min((600 - 16) / 300, (800 - 16) / 400), rel=0.05)


def test_zoom_in_out_and_actual_size(viewer):
    viewer.set_image(ramp())
    start = viewer.zoom()
    viewer.zoom_in()
    assert viewer.zoom() == pytest.approx(start * 1.25)
    viewer.zoom_out()
    viewer.zoom_out()
    assert viewer.zoom() == pytest.approx(start / 1.25)
    viewer.zoom_actual()
    assert viewer.zoom() == pytest.approx(1.0)


def test_wheel_zooms_around_the_cursor(viewer):
    viewer.set_image(ramp(2000, 1500))
    viewer.zoom_actual()
    pos = QPointF(150, 200)
    before = viewer.mapToScene(pos.toPoint())
    viewer.setFocus()
    send_mouse(viewer.viewport(), QEvent.Type.MouseMove, pos)
    wheel = QWheelEvent(
        pos, viewer.viewport().mapToGlobal(pos), QPointF(0, 0).toPoint(), QPointF(0, 120).toPoint(),
        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase,
        False,
    )  # fmt: skip
    QApplication.sendEvent(viewer.viewport(), wheel)
    assert viewer.zoom() == pytest.approx(1.25)
    after = viewer.mapToScene(pos.toPoint())
    # The image point under the cursor stays under it (to within a screen pixel).
    assert abs(after.x() - before.x()) <= 1.5 and abs(after.y() - before.y()) <= 1.5


def test_flip_mirrors_the_view_but_not_the_image_coordinates(viewer):
    viewer.set_image(ramp(400, 300))
    left = viewer.mapFromScene(QPointF(10.5, 200.5))
    right = viewer.mapFromScene(QPointF(290.5, 200.5))
    assert left.x() < right.x()
    viewer.set_flipped(True)
    left = viewer.mapFromScene(QPointF(10.5, 200.5))
    right = viewer.mapFromScene(QPointF(290.5, 200.5))
    assert left.x() > right.x()
    assert viewer.image_pixel_at(QPointF(left)) == (10, 200)


def test_right_drag_changes_the_window_and_reset_restores_it(viewer, qtbot):
    viewer.set_image(ramp())
    grey_before = viewer.rendered_grey().copy()
    port = viewer.viewport()
    send_mouse(port, QEvent.Type.MouseButtonPress, QPointF(300, 400), Qt.MouseButton.RightButton)
    send_mouse(
        port, QEvent.Type.MouseMove, QPointF(180, 460), Qt.MouseButton.NoButton,
        Qt.MouseButton.RightButton,
    )  # fmt: skip
    send_mouse(port, QEvent.Type.MouseButtonRelease, QPointF(180, 460), Qt.MouseButton.RightButton)
    window = viewer.window()
    assert window.width == pytest.approx(1.0 - 120 / 600)  # narrower: more contrast
    assert window.centre == pytest.approx(0.5 - 60 / 600)  # lower level: brighter
    grey = viewer.rendered_grey()
    assert not np.array_equal(grey, grey_before)
    assert grey[0, 150] > grey_before[0, 150]
    viewer.reset_window()
    assert viewer.window() == DEFAULT_PRESET
    assert np.array_equal(viewer.rendered_grey(), grey_before)


def test_dicom_windows_become_presets_in_raw_units(viewer):
    raw = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (50, 1))  # 256 columns, 0..4080
    pixels = raw.astype(np.float32) / 4095
    viewer.set_image(pixels, raw, [(2000.0, 400.0, "DENSE"), (1000.0, 2000.0, "")], "MONOCHROME2")
    names = [p.name for p in viewer.window_presets()]
    assert names[0] == DEFAULT_PRESET.name
    assert names[1].startswith("DENSE") and names[2].startswith("DICOM window 2")
    viewer.apply_preset(viewer.window_presets()[1])
    grey = viewer.rendered_grey()
    column = {int(v): i for i, v in enumerate(raw[0])}
    assert grey[0, column[1792]] == 0  # below 2000 - 200
    assert grey[0, column[2208]] == 255  # above 2000 + 200
    assert 120 <= grey[0, column[2000]] <= 136


def test_monochrome1_raw_windows_keep_dense_tissue_bright(viewer):
    raw = np.tile(np.arange(0, 256, dtype=np.uint16), (10, 1))
    pixels = 1.0 - raw.astype(np.float32) / 255  # MONOCHROME1: core already inverted pixels
    viewer.set_image(pixels, raw, [(128.0, 256.0, "")], "MONOCHROME1")
    default = viewer.rendered_grey().copy()
    viewer.apply_preset(viewer.window_presets()[1])
    assert default[0, 0] == 255 and viewer.rendered_grey()[0, 0] >= 250


def test_every_preset_keeps_the_grey_direction_of_an_inverse_presentation_lut(viewer, tmp_path):
    """MONOCHROME2 with Presentation LUT Shape INVERSE: core inverts the default view; the raw
    presets have to follow it, or picking one shows a negative."""
    from tests.core.test_io import write_dicom

    arr = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (20, 1))
    m = read_image(write_dicom(tmp_path / "i.dcm", arr, bits_stored=12, PresentationLUTShape="INVERSE",
                               WindowCenter=2048, WindowWidth=2048))
    meta = m.meta
    viewer.set_image(m.pixels, m.raw, meta["windows"], meta["photometric"], inverted=meta["inverted"],
                     stored_range=meta["stored_range"], window_function=meta["window_function"])
    for preset in viewer.window_presets():
        viewer.apply_preset(preset)
        grey = viewer.rendered_grey()[0]
        assert grey[0] > grey[-1], preset.name  # low stored values are the dense ones here


def test_full_stored_range_and_sigmoid_presets_follow_the_file(viewer, tmp_path):
    from tests.core.test_io import write_dicom

    arr = np.tile(np.linspace(-2000, 2000, 256).astype(np.int16), (10, 1))
    m = read_image(write_dicom(tmp_path / "s.dcm", arr, bits_stored=16))
    viewer.set_image(m.pixels, m.raw, [], None, stored_range=m.meta["stored_range"])
    presets = {p.name: p for p in viewer.window_presets()}
    viewer.apply_preset(presets["Full stored range"])  # -32768 .. 32767: a narrow grey band
    assert 115 <= viewer.rendered_grey()[0, 0] and viewer.rendered_grey()[0, -1] <= 140
    viewer.apply_preset(presets["Image minimum to maximum"])
    assert viewer.rendered_grey()[0, 0] == 0 and viewer.rendered_grey()[0, -1] == 255

    ramp12 = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (10, 1))
    m = read_image(write_dicom(tmp_path / "g.dcm", ramp12, bits_stored=12, WindowCenter=2048,
                               WindowWidth=1000, VOILUTFunction="SIGMOID"))
    viewer.set_image(m.pixels, m.raw, m.meta["windows"], None,
                     window_function=m.meta["window_function"], stored_range=m.meta["stored_range"])
    default = viewer.rendered_grey().copy()
    viewer.apply_preset(viewer.window_presets()[1])
    assert viewer.window_presets()[1].function == "SIGMOID"
    assert np.abs(viewer.rendered_grey().astype(int) - default.astype(int)).max() <= 2


def test_invert(viewer):
    viewer.set_image(ramp())
    before = viewer.rendered_grey().copy()
    viewer.set_inverted(True)
    assert (viewer.rendered_grey().astype(int) + before.astype(int) == 255).all()


def test_cursor_reports_image_pixel(viewer, qtbot):
    viewer.set_image(ramp(400, 300))
    target = viewer.mapFromScene(QPointF(123.5, 77.5))
    with qtbot.waitSignal(viewer.cursor_moved) as blocker:
        send_mouse(viewer.viewport(), QEvent.Type.MouseMove, QPointF(target))
    assert blocker.args == [123, 77]


def test_mask_overlay_sits_on_the_image_pixels(viewer):
    viewer.set_image(ramp(100, 80))
    mask = np.zeros((100, 80), bool)
    mask[30:50, 20:40] = True
    viewer.set_mask(mask)
    viewer.set_mask_style(mode=MASK_FILL, colour=QColor(0, 255, 0))
    item = viewer.mask_fill_item()
    assert item.isVisible()
    image = item.pixmap().toImage()
    inside = item.mapFromScene(QPointF(25.5, 35.5))
    outside = item.mapFromScene(QPointF(45.5, 35.5))
    assert QColor.fromRgba(image.pixel(int(inside.x()), int(inside.y()))).getRgb() == (
        0,
        255,
        0,
        255,
    )
    assert QColor.fromRgba(image.pixel(int(outside.x()), int(outside.y()))).alpha() == 0
    outline = viewer.mask_outline_item()
    assert not outline.isVisible()  # fill mode shows the fill only
    assert outline.path().contains(QPointF(25.5, 35.5))
    viewer.set_mask_style(colour=QColor(0, 0, 255))  # a new colour re-renders the fill
    image = item.pixmap().toImage()
    assert QColor.fromRgba(image.pixel(int(inside.x()), int(inside.y()))).getRgb() == (
        0,
        0,
        255,
        255,
    )
    viewer.set_mask_visible(False)
    assert not item.isVisible()


def test_overlay_shape_must_match_the_image(viewer):
    viewer.set_image(ramp(100, 80))
    with pytest.raises(ValueError, match="differs"):
        viewer.set_mask(np.zeros((80, 100), bool))


def test_dragging_the_window_previews_coarsely_then_renders_in_full(viewer, qtbot):
    viewer.set_image(ramp(3000, 2000))  # zoomed out to about a quarter
    assert viewer.zoom() < 0.5
    port = viewer.viewport()
    send_mouse(port, QEvent.Type.MouseButtonPress, QPointF(300, 400), Qt.MouseButton.RightButton)
    send_mouse(
        port, QEvent.Type.MouseMove, QPointF(250, 400), Qt.MouseButton.NoButton,
        Qt.MouseButton.RightButton,
    )  # fmt: skip
    item = viewer.image_item()
    qtbot.waitUntil(lambda: item.scale() > 1.0, timeout=2000)
    step = item.scale()
    assert item.pixmap().width() == -(-2000 // int(step))  # every step-th column
    assert item.sceneBoundingRect().width() == pytest.approx(2000, abs=step)
    send_mouse(port, QEvent.Type.MouseButtonRelease, QPointF(250, 400), Qt.MouseButton.RightButton)
    assert item.scale() == 1.0 and item.pixmap().width() == 2000
    assert viewer.window().width == pytest.approx(1.0 - 50 / 600)
