"""MammoLab's main window: viewer in the middle, analysis panel on the right, DICOM tags dock.

The window owns no image logic: ``core.io`` reads, ``core.inference`` analyses (on a worker,
see :mod:`desktop.workers`), and this class wires the results into the viewer and the panels.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import (
    QAction,
    QActionGroup,
    QCloseEvent,
    QColor,
    QGuiApplication,
    QIcon,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QScrollArea,
    QStyle,
    QToolBar,
)

from core.paths import resources_dir
from desktop.batch import BatchDialog
from desktop.dialogs import AboutDialog, DisclaimerDialog, ModelCardDialog, ShortcutsDialog
from desktop.results import ResultsWidget
from desktop.tags import DicomTagsWidget
from desktop.viewer import MASK_FILL, MASK_OUTLINE, ImageViewerWidget, WindowPreset
from desktop.workers import AnalysisRunner, Step

log = logging.getLogger(__name__)

APP_NAME = "MammoLab"
MAX_RECENT = 10
# Extensions offered by File > Open; core.io decides by content, so this only filters the list.
OPEN_FILTER = (
    "Images (*.dcm *.dicom *.png *.jpg *.jpeg *.tif *.tiff *.pgm *.pnm);;"
    "DICOM (*.dcm *.dicom);;PNG (*.png);;JPEG (*.jpg *.jpeg);;TIFF (*.tif *.tiff);;"
    "PGM / PNM (*.pgm *.pnm);;All files (*)"
)
DISCLAIMER_KEY = "disclaimer/acknowledged"


def image_extensions() -> frozenset[str]:
    try:
        from core.io import IMAGE_EXTENSIONS

        return IMAGE_EXTENSIONS
    except ImportError:  # core.io missing: offer the formats the contract names
        return frozenset(
            {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pgm", ".pnm", ".dcm", ".dicom"}
        )


def images_beside(path: Path) -> list[Path]:
    """The images in ``path``'s folder (not recursive), in name order, ``path`` included."""
    extensions = image_extensions()
    try:
        siblings = [
            p
            for p in path.parent.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        ]
    except OSError:
        siblings = []
    if path not in siblings:
        siblings.append(path)
    return sorted(siblings, key=lambda p: p.name.lower())


def format_raw(value) -> str:
    """A stored value as the status bar shows it: integers plainly, others with up to 7
    significant digits (4 made 1084.25 read "1084", a whole number it is not)."""
    number = float(value)
    if number.is_integer():
        return str(int(number))
    return f"{number:.7g}"


def app_icon() -> QIcon:
    return QIcon(str(resources_dir() / "icons" / "mammolab.svg"))


LAST_BUNDLE_KEY = "model/last_bundle"  # settings: a bundle loaded from the menu, "" the bundled one


class MainWindow(QMainWindow):
    """The workstation window. Signals let the app and the tests follow each image's life."""

    image_shown = Signal(object)  # core.io.Mammogram now on screen
    analysis_shown = Signal(object)  # core.inference.Analysis shown in the panel and overlays
    heatmap_shown = Signal(object)  # (H, W) float heatmap shown
    other_breast_shown = Signal(object)  # desktop.workers.OtherBreast shown (path None: none found)
    image_job_finished = Signal()  # the current image's read / analysis / heatmap job ended
    error_shown = Signal(str, str)  # title, message of an error dialog
    model_changed = Signal(object)  # the Analyzer now in use

    def __init__(
        self,
        analyzer=None,
        settings: QSettings | None = None,
        show_disclaimer: bool = True,
        with_heatmap: bool = True,
        parent=None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle(APP_NAME)
        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.settings = settings if settings is not None else QSettings()
        self.analyzer = analyzer
        self._with_heatmap = with_heatmap
        self._compare = str(self.settings.value("analysis/compare_other_breast", "true")).lower() != "false"
        self.other_breast = None  # the OtherBreast of the image shown, if it was read as a pair
        self._pairing_pending = False  # the shown analysis waits for its other-breast step
        self._show_disclaimer = show_disclaimer
        self.mammogram = None
        self.analysis = None
        self._pending_path: Path | None = None
        self._nav_files: list[Path] = []
        self._batch_dialog: BatchDialog | None = None
        self._heatmap_failed = False

        self.viewer = ImageViewerWidget(self)
        self.setCentralWidget(self.viewer)
        self.runner = AnalysisRunner(self)
        self.runner.step_ready.connect(self._on_runner_step_ready)
        self.runner.busy_changed.connect(self._on_runner_busy_changed)
        self.runner.job_finished.connect(self._on_runner_job_finished)

        self._build_docks()
        self._build_status_bar()
        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self._connect_viewer()
        self._restore_settings()
        self._show_model()

    # ----------------------------------------------------------------------------------------
    # Construction

    def _build_docks(self) -> None:
        self.results = ResultsWidget()
        scroll = QScrollArea()
        scroll.setWidget(self.results)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(300)
        self.results_dock = QDockWidget("Analysis", self)
        self.results_dock.setObjectName("AnalysisDock")
        self.results_dock.setWidget(scroll)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.results_dock)

        self.tags = DicomTagsWidget()
        self.tags_dock = QDockWidget("DICOM Tags", self)
        self.tags_dock.setObjectName("DicomTagsDock")
        self.tags_dock.setWidget(self.tags)
        # Tabbed behind the analysis: the mammogram keeps the width, the tags are one click away.
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.tags_dock)
        self.tabifyDockWidget(self.results_dock, self.tags_dock)
        self.results_dock.raise_()
        self.resizeDocks([self.results_dock], [340], Qt.Orientation.Horizontal)

        self.results.mask_visible_changed.connect(self._on_mask_visible_changed)
        self.results.mask_mode_changed.connect(self._on_mask_mode_changed)
        self.results.mask_opacity_changed.connect(self._on_mask_opacity_changed)
        self.results.mask_colour_changed.connect(self._on_mask_colour_changed)
        self.results.heatmap_visible_changed.connect(self._on_heatmap_visible_changed)
        self.results.heatmap_opacity_changed.connect(self._on_heatmap_opacity_changed)

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.position_label = QLabel("")
        self.value_label = QLabel("")
        self.window_label = QLabel("")
        self.zoom_label = QLabel("")
        for label, width in (
            (self.position_label, "x 00000  y 00000"),
            (self.value_label, "value -000000.00"),
            (self.window_label, "W 00000 L 00000"),
            (self.zoom_label, "zoom 0000 %"),
        ):
            label.setMinimumWidth(label.fontMetrics().horizontalAdvance(width) + 8)
            bar.addPermanentWidget(label)
        self.busy_bar = QProgressBar()
        self.busy_bar.setRange(0, 0)
        self.busy_bar.setMaximumWidth(120)
        self.busy_bar.setMaximumHeight(14)
        self.busy_bar.setTextVisible(False)
        self.busy_bar.hide()
        bar.addPermanentWidget(self.busy_bar)

    def _action(self, text: str, slot, shortcuts=(), checkable=False, tip="") -> QAction:
        action = QAction(text, self)
        keys = [QKeySequence(k) if isinstance(k, str) else QKeySequence(k) for k in shortcuts]
        if keys:
            action.setShortcuts(keys)
        action.setCheckable(checkable)
        if tip:
            action.setStatusTip(tip)
        (action.toggled if checkable else action.triggered).connect(slot)
        self.addAction(action)  # shortcuts work even with the menu bar hidden
        return action

    def _build_actions(self) -> None:
        std = self.style().standardIcon
        a = self._action
        self.open_action = a(
            "&Open…",
            self._on_open_triggered,
            [QKeySequence.StandardKey.Open],
            tip="Open a mammogram (DICOM, PNG, JPEG, TIFF, PGM)",
        )
        self.open_action.setIcon(std(QStyle.StandardPixmap.SP_DialogOpenButton))
        self.classify_folder_action = a(
            "Classify &Folder…",
            self._on_classify_folder_triggered,
            ["Ctrl+Shift+O"],
            tip="Classify every image in a folder and its subfolders",
        )
        self.classify_folder_action.setIcon(std(QStyle.StandardPixmap.SP_DirOpenIcon))
        self.batch_results_action = a(
            "Batch &Results",
            self._on_batch_results_triggered,
            tip="Show the last folder classification",
        )
        self.batch_results_action.setEnabled(False)
        self.next_action = a(
            "&Next Image",
            self.open_next,
            ["PgDown", "Ctrl+Right"],
            tip="Open the next image in the folder",
        )
        self.previous_action = a(
            "&Previous Image",
            self.open_previous,
            ["PgUp", "Ctrl+Left"],
            tip="Open the previous image in the folder",
        )
        # Some platforms (Windows, offscreen) bind no standard Quit key: Ctrl+Q there
        quit_keys = QKeySequence.keyBindings(QKeySequence.StandardKey.Quit) or [QKeySequence("Ctrl+Q")]
        self.quit_action = a("&Quit", self.close, quit_keys)

        self.fit_action = a("&Fit to Window", self.viewer.fit_to_window, ["F", "Ctrl+0"])
        self.actual_size_action = a("&Actual Size (1:1)", self.viewer.zoom_actual, ["1", "Ctrl+1"])
        self.zoom_in_action = a(
            "Zoom &In", self.viewer.zoom_in, [QKeySequence.StandardKey.ZoomIn, "+", "="]
        )
        self.zoom_out_action = a(
            "Zoom &Out", self.viewer.zoom_out, [QKeySequence.StandardKey.ZoomOut, "-"]
        )
        self.invert_action = a("&Invert Grey Levels", self.viewer.set_inverted, ["I"], True)
        self.flip_action = a("Flip &Horizontally", self.viewer.set_flipped, ["L"], True)
        self.reset_window_action = a("&Reset Window/Level", self.viewer.reset_window, ["R"])
        self.mask_action = a("Lesion &Mask", self._on_mask_visible_changed, ["M"], True)
        self.mask_fill_action = a(
            "Mask as F&ill", self._on_mask_fill_action_toggled, ["Shift+M"], True
        )
        self.heatmap_action = a(
            "Explanation &Heatmap", self._on_heatmap_visible_changed, ["H"], True
        )

        self.reanalyse_action = a("&Analyse Again", self._on_reanalyse_triggered, ["F5"])
        self.compare_action = a(
            "Compare with the &Other Breast",
            self._on_compare_toggled,
            ["B"],
            True,
            tip="Read the film beside the other breast's film of the same view, when the folder "
            "holds it and the model can",
        )
        self.compare_action.blockSignals(True)
        self.compare_action.setChecked(self._compare)
        self.compare_action.blockSignals(False)
        self.load_model_action = a(
            "&Load Model Bundle…",
            self._on_load_model_triggered,
            tip="Use another model bundle folder",
        )
        self.bundled_model_action = a("Use &Bundled Model", self._on_bundled_model_triggered)
        self.model_card_action = a("Model &Card…", self._on_model_card_triggered)

        self.shortcuts_action = a(
            "&Keyboard Shortcuts",
            self._on_shortcuts_triggered,
            [QKeySequence.StandardKey.HelpContents, "Ctrl+/"],
        )
        self.disclaimer_action = a("&Disclaimer…", self._on_disclaimer_triggered)
        self.about_action = a("&About MammoLab", self._on_about_triggered)

    def _build_menus(self) -> None:
        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        file_menu.addAction(self.open_action)
        self.recent_menu = file_menu.addMenu("Open &Recent")
        file_menu.addSeparator()
        file_menu.addAction(self.classify_folder_action)
        file_menu.addAction(self.batch_results_action)
        file_menu.addSeparator()
        file_menu.addAction(self.next_action)
        file_menu.addAction(self.previous_action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)

        view_menu = menu.addMenu("&View")
        for action in (
            self.fit_action,
            self.actual_size_action,
            self.zoom_in_action,
            self.zoom_out_action,
        ):
            view_menu.addAction(action)
        view_menu.addSeparator()
        view_menu.addAction(self.invert_action)
        view_menu.addAction(self.flip_action)
        self.window_menu = view_menu.addMenu("&Window Presets")
        view_menu.addAction(self.reset_window_action)
        view_menu.addSeparator()
        view_menu.addAction(self.mask_action)
        view_menu.addAction(self.mask_fill_action)
        view_menu.addAction(self.heatmap_action)
        view_menu.addSeparator()
        view_menu.addAction(self.results_dock.toggleViewAction())
        view_menu.addAction(self.tags_dock.toggleViewAction())
        self.view_menu = view_menu

        analysis_menu = menu.addMenu("&Analysis")
        analysis_menu.addAction(self.reanalyse_action)
        analysis_menu.addAction(self.compare_action)
        analysis_menu.addSeparator()
        analysis_menu.addAction(self.load_model_action)
        analysis_menu.addAction(self.bundled_model_action)
        analysis_menu.addAction(self.model_card_action)

        help_menu = menu.addMenu("&Help")
        help_menu.addAction(self.shortcuts_action)
        help_menu.addAction(self.model_card_action)
        help_menu.addAction(self.disclaimer_action)
        help_menu.addSeparator()
        help_menu.addAction(self.about_action)
        self._rebuild_window_menu()

    def _build_toolbar(self) -> None:
        short_names = {
            self.previous_action: "Previous",
            self.next_action: "Next",
            self.fit_action: "Fit",
            self.actual_size_action: "1:1",
            self.zoom_in_action: "Zoom +",
            self.zoom_out_action: "Zoom −",
            self.invert_action: "Invert",
            self.flip_action: "Flip",
            self.reset_window_action: "Reset W/L",
            self.mask_action: "Mask",
            self.heatmap_action: "Heatmap",
            self.classify_folder_action: "Classify Folder",
        }
        for action, name in short_names.items():
            action.setIconText(name)
            action.setToolTip(
                f"{action.text().replace('&', '')} ({action.shortcut().toString()})"
                if not action.shortcut().isEmpty()
                else action.text().replace("&", "")
            )
        toolbar = QToolBar("Main Toolbar", self)
        toolbar.setObjectName("MainToolbar")
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        toolbar.addAction(self.open_action)
        toolbar.addAction(self.classify_folder_action)
        toolbar.addSeparator()
        toolbar.addAction(self.previous_action)
        toolbar.addAction(self.next_action)
        toolbar.addSeparator()
        for action in (
            self.fit_action,
            self.actual_size_action,
            self.zoom_in_action,
            self.zoom_out_action,
        ):
            toolbar.addAction(action)
        toolbar.addSeparator()
        toolbar.addAction(self.invert_action)
        toolbar.addAction(self.flip_action)
        self.window_combo = QComboBox()
        self.window_combo.setToolTip("Window/level preset (right-drag on the image to adjust)")
        self.window_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.window_combo.activated.connect(self._on_window_combo_activated)
        self.window_combo.setPlaceholderText("Custom window")
        toolbar.addWidget(self.window_combo)
        toolbar.addAction(self.reset_window_action)
        toolbar.addSeparator()
        toolbar.addAction(self.mask_action)
        toolbar.addAction(self.heatmap_action)
        self.addToolBar(toolbar)
        self.toolbar = toolbar
        self.view_menu.addAction(toolbar.toggleViewAction())
        self._fill_window_combo()

    def _connect_viewer(self) -> None:
        self.viewer.cursor_moved.connect(self._on_viewer_cursor_moved)
        self.viewer.cursor_left.connect(self._on_viewer_cursor_left)
        self.viewer.zoom_changed.connect(self._on_viewer_zoom_changed)
        self.viewer.window_changed.connect(self._on_viewer_window_changed)
        self.viewer.files_dropped.connect(self.open_paths)

    # ----------------------------------------------------------------------------------------
    # Settings

    def _restore_settings(self) -> None:
        s = self.settings
        geometry = s.value("window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self._first_start_size()
        state = s.value("window/state")
        if isinstance(state, QByteArray) and not state.isEmpty():
            self.restoreState(state)
        mask_visible = s.value("overlay/mask_visible", True, type=bool)
        mode = s.value("overlay/mask_mode", MASK_OUTLINE, type=str)
        colour = QColor(s.value("overlay/mask_colour", "#ff4040", type=str))
        if not colour.isValid():
            colour = QColor("#ff4040")
        mask_opacity = s.value("overlay/mask_opacity", 45, type=int)
        heatmap_visible = s.value("overlay/heatmap_visible", False, type=bool)
        heatmap_opacity = s.value("overlay/heatmap_opacity", 50, type=int)
        # Setting the controls triggers their slots, which apply the style to the viewer.
        self.results.set_mask_colour(colour)
        self.viewer.set_mask_style(mode, colour, mask_opacity / 100.0)
        self.results.set_mask_mode(mode)
        self.mask_fill_action.setChecked(mode == MASK_FILL)
        self.results.mask_opacity.setValue(mask_opacity)
        self.results.heatmap_opacity.setValue(heatmap_opacity)
        self.viewer.set_heatmap_opacity(heatmap_opacity / 100.0)
        self._set_mask_visible(mask_visible)
        self._set_heatmap_visible(heatmap_visible)
        self._rebuild_recent_menu()

    def _first_start_size(self) -> None:
        screen = QGuiApplication.primaryScreen()
        if screen is None:
            self.resize(1280, 860)
            return
        available = screen.availableGeometry()
        width = min(max(int(available.width() * 0.8), 1024), 1680, available.width())
        height = min(max(int(available.height() * 0.85), 700), 1050, available.height())
        self.resize(width, height)
        frame = self.frameGeometry()
        frame.moveCenter(available.center())
        self.move(frame.topLeft())

    def _save_window_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.sync()

    def recent_files(self) -> list[str]:
        value = self.settings.value("files/recent", [])
        if isinstance(value, str):
            value = [value] if value else []
        return [str(v) for v in (value or [])]

    def _add_recent(self, path: Path) -> None:
        text = str(path)
        recent = [p for p in self.recent_files() if p != text]
        recent.insert(0, text)
        self.settings.setValue("files/recent", recent[:MAX_RECENT])
        self.settings.setValue("files/last_folder", str(path.parent))
        self._rebuild_recent_menu()

    def _forget_recent(self, path: Path) -> None:
        recent = [p for p in self.recent_files() if p != str(path)]
        self.settings.setValue("files/recent", recent)
        self._rebuild_recent_menu()

    def _rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.recent_files()
        for number, text in enumerate(recent, start=1):
            label = f"&{number} {Path(text).name}" if number < 10 else f"{number} {Path(text).name}"
            action = self.recent_menu.addAction(label)
            action.setToolTip(text)
            action.setStatusTip(text)
            action.triggered.connect(lambda _=False, p=text: self.open_paths([p]))
        if recent:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear Recent Files", self._on_clear_recent_triggered)
        self.recent_menu.setEnabled(bool(recent))

    def last_folder(self) -> str:
        folder = self.settings.value("files/last_folder", "", type=str)
        return folder if folder and Path(folder).is_dir() else str(Path.home())

    # ----------------------------------------------------------------------------------------
    # Opening images

    def open_paths(self, paths: list) -> None:
        """Open dropped, recent or command-line paths: a file, several files, or a folder."""
        paths = [Path(p) for p in paths if str(p)]
        if not paths:
            return
        if len(paths) == 1 and paths[0].is_dir():
            folder = paths[0]
            files = self._images_in_folder(folder)
            if not files:
                self.show_error("Open Folder", f"No images were found in the folder {folder}.")
                return
            self._nav_files = files
            self.settings.setValue("files/last_folder", str(folder))
            self._open_file(files[0])
            return
        files = [p for p in paths if not p.is_dir()]
        if not files:
            self.show_error("Open", "Drop image files, or one folder of images.")
            return
        self._nav_files = files if len(files) > 1 else images_beside(files[0])
        self._open_file(files[0])

    @staticmethod
    def _images_in_folder(folder: Path) -> list[Path]:
        try:
            from core.batch import find_images

            files, _ = find_images([folder])
            return files
        except ImportError:
            extensions = image_extensions()
            return sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions)

    def open_file(self, path: str | Path) -> None:
        """Open one image; the folder's other images become next/previous."""
        path = Path(path)
        self._nav_files = images_beside(path)
        self._open_file(path)

    def _open_file(self, path: Path) -> None:
        self._pending_path = path
        self.statusBar().showMessage(f"Opening {path.name}…")
        self.runner.start(path, self.analyzer, self._with_heatmap, self._compare)
        self._update_nav_actions()

    def open_next(self) -> None:
        self._step_image(+1)

    def open_previous(self) -> None:
        self._step_image(-1)

    def _step_image(self, step: int) -> None:
        current = self._pending_path or (self.mammogram.path if self.mammogram else None)
        if not self._nav_files or current is None:
            return
        try:
            index = self._nav_files.index(Path(current))
        except ValueError:
            index = -1 if step > 0 else len(self._nav_files)
        target = index + step
        if 0 <= target < len(self._nav_files):
            self._open_file(self._nav_files[target])
        else:
            self.statusBar().showMessage(
                "Last image in the folder" if step > 0 else "First image in the folder", 3000
            )

    def _update_nav_actions(self) -> None:
        """Next, Previous and Analyse Again only where they would do something."""
        current = self._pending_path or (self.mammogram.path if self.mammogram else None)
        index = self._nav_files.index(current) if current in self._nav_files else -1
        has_next = 0 <= index < len(self._nav_files) - 1 or (index == -1 and bool(self._nav_files))
        self.next_action.setEnabled(current is not None and has_next)
        self.previous_action.setEnabled(index > 0)
        self.reanalyse_action.setEnabled(self.analyzer is not None and self.mammogram is not None
                                         and self.mammogram.path is not None)

    def navigation_files(self) -> list[Path]:
        return list(self._nav_files)

    # ----------------------------------------------------------------------------------------
    # Results from the worker

    def _on_runner_step_ready(self, request: int, step: Step) -> None:
        handler = {
            "image": self._show_image,
            "analysis": self._show_analysis,
            "other_breast": self._show_other_breast,
            "heatmap": self._show_heatmap,
        }.get(step.kind)
        if handler is not None:
            handler(step)
        elif step.kind == "read_failed":
            path = self._pending_path
            self._pending_path = None
            if path is not None and not path.exists():
                self._forget_recent(path)
            self.statusBar().showMessage("The image could not be opened", 5000)
            self.show_error("Cannot open image", self._read_error_text(path, step.value))
        elif step.kind == "analysis_failed":
            reason = getattr(step.value, "reason", None)  # core.io.ImageReadError: no breast in it
            self.results.set_status(f"Not analysed: {reason}." if reason else "The analysis failed.")
            if reason:
                message = f"The models cannot read this image:\n\n{step.value}.\n\nThe image is still shown."
            else:
                message = (f"The model could not analyse this image:\n\n{step.value}\n\n"
                           "The image is still shown; try another image or another model bundle.")
            self.show_error("Analysis failed", message)
        elif step.kind == "other_breast_found":
            self.results.set_pairing_note(f"Reading it beside the other breast, {step.value.name}…")
        elif step.kind == "other_breast_failed":
            other_path, exc = step.value
            reason = getattr(exc, "reason", None) or str(exc)
            self.results.set_pairing_note(
                f"Read alone: the other breast's film {other_path.name} could not be analysed "
                f"({reason})."
            )
            self._after_other_breast()
        elif step.kind == "heatmap_failed":
            self._heatmap_failed = True
            self.results.set_heatmap_status(f"The heatmap could not be computed: {step.value}")

    @staticmethod
    def _read_error_text(path: Path | None, exc: Exception) -> str:
        name = str(path) if path is not None else "The file"
        reason = (getattr(exc, "reason", None) or str(exc)).rstrip().rstrip(".")
        return f"{name}\n\ncould not be opened: {reason}."

    def _show_image(self, step: Step) -> None:
        mammogram = step.value
        self.mammogram = mammogram
        self.analysis = None
        self.other_breast = None
        meta = mammogram.meta or {}
        self.viewer.set_image(
            mammogram.pixels, mammogram.raw, meta.get("windows") or [], meta.get("photometric"),
            inverted=meta.get("inverted"), stored_range=meta.get("stored_range"),
            window_function=meta.get("window_function") or "LINEAR",
        )
        self._fill_window_combo()
        self._rebuild_window_menu()
        self.tags.set_tags(meta.get("dicom_tags") or [])
        path = mammogram.path or self._pending_path
        self.setWindowTitle(f"{Path(path).name} — {APP_NAME}" if path else APP_NAME)
        self.results.clear_results()
        self.results.set_file(self._describe_image(mammogram, path))
        if path is not None:
            self._add_recent(Path(path))
        if self.analyzer is not None:
            self.results.set_busy(True, "Analysing…")
        else:
            self.results.set_status("No model loaded: analysis is off.")
        self.statusBar().showMessage(f"Opened {Path(path).name if path else 'image'}", 3000)
        self._update_nav_actions()
        self.image_shown.emit(mammogram)

    @staticmethod
    def _describe_image(mammogram, path) -> str:
        meta = mammogram.meta or {}
        height, width = mammogram.pixels.shape
        parts = [f"<b>{Path(path).name if path else 'image'}</b>"]
        details = [f"{width} × {height}", str(meta.get("format") or "")]
        side = {"L": "left", "R": "right"}.get(meta.get("laterality") or "", "")
        view = meta.get("view") or ""
        if side or view:
            details.append(" ".join(x for x in (side, view) if x))
        spacing = meta.get("pixel_spacing_mm")
        if spacing:
            row, col = float(spacing[0]), float(spacing[1] if len(spacing) > 1 else spacing[0])
            details.append(f"{row:.3g} mm/px" if row == col else f"{row:.3g} × {col:.3g} mm/px (row × column)")
        frames = int(meta.get("frames") or 1)
        if frames > 1:
            details.append(f"frame 1 of {frames} shown")
        parts.append(", ".join(d for d in details if d))
        return "<br>".join(parts)

    def _show_analysis(self, step: Step) -> None:
        analysis = step.value
        self.analysis = analysis
        self._heatmap_failed = False
        self.other_breast = None
        self.results.show_analysis(analysis)
        self.viewer.set_mask(analysis.lesion_mask)
        reads_pairs = bool(getattr(self.analyzer, "reads_pairs", False))
        if not reads_pairs:
            self.results.set_pairing_note("This model reads one film at a time.")
        elif not self._compare:
            self.results.set_pairing_note(
                "Read alone: comparison with the other breast is off (Analysis menu, B)."
            )
        else:
            self.results.set_pairing_note("Looking for the other breast…")
        self._pairing_pending = reads_pairs and self._compare
        if self._pairing_pending:
            self.results.set_busy(True, "Classified alone; reading it beside the other breast…")
        elif self._with_heatmap:
            self.results.set_busy(True, "Classified; computing the explanation heatmap…")
            self.results.set_heatmap_status("Computing…")
        else:
            self.results.set_busy(False, "Analysis done.")
        self.analysis_shown.emit(analysis)

    def _show_other_breast(self, step: Step) -> None:
        other = step.value
        if other.path is None:
            self.results.set_pairing_note(f"Read alone: {other.reason}.")
        else:
            self.other_breast = other
            self.results.show_other_breast(other)
        self._after_other_breast()
        self.other_breast_shown.emit(other)

    def _after_other_breast(self) -> None:
        self._pairing_pending = False
        if self._with_heatmap:
            self.results.set_busy(True, "Classified; computing the explanation heatmap…")
            self.results.set_heatmap_status("Computing…")
        else:
            self.results.set_busy(False, "Analysis done.")

    def _on_compare_toggled(self, checked: bool) -> None:
        self._compare = checked
        self.settings.setValue("analysis/compare_other_breast", "true" if checked else "false")
        self._on_reanalyse_triggered()

    def _show_heatmap(self, step: Step) -> None:
        self.viewer.set_heatmap(step.value)
        status = f"Computed in {step.seconds:.1f} s."
        if self.other_breast is not None and self.analysis is not None:
            status += f" It explains the film read alone ({self.analysis.predicted})."
        self.results.set_heatmap_status(status)
        self.results.set_busy(False, "Analysis done.")
        self.heatmap_shown.emit(step.value)

    def _on_runner_busy_changed(self, busy: bool) -> None:
        self.busy_bar.setVisible(busy)
        if busy:
            QApplication.setOverrideCursor(Qt.CursorShape.BusyCursor)
        else:
            QApplication.restoreOverrideCursor()
            if self.results.is_busy():
                self.results.set_busy(False)

    def _on_runner_job_finished(self, request: int) -> None:
        self._pending_path = None
        if self.results.is_busy():
            self.results.set_busy(False)
        self._note_interrupted_heatmap()
        self._note_interrupted_pairing()
        self.image_job_finished.emit()

    def _note_interrupted_pairing(self) -> None:
        # A job replaced while it looked for or read the other breast leaves the film read alone.
        if self._pairing_pending and self.analysis is not None:
            self._pairing_pending = False
            self.results.set_pairing_note(
                "Read alone: the comparison with the other breast was interrupted "
                "(Analysis ▸ Analyse Again, F5, repeats it)."
            )

    def _note_interrupted_heatmap(self) -> None:
        # A job replaced before its heatmap (a newer file that failed to open, a model switch)
        # leaves the image on screen without one: say so rather than "computing" forever.
        if (
            self._with_heatmap
            and self.analysis is not None
            and self.viewer.heatmap() is None
            and not self._heatmap_failed
        ):
            self.results.set_status("Analysis done; the heatmap was interrupted.")
            self.results.set_heatmap_status(
                "Interrupted: Analysis ▸ Analyse Again (F5) computes it."
            )

    # ----------------------------------------------------------------------------------------
    # Errors

    def confirm(self, title: str, question: str) -> bool:
        """Ask before discarding work: True if the user chooses Discard (Cancel is the default)."""
        box = QMessageBox(QMessageBox.Icon.Warning, title, question,
                          QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel, self)
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        return box.exec() == QMessageBox.StandardButton.Discard

    def show_error(self, title: str, message: str) -> QMessageBox:
        """A clear, specific error dialog; window-modal but non-blocking, so the app goes on."""
        log.info("%s: %s", title, message)
        box = QMessageBox(
            QMessageBox.Icon.Critical, title, message, QMessageBox.StandardButton.Ok, self
        )
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.setWindowModality(Qt.WindowModality.WindowModal)
        box.open()
        self.error_shown.emit(title, message)
        return box

    # ----------------------------------------------------------------------------------------
    # Status bar

    def _on_viewer_cursor_moved(self, x: int, y: int) -> None:
        self.position_label.setText(f"x {x}  y {y}")
        if self.mammogram is not None:
            raw = self.mammogram.raw
            if raw is not None and 0 <= y < raw.shape[0] and 0 <= x < raw.shape[1]:
                self.value_label.setText(f"value {format_raw(raw[y, x])}")

    def _on_viewer_cursor_left(self) -> None:
        self.position_label.setText("")
        self.value_label.setText("")

    def _on_viewer_zoom_changed(self, zoom: float) -> None:
        self.zoom_label.setText(
            f"zoom {zoom * 100:.0f} %" if zoom >= 0.1 else f"zoom {zoom * 100:.1f} %"
        )

    def _on_viewer_window_changed(self, centre: float, width: float, source: str) -> None:
        # A preset's name selects it; a dragged window matches none and shows the placeholder.
        self.window_combo.setCurrentIndex(self.window_combo.findText(self.viewer.window().name))
        if source == "display":
            self.window_label.setText(f"W {width * 100:.0f}% L {centre * 100:.0f}%")
        else:
            self.window_label.setText(f"W {width:.0f} L {centre:.0f}")

    # ----------------------------------------------------------------------------------------
    # Window / level presets

    def _fill_window_combo(self) -> None:
        self.window_combo.clear()
        for preset in self.viewer.window_presets():
            self.window_combo.addItem(preset.name, preset)
        # With a placeholder set, QComboBox selects nothing by itself.
        self.window_combo.setCurrentIndex(self.window_combo.findText(self.viewer.window().name))
        self.window_combo.setEnabled(self.viewer.has_image())

    def _rebuild_window_menu(self) -> None:
        self.window_menu.clear()
        group = QActionGroup(self.window_menu)
        for preset in self.viewer.window_presets():
            action = self.window_menu.addAction(preset.name)
            action.triggered.connect(lambda _=False, p=preset: self._apply_preset(p))
            group.addAction(action)
        self.window_menu.setEnabled(self.viewer.has_image())

    def _on_window_combo_activated(self, index: int) -> None:
        preset = self.window_combo.itemData(index)
        if isinstance(preset, WindowPreset):
            self.viewer.apply_preset(preset)

    def _apply_preset(self, preset: WindowPreset) -> None:
        self.viewer.apply_preset(preset)
        index = self.window_combo.findText(preset.name)
        if index >= 0:
            self.window_combo.setCurrentIndex(index)

    # ----------------------------------------------------------------------------------------
    # Overlays: the View menu and the panel drive the same state

    def _set_mask_visible(self, visible: bool) -> None:
        for control in (self.mask_action, self.results.mask_check):
            control.blockSignals(True)
            control.setChecked(visible)
            control.blockSignals(False)
        self.viewer.set_mask_visible(visible)

    def _set_heatmap_visible(self, visible: bool) -> None:
        for control in (self.heatmap_action, self.results.heatmap_check):
            control.blockSignals(True)
            control.setChecked(visible)
            control.blockSignals(False)
        self.viewer.set_heatmap_visible(visible)

    def set_overlays_visible(self, mask: bool, heatmap: bool) -> None:
        self._set_mask_visible(mask)
        self._set_heatmap_visible(heatmap)

    def _on_mask_visible_changed(self, visible: bool) -> None:
        self._set_mask_visible(visible)
        self.settings.setValue("overlay/mask_visible", visible)

    def _on_heatmap_visible_changed(self, visible: bool) -> None:
        self._set_heatmap_visible(visible)
        self.settings.setValue("overlay/heatmap_visible", visible)

    def _on_mask_mode_changed(self, mode: str) -> None:
        self.viewer.set_mask_style(mode=mode)
        self.mask_fill_action.blockSignals(True)
        self.mask_fill_action.setChecked(mode == MASK_FILL)
        self.mask_fill_action.blockSignals(False)
        self.settings.setValue("overlay/mask_mode", mode)

    def _on_mask_fill_action_toggled(self, fill: bool) -> None:
        self.results.set_mask_mode(MASK_FILL if fill else MASK_OUTLINE)

    def _on_mask_opacity_changed(self, opacity: float) -> None:
        self.viewer.set_mask_style(opacity=opacity)
        self.settings.setValue("overlay/mask_opacity", round(opacity * 100))

    def _on_mask_colour_changed(self, colour: QColor) -> None:
        self.viewer.set_mask_style(colour=colour)
        self.settings.setValue("overlay/mask_colour", colour.name())

    def _on_heatmap_opacity_changed(self, opacity: float) -> None:
        self.viewer.set_heatmap_opacity(opacity)
        self.settings.setValue("overlay/heatmap_opacity", round(opacity * 100))

    # ----------------------------------------------------------------------------------------
    # Menu slots

    def _on_open_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open Mammogram", self.last_folder(), OPEN_FILTER
        )
        if path:
            self.open_file(path)

    def _on_clear_recent_triggered(self) -> None:
        self.settings.setValue("files/recent", [])
        self._rebuild_recent_menu()

    def _on_classify_folder_triggered(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Classify Folder", self.last_folder())
        if folder:
            self.classify_folder(folder)

    def classify_folder(self, folder: str | Path) -> BatchDialog | None:
        """Start a batch over ``folder`` (recursive) and show its table."""
        folder = Path(folder)
        if self.analyzer is None:
            self.show_error(
                "Classify Folder",
                "No model is loaded, so nothing can be classified. "
                "Load a model bundle from the Analysis menu first.",
            )
            return None
        try:
            from core.batch import find_images
        except ImportError as exc:
            self.show_error("Classify Folder", f"Batch classification is not available ({exc}).")
            return None
        files, skipped = find_images([folder])
        if not files:
            self.show_error(
                "Classify Folder", f"No images were found in {folder} or its subfolders."
            )
            return None
        dialog = self._batch_dialog
        if dialog is not None and (lost := dialog.unsaved()) and not self.confirm(
                "Classify Folder", f"{lost}. Start a new batch and discard its results?"):
            return None
        self.settings.setValue("files/last_folder", str(folder))
        if dialog is None:
            dialog = BatchDialog(self, tuple(self.analyzer.classes))
            dialog.open_requested.connect(self.open_file)
            self._batch_dialog = dialog
        dialog.start(folder, files, self.analyzer.path, skipped)
        dialog.show()
        dialog.raise_()
        self.batch_results_action.setEnabled(True)
        return dialog

    def batch_dialog(self) -> BatchDialog | None:
        return self._batch_dialog

    def _on_batch_results_triggered(self) -> None:
        if self._batch_dialog is not None:
            self._batch_dialog.show()
            self._batch_dialog.raise_()

    def _on_reanalyse_triggered(self) -> None:
        if self.mammogram is not None and self.mammogram.path is not None:
            self._open_file(Path(self.mammogram.path))

    def _on_load_model_triggered(self) -> None:
        start = str(self.analyzer.path) if self.analyzer is not None else self.last_folder()
        folder = QFileDialog.getExistingDirectory(self, "Load Model Bundle", start)
        if folder:
            self.load_bundle(folder)

    def _on_bundled_model_triggered(self) -> None:
        self.load_bundle(None)

    def load_bundle(self, folder: str | Path | None) -> bool:
        """Use another bundle (``None``: the bundled one); a bad bundle keeps the current model."""
        try:
            from core.inference import Analyzer
        except ImportError as exc:
            self.show_error("Load Model Bundle", f"Inference is not available ({exc}).")
            return False
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            analyzer = Analyzer.from_bundle(folder)
        except Exception as exc:  # BundleError above all; LiteRT may refuse a damaged model too
            QApplication.restoreOverrideCursor()
            keeping = (
                f"MammoLab keeps using {self.analyzer.name} v{self.analyzer.version}."
                if self.analyzer is not None
                else "No model is loaded."
            )
            self.show_error(
                "Model bundle refused", f"This model bundle cannot be used:\n\n{exc}\n\n{keeping}"
            )
            return False
        QApplication.restoreOverrideCursor()
        self.set_analyzer(analyzer)
        # The next start opens this bundle again (desktop.app.startup_model)
        self.settings.setValue(LAST_BUNDLE_KEY, str(Path(folder).resolve()) if folder is not None else "")
        self.statusBar().showMessage(f"Model {analyzer.name} v{analyzer.version} loaded", 5000)
        return True

    def set_analyzer(self, analyzer) -> None:
        """Switch model; the image on screen is analysed again with it."""
        self.runner.cancel()
        self.analyzer = analyzer
        self._show_model()
        self.model_changed.emit(analyzer)
        if self.mammogram is not None and self.mammogram.path is not None:
            self._open_file(Path(self.mammogram.path))

    def _show_model(self) -> None:
        analyzer = self.analyzer
        has_model = analyzer is not None
        if has_model:
            self.results.set_model(analyzer.name, analyzer.version, tuple(analyzer.classes))
        else:
            self.results.set_model(None, None)
        for action in (self.model_card_action, self.classify_folder_action):
            action.setEnabled(has_model)
        self._update_nav_actions()  # Analyse Again needs a model and an image

    def _on_model_card_triggered(self) -> None:
        if self.analyzer is not None:
            ModelCardDialog(self.analyzer.card, self.analyzer.path, self).open()

    def shortcut_actions(self) -> list[QAction]:
        return [
            self.open_action, self.classify_folder_action, self.next_action, self.previous_action,
            self.fit_action, self.actual_size_action, self.zoom_in_action, self.zoom_out_action,
            self.invert_action, self.flip_action, self.reset_window_action, self.mask_action,
            self.mask_fill_action, self.heatmap_action, self.reanalyse_action, self.compare_action,
            self.shortcuts_action, self.quit_action,
        ]  # fmt: skip

    def _on_shortcuts_triggered(self) -> None:
        ShortcutsDialog(self.shortcut_actions(), self).open()

    def _on_disclaimer_triggered(self) -> None:
        self.show_disclaimer()

    def _on_about_triggered(self) -> None:
        model = (
            f"{self.analyzer.name} v{self.analyzer.version} ({self.analyzer.path})"
            if self.analyzer is not None
            else "none loaded"
        )
        AboutDialog(model, self).open()

    # ----------------------------------------------------------------------------------------
    # Disclaimer

    def disclaimer_acknowledged(self) -> bool:
        return self.settings.value(DISCLAIMER_KEY, False, type=bool)

    def show_disclaimer(self) -> DisclaimerDialog:
        dialog = DisclaimerDialog(self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(self._on_disclaimer_accepted)
        dialog.open()
        return dialog

    def _on_disclaimer_accepted(self) -> None:
        self.settings.setValue(DISCLAIMER_KEY, True)
        self.settings.sync()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._show_disclaimer and not self.disclaimer_acknowledged():
            self._show_disclaimer = False  # once per run; again next start until acknowledged
            QTimer.singleShot(0, self.show_disclaimer)

    # ----------------------------------------------------------------------------------------
    # Drag and drop onto the window (the viewer handles drops on itself)

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        paths = [url.toLocalFile() for url in event.mimeData().urls() if url.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.open_paths(paths)

    # ----------------------------------------------------------------------------------------
    # Closing

    def closeEvent(self, event: QCloseEvent) -> None:
        if self._batch_dialog is not None:
            lost = self._batch_dialog.unsaved()
            if lost and not self.confirm("Quit MammoLab", f"{lost}. Quit and discard its results?"):
                event.ignore()
                return
        self._save_window_settings()
        if self._batch_dialog is not None:
            self._batch_dialog.cancel()
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            # A worker stops at its next step; at most one model call has to finish first.
            if not self.runner.shutdown():
                log.warning("a background job did not stop in time")
        finally:
            QApplication.restoreOverrideCursor()
        super().closeEvent(event)
