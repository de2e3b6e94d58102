"""Where MammoLab's own files live, in a source checkout, an installed package or a frozen app.

Resources are found through these helpers, never through the current directory.
"""

from __future__ import annotations

import sys
from pathlib import Path


def project_root() -> Path:
    """The folder holding ``core/``, ``models/`` and ``resources/`` (``sys._MEIPASS`` when frozen)."""
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        return Path(frozen)
    return Path(__file__).resolve().parent.parent


def resources_dir() -> Path:
    """The ``resources/`` folder: icons, texts, sample images."""
    return project_root() / "resources"


def default_bundle_dir() -> Path:
    """The model bundle shipped with MammoLab (``models/bundled/``)."""
    return project_root() / "models" / "bundled"
