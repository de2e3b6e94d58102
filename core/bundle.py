"""Model bundles: a folder with ``model.json``, ``classifier.tflite`` and ``segmenter.tflite``
(and ``verifier.tflite`` when the pipeline re-reads its top cells from patches).

``model.json`` says everything the app needs (classes in output order, input shapes, the
preprocessing parameters, the temperature, the pipeline's settings); the app hard-codes none
of it. Each file's sha256 is checked before a model is used.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_FILES = ("classifier.tflite", "segmenter.tflite")
VERIFIER_FILE = "verifier.tflite"  # required when the pipeline sets verify_top
SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")


class BundleError(ValueError):
    """A model bundle that cannot be used; the message says which bundle and why."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder and its parsed ``model.json``."""

    path: Path
    card: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card["classes"])

    def file(self, name: str) -> Path:
        return self.path / name


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle folder.

    Raises
    ------
    BundleError
        Missing folder or file, unreadable or incomplete ``model.json``, or a checksum mismatch.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a model bundle folder (it does not exist or is a file)")
    card_path = folder / "model.json"
    if not card_path.is_file():
        raise BundleError(f"{folder}: not a model bundle (no model.json)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{card_path}: model.json is not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise BundleError(f"{card_path}: model.json must hold an object")
    for key in ("name", "version", "classes", "files", "pipeline", "preprocessing"):
        if key not in card:
            raise BundleError(f"{card_path}: model.json lacks '{key}'")
    if not SEMVER.match(str(card["version"])):
        raise BundleError(f"{card_path}: version '{card['version']}' is not a semantic version")
    files = card["files"]
    required = list(REQUIRED_FILES)
    pipeline = card["pipeline"] if isinstance(card["pipeline"], dict) else {}
    if pipeline.get("verify_top"):
        required.append(VERIFIER_FILE)
    for name in required:
        f = folder / name
        if not f.is_file():
            raise BundleError(f"{folder}: the bundle is missing {name}")
        if name not in files or "sha256" not in files[name]:
            raise BundleError(f"{card_path}: no checksum recorded for {name}")
        if verify and sha256_of(f) != files[name]["sha256"]:
            raise BundleError(
                f"{folder}: {name} does not match its checksum in model.json "
                "(the file is damaged or was changed after export)"
            )
    return Bundle(folder, card)
