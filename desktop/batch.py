"""Classify a folder: a table that fills as results arrive, with progress, ETA, cancel and export.

The run is ``core.batch.classify_files`` in a superqt worker with its own analyzer; this module
only shows its rows. Nothing is written to disk unless the user exports the CSV.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableView,
    QVBoxLayout,
)
from superqt.utils import GeneratorWorker, thread_worker

from desktop.results import call_explanation
from desktop.tags import refilter
from desktop.workers import batch_job

log = logging.getLogger(__name__)

HEADERS = ("File", "Predicted", "Normal", "Benign", "Cancer", "Lesion area", "Status")
ALL_ROWS, ERROR_ROWS = "All", "Errors"
PREDICTED_TIP = ("The model's call: the class that stands highest against how common it was "
                 "among the training films, so it can differ from the largest probability; hover "
                 "a row to see when it does.")
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
_ERROR_BRUSH = QBrush(QColor(200, 40, 40))


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class BatchTableModel(QAbstractTableModel):
    """``core.batch.BatchRow`` objects, one per table row, in arrival order."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._rows: list = []
        self._root: Path | None = None

    def set_root(self, root: Path | None) -> None:
        self._root = root

    def clear(self) -> None:
        self.beginResetModel()
        self._rows = []
        self.endResetModel()

    def append(self, row) -> None:
        n = len(self._rows)
        self.beginInsertRows(QModelIndex(), n, n)
        self._rows.append(row)
        self.endInsertRows()

    def rows(self) -> list:
        return list(self._rows)

    def row(self, number: int):
        return self._rows[number]

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(HEADERS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return HEADERS[section]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole \
                and HEADERS[section] == "Predicted":
            return PREDICTED_TIP
        return None

    def _name(self, path: Path) -> str:
        if self._root is not None:
            try:
                return str(Path(path).relative_to(self._root))
            except ValueError:
                pass
        return str(path)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        row = self._rows[index.row()]
        column = index.column()
        ok = row.status == "ok"
        probabilities = list(row.probabilities) + [None] * (3 - len(row.probabilities))
        if role == Qt.ItemDataRole.DisplayRole:
            if column == 0:
                return self._name(row.path)
            if column == 1:
                return row.predicted if ok else ""
            if 2 <= column <= 4:
                p = probabilities[column - 2]
                return "" if p is None else f"{100.0 * p:.1f} %"
            if column == 5:
                area = row.lesion_area_frac
                return "" if area is None else f"{100.0 * area:.2f} %"
            if column == 6:  # the file is named in the first column already
                return "ok" if ok else f"error: {row.reason}"
        if role == SORT_ROLE:
            if column in (2, 3, 4):
                p = probabilities[column - 2]
                return -1.0 if p is None else float(p)
            if column == 5:
                return -1.0 if row.lesion_area_frac is None else float(row.lesion_area_frac)
            if column == 6:
                return row.status
            return self.data(index, Qt.ItemDataRole.DisplayRole)
        if role == Qt.ItemDataRole.ToolTipRole:
            if not ok:
                return f"{row.path}\n{row.error}"
            other = getattr(row, "other_breast", None)
            tip = str(row.path) + (f"\nRead beside the other breast: {other.name}" if other else "\nRead alone")
            top = HEADERS[2 + max(range(3), key=lambda k: probabilities[k] or 0.0)]
            if row.predicted and row.predicted != top:
                tip += "\n" + call_explanation(row.predicted, top)
            return tip
        if role == Qt.ItemDataRole.ForegroundRole and not ok:
            return _ERROR_BRUSH
        if role == Qt.ItemDataRole.TextAlignmentRole and 2 <= column <= 5:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class _ClassFilterModel(QSortFilterProxyModel):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._wanted = ALL_ROWS
        self.setSortRole(SORT_ROLE)

    def set_wanted(self, wanted: str) -> None:
        refilter(self, lambda: setattr(self, "_wanted", wanted))

    def filterAcceptsRow(self, row: int, parent: QModelIndex) -> bool:
        if self._wanted == ALL_ROWS:
            return True
        record = self.sourceModel().row(row)
        if self._wanted == ERROR_ROWS:
            return record.status != "ok"
        return record.status == "ok" and record.predicted == self._wanted


class BatchDialog(QDialog):
    """One folder run: table, progress bar, count, ETA, Cancel, class filter and Export CSV."""

    open_requested = Signal(Path)  # a row was double-clicked
    batch_finished = Signal()  # the run ended: all files done, cancelled or failed to start

    def __init__(self, parent=None, classes: tuple[str, ...] = ("Normal", "Benign", "Cancer")):
        super().__init__(parent)
        self.setWindowTitle("Classify Folder")
        self.resize(900, 560)
        self._worker: GeneratorWorker | None = None
        self._files: list[Path] = []
        self._started = 0.0
        self._cancelled = False
        self._last_folder = ""
        self._exported_rows = 0  # rows written by the last export; more since means unsaved

        self.model = BatchTableModel(self)
        self.proxy = _ClassFilterModel(self)
        self.proxy.setSourceModel(self.model)

        self._folder_label = QLabel("")
        self._folder_label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")
        self.count_label = QLabel("")
        self.eta_label = QLabel("")

        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # arrival order until asked
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)  # one line a file; long paths lose their middle
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in range(1, len(HEADERS) - 1):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(len(HEADERS) - 1, QHeaderView.ResizeMode.Interactive)
        self.table.setColumnWidth(len(HEADERS) - 1, 220)
        self.table.doubleClicked.connect(self._on_table_double_clicked)
        self.table.setToolTip("Double-click a row to open the image in the viewer")

        self.filter_combo = QComboBox()
        self.filter_combo.addItems([ALL_ROWS, *classes, ERROR_ROWS])
        self.filter_combo.currentTextChanged.connect(self.proxy.set_wanted)
        self.filter_combo.setAccessibleName("Show rows")

        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.export_button = QPushButton("Export CSV…")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(self._on_export_button_clicked)
        close_button = QPushButton("Close")
        close_button.clicked.connect(self.close)

        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.cancel_button)
        count_row = QHBoxLayout()  # a line of its own: growing texts never squeeze the bar
        count_row.addWidget(self.count_label, 1)
        count_row.addWidget(self.eta_label)
        bottom_row = QHBoxLayout()
        bottom_row.addWidget(QLabel("Show:"))
        bottom_row.addWidget(self.filter_combo)
        bottom_row.addStretch(1)
        bottom_row.addWidget(self.export_button)
        bottom_row.addWidget(close_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self._folder_label)
        layout.addLayout(progress_row)
        layout.addLayout(count_row)
        layout.addWidget(self.table, 1)
        layout.addLayout(bottom_row)
        note = QLabel("Predicted can differ from the largest probability (hover the column's "
                      "header). For education and research only — not for diagnosis.")
        note.setWordWrap(True)
        note.setStyleSheet("color: #b36b00; font-style: italic;")
        layout.addWidget(note)

    # -- running -----------------------------------------------------------------------------

    def start(self, folder: Path, files: list[Path], bundle_path: Path | None, skipped: int = 0):
        """Classify ``files`` (found under ``folder``) with a fresh analyzer of ``bundle_path``."""
        self.cancel()
        self._files = list(files)
        self._cancelled = False
        self._exported_rows = 0
        self._last_folder = str(folder)
        self.model.clear()
        self.model.set_root(Path(folder))
        skipped_note = f" ({skipped} other files skipped)" if skipped else ""
        self._folder_label.setText(f"<b>{folder}</b>: {len(files)} images{skipped_note}")
        self.progress.setRange(0, max(1, len(files)))
        self.progress.setValue(0)
        self.count_label.setText(f"0 / {len(files)}")
        self.eta_label.setText("loading the model…")
        self.cancel_button.setEnabled(True)
        self.export_button.setEnabled(False)
        self._started = time.perf_counter()
        worker = thread_worker(batch_job, start_thread=False)(bundle_path, self._files)
        # A cancelled run may still deliver its file in progress: only the current run counts.
        worker.yielded.connect(lambda item, w=worker: self._on_worker_yielded(w, item))
        worker.errored.connect(lambda exc, w=worker: self._on_worker_errored(w, exc))
        worker.finished.connect(lambda w=worker: self._on_worker_finished(w))
        self._worker = worker
        worker.start()

    def is_running(self) -> bool:
        return self._worker is not None

    def unsaved(self) -> str:
        """What closing or replacing this run would lose, in words ("" for nothing)."""
        done = len(self.model.rows())
        if self.is_running():
            return f"A folder batch is running ({done} of {len(self._files)} images done)"
        if done > self._exported_rows:
            return f"The folder batch's {done} rows have not been exported"
        return ""

    def cancel(self) -> None:
        """Stop after the file in progress; rows so far stay and can be exported."""
        if self._worker is not None:
            self._cancelled = True
            self._worker.quit()
            self.cancel_button.setEnabled(False)
            self.eta_label.setText("cancelling…")

    def rows(self) -> list:
        return self.model.rows()

    def export_csv(self, path: str | Path) -> Path:
        """Write the rows so far with ``core.batch.write_csv`` (the columns of the CLI)."""
        from core.batch import write_csv

        rows = self.model.rows()
        written = write_csv(rows, path)
        self._exported_rows = len(rows)
        return written

    def _on_worker_yielded(self, worker, item) -> None:
        if worker is not self._worker:
            return
        kind, row = item
        if kind == "loaded":
            self._started = time.perf_counter()
            self.eta_label.setText("")
            return
        self.model.append(row)
        done = len(self.model.rows())
        total = len(self._files)
        failed = sum(1 for r in self.model.rows() if r.status != "ok")
        self.progress.setValue(done)
        errors = f", {failed} error{'s' if failed != 1 else ''}" if failed else ""
        paired = sum(1 for r in self.model.rows() if getattr(r, "other_breast", None) is not None)
        pairs = f", {paired} read beside the other breast" if paired else ""
        self.count_label.setText(f"{done} / {total}{errors}{pairs}")
        elapsed = time.perf_counter() - self._started
        if done < total:
            self.eta_label.setText(f"ETA {format_seconds(elapsed / done * (total - done))}")
        self.export_button.setEnabled(True)

    def _on_worker_errored(self, worker, exc: Exception) -> None:
        if worker is not self._worker:
            return
        # The model failed to load (a core.batch run itself never raises for a bad file).
        log.warning("batch could not run: %s", exc)
        self.eta_label.setText("")
        box = QMessageBox(
            QMessageBox.Icon.Critical,
            "Classify Folder",
            f"The batch could not run:\n\n{exc}",
            QMessageBox.StandardButton.Ok,
            self,
        )
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    def _on_worker_finished(self, worker) -> None:
        if worker is not self._worker:
            return
        self._worker = None
        self.cancel_button.setEnabled(False)
        done, total = len(self.model.rows()), len(self._files)
        elapsed = format_seconds(time.perf_counter() - self._started)
        if self._cancelled:
            self.eta_label.setText(f"cancelled after {done} of {total} ({elapsed})")
        else:
            self.eta_label.setText(f"done in {elapsed}")
        self.export_button.setEnabled(done > 0)
        self.batch_finished.emit()

    def _on_table_double_clicked(self, index: QModelIndex) -> None:
        row = self.model.row(self.proxy.mapToSource(index).row())
        self.open_requested.emit(Path(row.path))

    def _on_export_button_clicked(self) -> None:
        start = str(Path(self._last_folder) / "mammolab-results.csv") if self._last_folder else ""
        path, _ = QFileDialog.getSaveFileName(
            self, "Export CSV", start, "CSV files (*.csv);;All files (*)"
        )
        if not path:
            return
        if not path.lower().endswith(".csv"):
            path += ".csv"
        try:
            written = self.export_csv(path)
        except OSError as exc:
            QMessageBox.critical(
                self,
                "Export CSV",
                f"The CSV could not be written to {path}:\n\n{exc.strerror or exc}",
            )
            return
        self.eta_label.setText(f"exported {len(self.model.rows())} rows to {Path(written).name}")
