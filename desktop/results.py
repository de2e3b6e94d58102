"""The analysis panel: one confidence bar per class, the model, lesion area and overlay controls."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QColorDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from desktop.viewer import MASK_FILL, MASK_OUTLINE

BAR_STEPS = 1000  # bar resolution: 0.1 %
DEFAULT_CLASSES = ("Normal", "Benign", "Cancer")
DISCLAIMER_LINE = "For education and research only — not for diagnosis."
_BAR_STYLE = "QProgressBar::chunk {{ background-color: {colour}; }}"
_PREDICTED_COLOUR = "#d9534f"
_OTHER_COLOUR = "#7a8a99"


def percent_text(probability: float) -> str:
    """How a probability is written on its bar: one decimal, a percent sign."""
    return f"{100.0 * float(probability):.1f} %"


def call_explanation(called: str, top: str) -> str:
    """Why the bundle's balanced call (core.decision) is not the most probable class."""
    return (f"{top} is more probable, but {called} stands higher against how common it was among "
            "the training films.")


def _call_text(called: str, top: str) -> str:
    """The panel's line for the model's call; when the balanced call picked a class other than
    the largest bar, it says why."""
    if called == top:
        return f"Model's top class: <b>{called}</b>"
    return (f"Model's call: <b>{called}</b><br><span style='color: #555555;'>"
            f"{call_explanation(called, top)}</span>")


class ConfidenceBarsWidget(QWidget):
    """A bar and a percentage per class; the predicted class in bold with a stronger colour."""

    def __init__(self, classes: Sequence[str] = DEFAULT_CLASSES, parent=None) -> None:
        super().__init__(parent)
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setColumnStretch(1, 1)
        self._names: list[QLabel] = []
        self._bars: list[QProgressBar] = []
        self._values: list[QLabel] = []
        self._classes: tuple[str, ...] = ()
        self.set_classes(classes)

    def set_classes(self, classes: Sequence[str]) -> None:
        classes = tuple(classes)
        if classes == self._classes:
            return
        for widget in self._names + self._bars + self._values:
            self._grid.removeWidget(widget)
            widget.deleteLater()
        self._names, self._bars, self._values = [], [], []
        self._classes = classes
        for row, name in enumerate(classes):
            label = QLabel(name)
            bar = QProgressBar()
            bar.setRange(0, BAR_STEPS)
            bar.setTextVisible(False)
            bar.setFixedHeight(16)
            bar.setAccessibleName(f"{name} confidence")
            value = QLabel("—")
            value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            value.setMinimumWidth(value.fontMetrics().horizontalAdvance("100.0 %") + 6)
            self._grid.addWidget(label, row, 0)
            self._grid.addWidget(bar, row, 1)
            self._grid.addWidget(value, row, 2)
            self._names.append(label)
            self._bars.append(bar)
            self._values.append(value)
        self.clear()

    def classes(self) -> tuple[str, ...]:
        return self._classes

    def clear(self) -> None:
        for label, bar, value in zip(self._names, self._bars, self._values, strict=True):
            bar.setValue(0)
            bar.setStyleSheet(_BAR_STYLE.format(colour=_OTHER_COLOUR))
            value.setText("—")
            self._set_bold(label, False)
            self._set_bold(value, False)

    def set_probabilities(self, probabilities: Sequence[float], predicted: str) -> None:
        """Show ``probabilities`` in class order; ``predicted`` is emphasised."""
        for name, label, bar, value, p in zip(
            self._classes, self._names, self._bars, self._values, probabilities, strict=True
        ):
            chosen = name == predicted
            bar.setValue(round(float(p) * BAR_STEPS))
            bar.setStyleSheet(
                _BAR_STYLE.format(colour=_PREDICTED_COLOUR if chosen else _OTHER_COLOUR)
            )
            value.setText(percent_text(p))
            self._set_bold(label, chosen)
            self._set_bold(value, chosen)

    def bar_values(self) -> list[int]:
        return [bar.value() for bar in self._bars]

    def value_texts(self) -> list[str]:
        return [value.text() for value in self._values]

    def emphasised(self) -> list[str]:
        return [label.text() for label in self._names if label.font().bold()]

    @staticmethod
    def _set_bold(label: QLabel, bold: bool) -> None:
        font = QFont(label.font())
        font.setBold(bold)
        label.setFont(font)


class ResultsWidget(QWidget):
    """The right-hand panel: confidence bars, model, lesion area, overlay controls, disclaimer."""

    mask_visible_changed = Signal(bool)
    mask_mode_changed = Signal(str)  # MASK_OUTLINE or MASK_FILL
    mask_opacity_changed = Signal(float)  # 0 ... 1
    mask_colour_changed = Signal(QColor)
    heatmap_visible_changed = Signal(bool)
    heatmap_opacity_changed = Signal(float)  # 0 ... 1

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)

        self._file_label = QLabel("No image")
        self._file_label.setWordWrap(True)
        self._file_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self._file_label)

        result_box = QGroupBox("Classification")
        result_layout = QVBoxLayout(result_box)
        self._status = QLabel("Open an image to analyse it.")
        self._status.setWordWrap(True)
        self._busy = QProgressBar()
        self._busy.setRange(0, 0)  # indeterminate: the analysis reports no fraction done
        self._busy.setFixedHeight(8)
        self._busy.setTextVisible(False)
        self._busy.hide()
        self.bars = ConfidenceBarsWidget()
        self._predicted = QLabel("")
        self._predicted.setTextFormat(Qt.TextFormat.RichText)
        self._predicted.setWordWrap(True)
        self._lesion_area = QLabel("Lesion area: —")
        self._pairing = QLabel("")
        self._pairing.setWordWrap(True)
        self._pairing.setTextFormat(Qt.TextFormat.RichText)
        result_layout.addWidget(self._status)
        result_layout.addWidget(self._busy)
        result_layout.addWidget(self.bars)
        result_layout.addWidget(self._predicted)
        result_layout.addWidget(self._pairing)
        result_layout.addWidget(self._lesion_area)
        layout.addWidget(result_box)
        # Right under the reading, so it stays in view however small the window
        self._disclaimer = QLabel(DISCLAIMER_LINE)
        self._disclaimer.setWordWrap(True)
        self._disclaimer.setStyleSheet("color: #b36b00; font-style: italic;")
        layout.addWidget(self._disclaimer)

        layout.addWidget(self._mask_controls())
        layout.addWidget(self._heatmap_controls())

        model_box = QGroupBox("Model")
        model_layout = QVBoxLayout(model_box)
        self._model_label = QLabel("No model loaded")
        self._model_label.setWordWrap(True)
        self._timing_label = QLabel("")
        model_layout.addWidget(self._model_label)
        model_layout.addWidget(self._timing_label)
        layout.addWidget(model_box)
        layout.addStretch(1)

    def _mask_controls(self) -> QGroupBox:
        box = QGroupBox("Lesion mask (segmenter)")
        form = QFormLayout(box)
        self.mask_check = QCheckBox("Show")
        self.mask_check.setChecked(True)
        self.mask_check.toggled.connect(self.mask_visible_changed)
        self._outline_radio = QRadioButton("Outline")
        self._fill_radio = QRadioButton("Fill")
        self._outline_radio.setChecked(True)
        group = QButtonGroup(box)
        group.addButton(self._outline_radio)
        group.addButton(self._fill_radio)
        self._outline_radio.toggled.connect(self._on_outline_radio_toggled)
        mode_row = QHBoxLayout()
        mode_row.addWidget(self._outline_radio)
        mode_row.addWidget(self._fill_radio)
        mode_row.addStretch(1)
        self.mask_opacity = QSlider(Qt.Orientation.Horizontal)
        self.mask_opacity.setRange(0, 100)
        self.mask_opacity.setValue(45)
        self.mask_opacity.setAccessibleName("Mask fill opacity")
        self.mask_opacity.valueChanged.connect(lambda v: self.mask_opacity_changed.emit(v / 100.0))
        self.mask_opacity.setEnabled(False)  # an outline has no fill
        self._colour_button = QPushButton()
        self._colour_button.setToolTip("Colour of the lesion mask")
        self._colour_button.clicked.connect(self._on_colour_button_clicked)
        self._colour = QColor(255, 64, 64)
        self._paint_colour_button()
        form.addRow(self.mask_check)
        form.addRow("Style", mode_row)
        form.addRow("Fill opacity", self.mask_opacity)
        form.addRow("Colour", self._colour_button)
        return box

    def _heatmap_controls(self) -> QGroupBox:
        box = QGroupBox("Explanation heatmap (occlusion)")
        form = QFormLayout(box)
        self.heatmap_check = QCheckBox("Show")
        self.heatmap_check.toggled.connect(self.heatmap_visible_changed)
        self.heatmap_opacity = QSlider(Qt.Orientation.Horizontal)
        self.heatmap_opacity.setRange(0, 100)
        self.heatmap_opacity.setValue(50)
        self.heatmap_opacity.setAccessibleName("Heatmap opacity")
        self.heatmap_opacity.valueChanged.connect(
            lambda v: self.heatmap_opacity_changed.emit(v / 100.0)
        )
        self._heatmap_status = QLabel("")
        self._heatmap_status.setWordWrap(True)
        form.addRow(self.heatmap_check)
        form.addRow("Opacity", self.heatmap_opacity)
        form.addRow(self._heatmap_status)
        return box

    # -- state shown ---------------------------------------------------------------------------

    def set_file(self, text: str) -> None:
        self._file_label.setText(text)

    def set_model(self, name: str | None, version: str | None, classes: Sequence[str] = ()) -> None:
        if name is None:
            self._model_label.setText("No model loaded: the viewer works, analysis is off.")
            return
        self._model_label.setText(f"{name}  v{version}")
        if classes:
            self.bars.set_classes(classes)

    def predicted_text(self) -> str:
        return self._predicted.text()

    def model_text(self) -> str:
        return self._model_label.text()

    def set_busy(self, busy: bool, message: str = "") -> None:
        self._busy.setVisible(busy)
        if message:
            self._status.setText(message)

    def is_busy(self) -> bool:
        return self._busy.isVisible()

    def set_status(self, message: str) -> None:
        self._status.setText(message)

    def status_text(self) -> str:
        return self._status.text()

    def clear_results(self) -> None:
        self.bars.clear()
        self._predicted.setText("")
        self._lesion_area.setText("Lesion area: —")
        self._pairing.setText("")
        self._timing_label.setText("")
        self._heatmap_status.setText("")

    def show_analysis(self, analysis) -> None:
        """Bars, predicted class and lesion area of a ``core.inference.Analysis``."""
        self.bars.set_classes(analysis.classes)
        self.bars.set_probabilities(analysis.probabilities, analysis.predicted)
        self._predicted.setText(_call_text(analysis.predicted, analysis.most_probable))
        self._lesion_area.setText(
            f"Lesion area: {100.0 * analysis.lesion_area_frac:.2f} % of the breast"
        )
        self._model_label.setText(f"{analysis.model_name}  v{analysis.model_version}")
        total = analysis.timings.get("total") if analysis.timings else None
        if total is not None:
            self._timing_label.setText(f"Analysed in {total:.2f} s")

    def show_other_breast(self, other) -> None:
        """Bars of the film read beside the other breast (a ``desktop.workers.OtherBreast``)."""
        single = other.single
        self.bars.set_probabilities(other.probabilities, other.predicted)
        top = single.classes[int(np.argmax(other.probabilities))]
        self._predicted.setText(_call_text(other.predicted, top))
        alone = ", ".join(f"{c} {percent_text(float(p))}"
                          for c, p in zip(single.classes, single.probabilities, strict=True))
        self._pairing.setText(
            f"Read beside the other breast: <b>{html.escape(other.path.name)}</b>.<br>"
            f"<span style='color: #555555;'>Read alone: {alone}.</span>"
        )

    def set_pairing_note(self, text: str) -> None:
        self._pairing.setText(html.escape(text))

    def pairing_text(self) -> str:
        return self._pairing.text()

    def lesion_area_text(self) -> str:
        return self._lesion_area.text()

    def set_heatmap_status(self, message: str) -> None:
        self._heatmap_status.setText(message)

    def heatmap_status_text(self) -> str:
        return self._heatmap_status.text()

    # -- overlay controls, kept in step with the View menu -------------------------------------

    def set_mask_checked(self, checked: bool) -> None:
        self.mask_check.setChecked(checked)

    def set_heatmap_checked(self, checked: bool) -> None:
        self.heatmap_check.setChecked(checked)

    def set_mask_mode(self, mode: str) -> None:
        (self._fill_radio if mode == MASK_FILL else self._outline_radio).setChecked(True)

    def mask_mode(self) -> str:
        return MASK_FILL if self._fill_radio.isChecked() else MASK_OUTLINE

    def set_mask_colour(self, colour: QColor) -> None:
        self._colour = QColor(colour)
        self._paint_colour_button()

    def mask_colour(self) -> QColor:
        return QColor(self._colour)

    def _paint_colour_button(self) -> None:
        self._colour_button.setText(self._colour.name())
        self._colour_button.setStyleSheet(
            f"QPushButton {{ background-color: {self._colour.name()}; color: "
            f"{'black' if self._colour.lightness() > 128 else 'white'}; }}"
        )

    def _on_outline_radio_toggled(self, checked: bool) -> None:
        self.mask_opacity.setEnabled(not checked)
        self.mask_mode_changed.emit(MASK_OUTLINE if checked else MASK_FILL)

    def _on_colour_button_clicked(self) -> None:
        colour = QColorDialog.getColor(self._colour, self, "Lesion mask colour")
        if colour.isValid():
            self.set_mask_colour(colour)
            self.mask_colour_changed.emit(QColor(colour))
