"""The window without a model: opening every format, errors, recent files, navigation, settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from core.io import read_image
from desktop.dialogs import AboutDialog, DisclaimerDialog, ShortcutsDialog
from desktop.main_window import MainWindow
from tests.desktop.conftest import open_and_wait
from tests.desktop.test_viewer import send_mouse


def message_boxes(window) -> list[QMessageBox]:
    return [box for box in window.findChildren(QMessageBox) if box.isVisible()]


@pytest.mark.parametrize("kind", ["png", "jpg", "tif", "pgm", "dcm"])
def test_opens_each_supported_format(make_window, qtbot, format_files, kind):
    window = make_window()
    path = format_files[kind]
    open_and_wait(qtbot, window, path)
    assert window.mammogram is not None and window.mammogram.path == path
    assert window.viewer.has_image()
    expected = read_image(path)
    assert window.viewer.image_size() == (expected.pixels.shape[1], expected.pixels.shape[0])
    # The grey levels shown are core's display values through the identity window.
    shown = window.viewer.rendered_grey()
    assert np.abs(shown.astype(int) - np.round(expected.pixels * 255).astype(int)).max() <= 1
    assert path.name in window.windowTitle()
    assert window.recent_files()[0] == str(path)
    assert not message_boxes(window)
    if kind == "dcm":
        assert window.tags.visible_tags()
    else:
        assert window.tags.visible_tags() == []


@pytest.mark.parametrize("which", ["text", "empty", "truncated", "missing"])
def test_unreadable_file_gives_a_clear_dialog_and_the_app_goes_on(
    make_window, qtbot, bad_files, format_files, which, tmp_path
):
    window = make_window()
    open_and_wait(qtbot, window, format_files["png"])
    good = window.mammogram
    path = bad_files.get(which, tmp_path / "no-such-image.dcm")
    with qtbot.waitSignal(window.error_shown) as blocker:
        window.open_paths([str(path)])
    title, message = blocker.args
    assert title == "Cannot open image"
    assert path.name in message and "could not be opened" in message
    assert "Traceback" not in message
    assert any(box.text() == message for box in message_boxes(window))
    assert window.mammogram is good  # the previous image stays on screen
    # ... and the app keeps working.
    open_and_wait(qtbot, window, format_files["pgm"])
    assert window.mammogram.path == format_files["pgm"]


def test_the_error_names_the_file_as_given_with_its_parent_dots(make_window, qtbot, tmp_path,
                                                              monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    window = make_window()
    with qtbot.waitSignal(window.error_shown) as blocker:
        window.open_paths(["../no-such-image.png"])
    _, message = blocker.args
    assert message.startswith(str(Path("..") / "no-such-image.png") + "\n")
    assert not message.endswith("..")


def test_status_bar_shows_position_raw_value_and_zoom(make_window, qtbot, format_files):
    window = make_window()
    open_and_wait(qtbot, window, format_files["dcm"])
    viewer = window.viewer
    raw = window.mammogram.raw
    x, y = raw.shape[1] * 2 // 3, raw.shape[0] // 2  # inside the breast
    viewer.zoom_actual()
    viewer.zoom_by(4.0)  # 4 screen px per image px: the pixel's centre is unambiguous
    viewer.centerOn(x + 0.5, y + 0.5)
    pos = viewer.mapFromScene(QPointF(x + 0.5, y + 0.5))
    send_mouse(viewer.viewport(), QEvent.Type.MouseMove, QPointF(pos))
    assert window.position_label.text() == f"x {x}  y {y}"
    assert window.value_label.text() == f"value {int(raw[y, x])}"
    assert window.zoom_label.text() == "zoom 400 %"


def test_folder_navigation_next_and_previous(make_window, qtbot, tmp_path, mias_dir):
    folder = tmp_path / "films"
    folder.mkdir()
    names = ["mdb001.png", "mdb002.png", "mdb007.png"]
    for name in names:
        shutil.copy(mias_dir / name, folder / name)
    (folder / "readme.txt").write_text("not an image")
    window = make_window()
    nothing_open = [a.isEnabled() for a in (window.next_action, window.previous_action,
                                            window.reanalyse_action)]
    assert nothing_open == [False, False, False]  # nothing to step through or analyse again
    window.load_bundle(None)  # a model, still no image: nothing to analyse again
    assert not window.reanalyse_action.isEnabled()
    open_and_wait(qtbot, window, folder / "mdb002.png")
    assert window.reanalyse_action.isEnabled()
    assert [p.name for p in window.navigation_files()] == names
    with qtbot.waitSignal(window.image_job_finished):
        window.next_action.trigger()
    assert window.mammogram.path.name == "mdb007.png"
    assert not window.next_action.isEnabled()
    with qtbot.waitSignal(window.image_job_finished):
        window.previous_action.trigger()
    with qtbot.waitSignal(window.image_job_finished):
        window.previous_action.trigger()
    assert window.mammogram.path.name == "mdb001.png"
    assert not window.previous_action.isEnabled()


# PySide6 6.12 marks the only QDragEnterEvent constructor deprecated; there is no other yet.
@pytest.mark.filterwarnings("ignore:Function.*QDragEnterEvent:DeprecationWarning")
def test_dropping_a_folder_opens_its_first_image(make_window, qtbot, tmp_path, mias_dir):
    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(mias_dir / "mdb007.png", folder / "sub" / "b.png")
    shutil.copy(mias_dir / "mdb001.png", folder / "a.png")
    window = make_window()
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(folder))])
    enter = QDragEnterEvent(
        window.rect().center(), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )  # fmt: skip
    QApplication.sendEvent(window, enter)
    assert enter.isAccepted()
    drop = QDropEvent(
        QPointF(window.rect().center()), Qt.DropAction.CopyAction, mime,
        Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
    )  # fmt: skip
    with qtbot.waitSignal(window.image_job_finished):
        QApplication.sendEvent(window.viewer.viewport(), drop)
    assert window.mammogram.path == folder / "a.png"
    assert [p.name for p in window.navigation_files()] == ["a.png", "b.png"]


def test_recent_files_menu_reopens(make_window, qtbot, format_files):
    window = make_window()
    open_and_wait(qtbot, window, format_files["png"])
    open_and_wait(qtbot, window, format_files["pgm"])
    actions = [a for a in window.recent_menu.actions() if a.text() and not a.isSeparator()]
    assert "mdb001.pgm" in actions[0].text() and "mdb001.png" in actions[1].text()
    with qtbot.waitSignal(window.image_job_finished):
        actions[1].trigger()
    assert window.mammogram.path == format_files["png"]


def test_settings_survive_a_restart(make_window, qtbot, settings, format_files):
    window = make_window()
    open_and_wait(qtbot, window, format_files["png"])
    window.resize(701, 523)  # within the offscreen screen (800 x 600)
    window.heatmap_action.setChecked(True)
    window.results.mask_opacity.setValue(70)
    window.results.set_mask_mode("fill")
    window.close()
    again = make_window(size=None)
    assert again.size().toTuple() == (701, 523)
    assert again.recent_files()[0] == str(format_files["png"])
    assert again.last_folder() == str(format_files["png"].parent)
    assert again.heatmap_action.isChecked() and again.viewer.is_heatmap_visible()
    assert again.results.mask_opacity.value() == 70
    assert again.viewer.mask_style()[0] == "fill" and again.mask_fill_action.isChecked()
    assert again.results.mask_opacity.isEnabled()  # a fill's opacity; an outline has none
    again.results.set_mask_mode("outline")
    assert not again.results.mask_opacity.isEnabled()


def test_mask_toggle_in_menu_and_panel_stay_in_step(make_window):
    window = make_window()
    assert window.mask_action.isChecked() and window.results.mask_check.isChecked()
    window.mask_action.trigger()
    assert not window.results.mask_check.isChecked() and not window.viewer.is_mask_visible()
    window.results.heatmap_check.setChecked(True)
    assert window.heatmap_action.isChecked() and window.viewer.is_heatmap_visible()


def test_shortcuts_dialog_lists_the_keys(make_window):
    window = make_window()
    entries = dict(ShortcutsDialog(window.shortcut_actions(), window).entries())
    assert entries["Fit to Window"].startswith("F")
    assert entries["Actual Size (1:1)"].startswith("1")
    assert entries["Invert Grey Levels"] == "I"
    assert entries["Lesion Mask"] == "M"
    assert entries["Explanation Heatmap"] == "H"
    assert entries["Compare with the Other Breast"] == "B"
    assert entries["Next Image"].startswith("PgDown")
    assert entries["Previous Image"].startswith("PgUp")
    for name in ("Open", "Zoom In", "Zoom Out", "Flip Horizontally", "Quit"):
        assert entries[name], name  # Quit: also where the platform binds no standard key


def test_about_names_sources_and_licences(make_window):
    text = AboutDialog("test model", make_window()).text()
    for needle in ("Suckling", "research use only", "Heath", "Lekamlage", "CC BY 3.0",
                   "EfficientNet-Lite0", "Apache", "not for diagnosis"):  # fmt: skip
        assert needle.lower() in text.lower(), needle


def test_disclaimer_shown_on_first_start_until_acknowledged(qtbot, make_window, settings):
    window = make_window(show_disclaimer=True)
    dialog = (
        qtbot.waitUntil(lambda: bool(window.findChildren(DisclaimerDialog)))
        or (window.findChildren(DisclaimerDialog)[0])
    )
    ok = dialog.buttons.buttons()[0]
    assert not ok.isEnabled()  # only after ticking "I understand"
    dialog.understood.setChecked(True)
    ok.click()
    assert window.disclaimer_acknowledged()
    window.close()
    again = MainWindow(settings=settings, show_disclaimer=True)
    qtbot.addWidget(again)
    again.show()
    qtbot.wait(50)
    assert not [d for d in again.findChildren(DisclaimerDialog) if d.isVisible()]
    again.close()


def test_without_a_model_the_viewer_still_works(make_window, qtbot, format_files):
    window = make_window(analyzer=None)
    open_and_wait(qtbot, window, format_files["png"])
    assert window.analysis is None
    assert "No model" in window.results.model_text()
    assert not window.classify_folder_action.isEnabled()


def test_single_key_shortcuts_reach_the_actions(make_window, qtbot, format_files):
    window = make_window()
    open_and_wait(qtbot, window, format_files["png"])
    window.activateWindow()
    qtbot.waitActive(window)
    window.viewer.setFocus()
    mask_before = window.mask_action.isChecked()
    qtbot.keyClick(window.viewer, Qt.Key.Key_M)
    assert window.mask_action.isChecked() != mask_before
    qtbot.keyClick(window.viewer, Qt.Key.Key_I)
    assert window.viewer.is_inverted()
    qtbot.keyClick(window.viewer, Qt.Key.Key_1)
    assert window.viewer.zoom() == pytest.approx(1.0)
    qtbot.keyClick(window.viewer, Qt.Key.Key_F)
    assert window.viewer.zoom() < 1.0
    # Typing in the tag search box types; it does not toggle overlays.
    window.tags_dock.show()
    window.tags_dock.raise_()
    window.tags.search.setFocus()
    mask_state = window.mask_action.isChecked()
    qtbot.keyClicks(window.tags.search, "m")
    assert window.tags.search.text() == "m"
    assert window.mask_action.isChecked() == mask_state


def test_window_preset_box_follows_the_viewer(make_window, qtbot, format_files):
    window = make_window()
    open_and_wait(qtbot, window, format_files["dcm"])
    combo = window.window_combo
    assert combo.currentText() == window.viewer.window_presets()[0].name
    window.viewer.set_window(0.3, 0.4)
    assert combo.currentIndex() == -1  # "Custom window"
    window.reset_window_action.trigger()
    assert combo.currentIndex() == 0
    last = window.viewer.window_presets()[-1]
    combo.activated.emit(combo.count() - 1)
    assert window.viewer.window() == last and combo.currentText() == last.name


def test_a_bundle_loaded_from_the_menu_is_used_again_at_the_next_start(make_window, settings, analyzer,
                                                                      tmp_path, monkeypatch):
    """Load Model Bundle is remembered; Use Bundled Model forgets it; a remembered bundle that no
    longer loads gives way to the bundled model, is reported once, and is forgotten."""
    from core.paths import default_bundle_dir
    from desktop.app import startup_model
    from desktop.main_window import LAST_BUNDLE_KEY
    from tests.conftest import edited_bundle

    mine = edited_bundle(default_bundle_dir(), tmp_path / "mine", lambda card: card.update(name="Mine"))
    window = make_window(analyzer=analyzer)
    assert window.load_bundle(mine)
    assert settings.value(LAST_BUNDLE_KEY) == str(mine.resolve())
    started, message = startup_model(None, settings)
    assert started.name == "Mine" and message == ""
    started, _ = startup_model(str(default_bundle_dir()), settings)  # --model wins
    assert started.name != "Mine"
    assert window.load_bundle(None)
    assert settings.value(LAST_BUNDLE_KEY) == ""
    assert startup_model(None, settings)[0].name == analyzer.name

    settings.setValue(LAST_BUNDLE_KEY, str(tmp_path / "gone"))
    started, message = startup_model(None, settings)
    assert started is not None and started.name == analyzer.name
    assert message.startswith(f"The model bundle {tmp_path / 'gone'}, last loaded from the Analysis menu, "
                              "could not be loaded:")
    assert message.endswith(f"MammoLab uses {analyzer.name} v{analyzer.version} instead.")
    assert settings.value(LAST_BUNDLE_KEY) == ""


def test_status_bar_values_are_not_rounded_to_look_whole():
    from desktop.main_window import format_raw

    assert format_raw(np.float32(1084.25)) == "1084.25"
    assert format_raw(np.float32(0.1)) == "0.1"
    assert format_raw(np.int32(-2000)) == "-2000"
    assert format_raw(np.float32(514.25)) == "514.25"


def test_the_image_line_says_uneven_spacing_and_which_frame_is_shown():
    from core.io import Mammogram
    from desktop.main_window import MainWindow

    def line(**meta):
        m = Mammogram(pixels=np.zeros((40, 30), np.float32), raw=None, meta={"format": "DICOM", **meta},
                      path=None)
        return MainWindow._describe_image(m, Path("x.dcm"))

    assert "0.07 mm/px" in line(pixel_spacing_mm=(0.07, 0.07), frames=1)
    uneven = line(pixel_spacing_mm=(0.07, 0.05), frames=3)
    assert "0.07 × 0.05 mm/px (row × column)" in uneven and "frame 1 of 3 shown" in uneven
    assert "frame" not in line(frames=1)
