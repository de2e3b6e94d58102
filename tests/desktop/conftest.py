"""Fixtures for the desktop tests: isolated settings, a window, images in every format, the model.

Every window gets its own settings file under ``tmp_path``, so no test reads or changes a
user's MammoLab settings, and tests do not see each other's recent files.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PySide6.QtCore import QSettings

from core.paths import default_bundle_dir


@pytest.fixture
def settings(tmp_path: Path) -> QSettings:
    return QSettings(str(tmp_path / "mammolab-settings.ini"), QSettings.Format.IniFormat)


@pytest.fixture(scope="session")
def analyzer():
    """The bundled model, loaded once (LiteRT on the real bundle is fast enough for GUI tests)."""
    from core.inference import Analyzer

    if not (default_bundle_dir() / "model.json").is_file():
        msg = f"no model bundle in {default_bundle_dir()}"
        if os.environ.get("CI") == "true":  # as for the data: under CI its absence is a failure
            pytest.fail(msg)
        pytest.skip(msg)
    return Analyzer.from_bundle(None)


@pytest.fixture
def make_window(qtbot, settings):
    """Build a MainWindow with isolated settings; closed (workers stopped) after the test."""
    from desktop.main_window import MainWindow

    windows = []

    def build(analyzer=None, with_heatmap: bool = True, size=(1200, 800), **kwargs):
        window = MainWindow(
            analyzer=analyzer,
            settings=kwargs.pop("settings", settings),
            show_disclaimer=kwargs.pop("show_disclaimer", False),
            with_heatmap=with_heatmap,
            **kwargs,
        )
        # Never a modal question in a test (a test of one replaces this with its own answer)
        window.confirm = lambda title, question: True
        qtbot.addWidget(window)
        if size is not None:
            window.resize(*size)
        window.show()
        windows.append(window)
        return window

    yield build
    for window in windows:
        window.close()


def open_and_wait(qtbot, window, path, timeout: int = 60000):
    """Open ``path`` and wait until the whole job (read, analysis, heatmap) has ended."""
    with qtbot.waitSignal(window.image_job_finished, timeout=timeout):
        window.open_paths([str(path)])


@pytest.fixture(scope="session")
def mias_png(mias_dir: Path) -> Path:
    """A real mini-MIAS film (1024 x 1024, 8-bit): mdb001, a benign circumscribed mass."""
    return mias_dir / "mdb001.png"


@pytest.fixture(scope="session")
def format_files(tmp_path_factory, mias_png: Path, cbis_dicoms) -> dict[str, Path]:
    """The same real film saved as PNG, JPEG, TIFF and PGM, and a real CBIS-DDSM DICOM."""
    folder = tmp_path_factory.mktemp("formats")
    grey = cv2.imread(str(mias_png), cv2.IMREAD_UNCHANGED)
    assert grey is not None and grey.ndim == 2
    files = {}
    for suffix in ("png", "jpg", "tif", "pgm"):
        path = folder / f"mdb001.{suffix}"
        assert cv2.imwrite(str(path), grey)
        files[suffix] = path
    smallest = min(cbis_dicoms, key=lambda p: p.stat().st_size)
    files["dcm"] = smallest
    return files


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """Files MammoLab must refuse with a clear message."""
    folder = tmp_path / "bad"
    folder.mkdir()
    text = folder / "notes.png"
    text.write_text("this is not an image\n")
    empty = folder / "empty.dcm"
    empty.write_bytes(b"")
    truncated = folder / "truncated.png"
    ok, encoded = cv2.imencode(".png", np.full((64, 64), 128, np.uint8))
    truncated.write_bytes(encoded.tobytes()[:40])
    return {"text": text, "empty": empty, "truncated": truncated}
