"""``mammolab PATH --screenshot OUT.png`` end to end, in a separate process as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtGui import QImage

from desktop.app import SCREENSHOT_SIZE, sample_images

REPO = Path(__file__).resolve().parents[2]


def run_mammolab(args: list[str], home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(QT_QPA_PLATFORM="offscreen", XDG_CONFIG_HOME=str(home / "config"), HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def as_array(image: QImage) -> np.ndarray:
    """(H, W, 3) int RGB of a QImage."""
    image = image.convertToFormat(QImage.Format.Format_RGB888)
    width, height = image.width(), image.height()
    data = np.frombuffer(image.constBits(), np.uint8)
    rows = data[: image.bytesPerLine() * height].reshape(height, image.bytesPerLine())
    return rows[:, : width * 3].reshape(height, width, 3).astype(int)


def colour_pixels(image: QImage, rgb: tuple[int, int, int], tolerance: int = 6) -> int:
    return int((np.abs(as_array(image) - np.array(rgb)).max(axis=2) <= tolerance).sum())


def test_screenshot_of_a_dicom_shows_image_mask_and_bars(tmp_path, analyzer, cbis_dicoms):
    dicom = min(cbis_dicoms, key=lambda p: p.stat().st_size)
    out = tmp_path / "shot.png"
    result = run_mammolab([str(dicom), "--screenshot", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    image = QImage(str(out))
    assert (image.width(), image.height()) == SCREENSHOT_SIZE
    assert colour_pixels(image, (0xD9, 0x53, 0x4F)) > 200  # the predicted class' bar
    assert colour_pixels(image, (0x7A, 0x8A, 0x99)) > 50  # the other bars
    assert colour_pixels(image, (0xFF, 0x40, 0x40), tolerance=2) > 100  # the mask's outline
    # The mammogram itself: bright tissue fills part of the viewer (the left of the window).
    pixels = as_array(image)
    viewer = pixels[
        SCREENSHOT_SIZE[1] // 5 : SCREENSHOT_SIZE[1] * 4 // 5, : SCREENSHOT_SIZE[0] // 2
    ]
    assert (viewer.mean(axis=2) > 120).mean() > 0.05
    # The automated run neither reads nor writes the user's settings.
    assert not (tmp_path / "config" / "MammoLab").exists()


def test_screenshot_of_an_unreadable_file_fails_cleanly(tmp_path, analyzer):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")
    out = tmp_path / "shot.png"
    result = run_mammolab([str(bad), "--screenshot", str(out)], tmp_path, timeout=300)
    assert result.returncode == 1
    assert "broken.dcm" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_model_folder_is_refused(tmp_path):
    out = tmp_path / "shot.png"
    result = run_mammolab(["--model", str(tmp_path), "--screenshot", str(out)], tmp_path)
    assert result.returncode == 2
    assert "model.json" in result.stderr and "Traceback" not in result.stderr


def test_the_sample_image_ships_with_its_attribution():
    samples = sample_images()
    assert len(samples) == 1 and samples[0].stat().st_size < 10_000_000
    attribution = (samples[0].parent / "ATTRIBUTION.txt").read_text(encoding="utf-8")
    for needle in ("CBIS-DDSM", "CC BY 3.0", "Lee", "2017", "TCIA"):
        assert needle in attribution
    from core.io import read_image

    assert read_image(samples[0]).meta["format"] == "DICOM"


@pytest.mark.parametrize("name", ["disclaimer.md", "about.md"])
def test_texts_are_shipped(name):
    from core.paths import resources_dir

    assert (resources_dir() / "texts" / name).stat().st_size > 200


def test_the_desktop_never_loads_tensorflow_or_keras():
    code = (
        "import sys\n"
        "import desktop.app, desktop.main_window, desktop.batch, desktop.workers\n"
        "import core.inference, core.batch\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, QT_QPA_PLATFORM="offscreen"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
