"""Help dialogs: About, Model card, Shortcuts, and the first-start disclaimer."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QVBoxLayout,
)

from core import __version__
from core.paths import resources_dir

log = logging.getLogger(__name__)


def read_text(name: str) -> str:
    """A text from ``resources/texts`` (empty if it is missing, which a test would catch)."""
    path = resources_dir() / "texts" / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        log.warning("missing resource text %s", path)
        return ""


class _TextDialog(QDialog):
    """A dialog with a scrollable Markdown text and a Close button."""

    def __init__(self, title: str, markdown: str, parent=None, size=(640, 560)) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self.resize(*size)
        self.browser = QTextBrowser()
        self.browser.setOpenExternalLinks(True)
        self.browser.setMarkdown(markdown)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.browser)
        layout.addWidget(buttons)

    def text(self) -> str:
        return self.browser.toPlainText()


class AboutDialog(_TextDialog):
    def __init__(self, model_text: str, parent=None) -> None:
        text = read_text("about.md").replace("{version}", __version__)
        super().__init__(
            f"About MammoLab {__version__}", text.replace("{model}", model_text), parent
        )


def model_card_markdown(card: dict[str, Any], bundle_path: Path | None) -> str:
    """Markdown for the Model card dialog.

    The bundle's own MODEL_CARD.md when it has one, under a line saying which folder it is;
    otherwise the facts ``model.json`` holds (description, intended use, classes, evaluation).
    """
    where = f"*Bundle folder: {bundle_path} — files verified against their checksums.*"
    if bundle_path is not None:
        try:
            text = (Path(bundle_path) / "MODEL_CARD.md").read_text(encoding="utf-8")
        except OSError:
            text = ""
        if text.strip():
            return f"{where}\n\n{text}"
    lines = [f"# {card.get('name', 'Model')} {card.get('version', '')}".rstrip(), "", where, ""]
    lines.append(f"- **Classes:** {', '.join(map(str, card.get('classes', [])))}")
    for key in ("description", "intended_use", "created", "frameworks", "limitations"):
        if key in card:
            value = card[key]
            text = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"- **{key.replace('_', ' ').capitalize()}:** {text}")
    for key in ("evaluation", "metrics"):
        section = card.get(key)
        if isinstance(section, dict) and section:
            lines += ["", f"## {key.capitalize()} (from model.json)", "", "| | |", "| --- | --- |"]
            for name, value in _flatten(section):
                if isinstance(value, float):
                    value = f"{value:.4g}"
                lines.append(f"| {name} | {value} |")
    return "\n".join(lines)


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + " / ")
        elif isinstance(value, list) and len(value) > 6:
            yield name, f"[{len(value)} values]"
        else:
            yield name, value


class ModelCardDialog(_TextDialog):
    def __init__(self, card: dict[str, Any], bundle_path: Path | None, parent=None) -> None:
        super().__init__("Model card", model_card_markdown(card, bundle_path), parent, (720, 640))


class ShortcutsDialog(QDialog):
    """Every action that has a shortcut, read from the actions themselves so it stays true."""

    def __init__(self, actions: Iterable[QAction], parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        self.resize(520, 560)
        rows = []
        for action in actions:
            keys = [k.toString(QKeySequence.SequenceFormat.NativeText) for k in action.shortcuts()]
            if keys:
                rows.append((action.text().replace("&", "").replace("…", ""), ", ".join(keys)))
        self.table = QTableWidget(len(rows), 2)
        self.table.setHorizontalHeaderLabels(["Action", "Shortcut"])
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(
            1, QHeaderView.ResizeMode.ResizeToContents
        )
        for row, (name, keys) in enumerate(rows):
            self.table.setItem(row, 0, QTableWidgetItem(name))
            self.table.setItem(row, 1, QTableWidgetItem(keys))
        hint = QLabel(
            "Mouse: wheel zooms around the cursor, left-drag pans, right-drag sets the "
            "window (left/right: width, up/down: level). Drop files or folders to open them."
        )
        hint.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(hint)
        layout.addWidget(buttons)

    def entries(self) -> list[tuple[str, str]]:
        return [
            (self.table.item(r, 0).text(), self.table.item(r, 1).text())
            for r in range(self.table.rowCount())
        ]


class DisclaimerDialog(QDialog):
    """The education-and-research disclaimer; OK is enabled once the box is ticked."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("MammoLab — before you start")
        self.resize(560, 360)
        browser = QTextBrowser()
        browser.setMarkdown(read_text("disclaimer.md"))
        self.understood = QCheckBox("I understand: MammoLab is not for diagnosis.")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok)
        ok = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        ok.setEnabled(False)
        self.understood.toggled.connect(ok.setEnabled)
        self.buttons.accepted.connect(self.accept)
        layout = QVBoxLayout(self)
        layout.addWidget(browser)
        layout.addWidget(self.understood)
        layout.addWidget(self.buttons)
        self.setWindowModality(Qt.WindowModality.ApplicationModal)
