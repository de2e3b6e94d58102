"""With the real bundled model: the bars show core's numbers, the mask lies on core's mask, the
heatmap is core's, and a bad bundle is refused while the current model stays."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from PySide6.QtCore import QPointF
from PySide6.QtGui import QColor

from core.io import read_image
from core.pairing import find_other_breast
from core.paths import default_bundle_dir
from desktop.results import BAR_STEPS, percent_text
from desktop.viewer import MASK_FILL
from tests.desktop.conftest import open_and_wait


def deepest_pixel(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``region`` farthest from its edge: unambiguously inside it."""
    # Padded so the image border counts as an edge (OpenCV treats beyond-the-image as inside).
    padded = np.pad(region.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


@pytest.fixture(scope="module")
def dicom_case(analyzer, cbis_dicoms):
    """The smallest CBIS-DDSM DICOM, and core's own analysis of it."""
    path = min(cbis_dicoms, key=lambda p: p.stat().st_size)
    return path, analyzer.analyze(read_image(path))


def test_bars_show_exactly_the_probabilities_core_computes(
    make_window, qtbot, analyzer, dicom_case, settings
):
    path, expected = dicom_case
    settings.setValue("analysis/compare_other_breast", "false")  # the film alone
    window = make_window(analyzer=analyzer, with_heatmap=False)
    assert not window.compare_action.isChecked()
    open_and_wait(qtbot, window, path)
    assert "comparison with the other breast is off" in window.results.pairing_text()
    assert window.other_breast is None
    bars = window.results.bars
    assert bars.classes() == tuple(analyzer.classes)
    np.testing.assert_array_equal(window.analysis.probabilities, expected.probabilities)
    assert bars.value_texts() == [percent_text(p) for p in expected.probabilities]
    assert bars.bar_values() == [round(float(p) * BAR_STEPS) for p in expected.probabilities]
    assert bars.emphasised() == [expected.predicted]
    assert f"{100 * expected.lesion_area_frac:.2f} %" in window.results.lesion_area_text()
    assert analyzer.name in window.results.model_text()
    assert analyzer.version in window.results.model_text()


def test_an_image_without_a_breast_says_so_and_shows_no_reading(make_window, qtbot, analyzer, tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((600, 400), 10, np.uint8))  # 4 % grey: no tissue
    window = make_window(analyzer=analyzer, with_heatmap=False)
    with qtbot.waitSignal(window.error_shown, timeout=60000) as blocker:
        window.open_paths([str(blank)])
    title, message = blocker.args
    assert title == "Analysis failed"
    assert message.startswith("The models cannot read this image:\n\nblank.png: no breast found: the image "
                              "is blank or too dark (its brightest pixel is 3.9 % of full scale")
    assert "Traceback" not in message and "model bundle" not in message
    assert window.mammogram is not None and window.mammogram.path == blank  # still shown
    assert window.analysis is None
    assert window.results.bars.value_texts() == ["—"] * 3
    assert window.results.status_text().startswith("Not analysed: no breast found: the image is blank")


def test_a_film_is_read_beside_the_other_breast(make_window, qtbot, analyzer, dicom_case, settings):
    path, expected = dicom_case
    partner = find_other_breast(path)
    assert partner is not None and partner != path
    want = analyzer.compare(expected, analyzer.analyze(read_image(partner)))
    window = make_window(analyzer=analyzer)
    assert window.compare_action.isChecked()  # on by default
    open_and_wait(qtbot, window, path)
    bars = window.results.bars
    assert window.other_breast is not None and window.other_breast.path == partner
    assert bars.value_texts() == [percent_text(p) for p in want]
    assert bars.emphasised() == [analyzer.call_pair(want)]
    note = window.results.pairing_text()
    assert partner.name in note and "Read alone:" in note
    assert percent_text(float(expected.probabilities[0])) in note
    # The lesion overlay is still the film's own.
    np.testing.assert_array_equal(window.analysis.lesion_mask, expected.lesion_mask)
    # The heatmap explains the film alone, and says so.
    assert f"explains the film read alone ({expected.predicted})" in window.results.heatmap_status_text()

    # Switching the comparison off re-reads the film alone, and is remembered.
    with qtbot.waitSignal(window.image_job_finished, timeout=60000):
        window.compare_action.setChecked(False)
    assert bars.value_texts() == [percent_text(p) for p in expected.probabilities]
    assert window.other_breast is None
    assert settings.value("analysis/compare_other_breast") == "false"


def test_a_film_without_its_other_breast_is_read_alone(make_window, qtbot, analyzer, mias_dir, tmp_path):
    shutil.copy(mias_dir / "mdb001.png", tmp_path / "mdb001.png")
    expected = analyzer.analyze(read_image(tmp_path / "mdb001.png"))
    window = make_window(analyzer=analyzer, with_heatmap=False)
    open_and_wait(qtbot, window, tmp_path / "mdb001.png")
    assert "Read alone: no film of the other breast" in window.results.pairing_text()
    assert window.results.bars.value_texts() == [percent_text(p) for p in expected.probabilities]
    # A partner that cannot be read is said, and the film is still read alone.
    (tmp_path / "mdb002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    open_and_wait(qtbot, window, tmp_path / "mdb001.png")
    note = window.results.pairing_text()
    assert "mdb002.png could not be analysed" in note
    assert window.results.bars.value_texts() == [percent_text(p) for p in expected.probabilities]


def test_mask_overlay_lines_up_with_core_mask(make_window, qtbot, analyzer, dicom_case):
    path, expected = dicom_case
    mask = expected.lesion_mask
    if not mask.any():
        pytest.skip("the model finds no lesion on this image")
    window = make_window(analyzer=analyzer, with_heatmap=False)
    open_and_wait(qtbot, window, path)
    np.testing.assert_array_equal(window.viewer.mask(), mask)
    window.results.set_mask_mode(MASK_FILL)
    window.results.mask_opacity.setValue(100)
    item = window.viewer.mask_fill_item()
    assert item.isVisible() and item.pos() == QPointF(0, 0) and item.scale() == 1.0
    image = item.pixmap().toImage()
    assert (image.width(), image.height()) == (mask.shape[1], mask.shape[0])

    inside = deepest_pixel(mask)
    outside = deepest_pixel(~mask & expected.breast_mask)
    for (x, y), lesion in ((inside, True), (outside, False)):
        scene = QPointF(x + 0.5, y + 0.5)  # the centre of image pixel (x, y)
        # Which overlay pixel lies there, found through the scene, not assumed.
        local = item.mapFromScene(scene)
        alpha = QColor.fromRgba(image.pixel(int(local.x()), int(local.y()))).alpha()
        assert (alpha > 0) == lesion
        assert window.viewer.image_item().mapFromScene(scene) == local  # same coordinates
        assert window.viewer.mask_outline_item().path().contains(scene) == lesion

    # Alignment holds at any zoom and with the view flipped: the mapping is the view's alone.
    window.viewer.zoom_actual()
    window.viewer.zoom_by(3.0)
    window.viewer.set_flipped(True)
    view_point = window.viewer.mapFromScene(QPointF(inside[0] + 0.5, inside[1] + 0.5))
    assert window.viewer.image_pixel_at(QPointF(view_point)) == inside


def test_heatmap_is_core_heatmap(make_window, qtbot, analyzer, format_files):
    path = format_files["png"]
    window = make_window(analyzer=analyzer)
    with qtbot.waitSignal(window.heatmap_shown, timeout=120000) as blocker:
        window.open_paths([str(path)])
    heat = blocker.args[0]
    mammogram = read_image(path)
    expected = analyzer.heatmap(mammogram, analyzer.analyze(mammogram))
    assert heat.shape == mammogram.pixels.shape
    np.testing.assert_allclose(heat, expected, atol=1e-6)
    window.heatmap_action.setChecked(True)
    assert window.viewer.heatmap_item().isVisible()
    assert window.viewer.heatmap_item().pixmap().size().toTuple() == heat.shape[::-1]


def test_bad_bundle_is_refused_and_the_model_stays(make_window, qtbot, analyzer, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir(), bad)
    with open(bad / "classifier.tflite", "r+b") as f:  # one flipped byte: checksum mismatch
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    window = make_window(analyzer=analyzer)
    with qtbot.waitSignal(window.error_shown) as blocker:
        assert window.load_bundle(bad) is False
    title, message = blocker.args
    assert title == "Model bundle refused"
    assert "checksum" in message and "classifier.tflite" in message
    assert f"keeps using {analyzer.name} v{analyzer.version}" in message
    assert window.analyzer is analyzer

    (tmp_path / "empty").mkdir()
    with qtbot.waitSignal(window.error_shown) as blocker:
        assert window.load_bundle(tmp_path / "empty") is False
    assert "model.json" in blocker.args[1]
    assert window.analyzer is analyzer


def test_another_good_bundle_replaces_the_model(make_window, qtbot, analyzer, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(default_bundle_dir(), other)
    window = make_window(analyzer=analyzer)
    with qtbot.waitSignal(window.model_changed):
        assert window.load_bundle(other)
    assert window.analyzer is not analyzer and window.analyzer.path == other
    assert json.loads((other / "model.json").read_text())["version"] in window.results.model_text()


def test_model_card_renders_the_bundle_card(make_window, analyzer):
    from desktop.dialogs import ModelCardDialog

    window = make_window(analyzer=analyzer)
    text = ModelCardDialog(analyzer.card, analyzer.path, window).text()
    card = (analyzer.path / "MODEL_CARD.md").read_text(encoding="utf-8")
    first_heading = next(line for line in card.splitlines() if line.startswith("#"))
    assert first_heading.lstrip("# ").strip() in text
    assert analyzer.version in text and str(analyzer.path) in text
    assert window.model_card_action.isEnabled()


def test_a_pair_called_off_its_most_probable_class_says_why(qtbot, analyzer, dicom_case):
    from desktop.results import ResultsWidget
    from desktop.workers import OtherBreast

    path, single = dicom_case
    panel = ResultsWidget()
    qtbot.addWidget(panel)
    panel.show_analysis(single)
    probs = np.array([0.5, 0.3, 0.2], np.float32)
    panel.show_other_breast(OtherBreast(path, probs, "Benign", single))
    assert panel.bars.emphasised() == ["Benign"]
    assert panel.bars.value_texts() == [percent_text(p) for p in probs]  # the bars are unchanged
    text = panel.predicted_text()
    assert "Model's call: <b>Benign</b>" in text and "Normal is more probable" in text
    # The explanation wraps: it must not widen the dock (which clipped every line beside it).
    assert panel.minimumSizeHint().width() < 360
    panel.show_other_breast(OtherBreast(path, probs, "Normal", single))
    assert panel.predicted_text() == "Model's top class: <b>Normal</b>"


def test_a_film_alone_called_off_its_most_probable_class_says_why(qtbot, dicom_case):
    import dataclasses

    from desktop.results import ResultsWidget

    _, single = dicom_case
    panel = ResultsWidget()
    qtbot.addWidget(panel)
    probs = np.array([0.5, 0.3, 0.2], np.float32)
    plain = dataclasses.replace(single, probabilities=probs, call_prior=None)
    panel.show_analysis(plain)
    assert panel.predicted_text() == "Model's top class: <b>Normal</b>"
    called = dataclasses.replace(plain, call_prior=np.array([165, 51, 42]) / 258)
    assert called.predicted == "Benign" and called.most_probable == "Normal"
    panel.show_analysis(called)
    assert panel.bars.emphasised() == ["Benign"]
    text = panel.predicted_text()
    assert "Model's call: <b>Benign</b>" in text and "Normal is more probable" in text


def test_the_disclaimer_stays_in_view_beside_a_reading_in_the_smallest_window(
        make_window, qtbot, analyzer, mias_dir):
    """At the smallest first-start size (1024 x 700) the panel scrolls; the disclaimer sits right
    under the bars, so it is on screen with every reading."""
    window = make_window(analyzer=analyzer, size=(1024, 700))
    open_and_wait(qtbot, window, mias_dir / "mdb028.png")
    line = window.results._disclaimer
    assert line.text().startswith("For education and research only")
    shown = line.visibleRegion().boundingRect()
    assert line.isVisible() and shown.height() >= line.height() - 1, (shown, line.height())
