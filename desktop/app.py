"""Starting the desktop app: ``run_gui`` is what ``mammolab [PATH] [--model DIR] [--screenshot]`` calls.

With ``screenshot`` the app opens the image, waits until its analysis and heatmap are shown,
saves a grab of the whole window with the overlays on, and exits: the docs and the tests use it.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication

from core import __version__
from core.paths import resources_dir

log = logging.getLogger(__name__)

ORGANISATION = "MammoLab"
SCREENSHOT_TIMEOUT = 600  # s: give up on an analysis that never finishes
SCREENSHOT_SIZE = (1500, 940)  # px: one size for every documentation screenshot


def sample_images() -> list[Path]:
    """The sample image(s) shipped in ``resources/samples``, opened when no path is given."""
    folder = resources_dir() / "samples"
    return sorted(p for p in folder.glob("*.dcm")) if folder.is_dir() else []


def make_application(argv: list[str] | None = None) -> QApplication:
    app = QApplication.instance()
    if app is None:
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setOrganizationName(ORGANISATION)
    app.setApplicationName("MammoLab")
    app.setApplicationVersion(__version__)
    from desktop.main_window import app_icon

    app.setWindowIcon(app_icon())
    return app


def load_analyzer(model_dir: str | Path | None):
    """(analyzer, None) or (None, reason) for a bundle folder (``None``: the bundled model)."""
    try:
        from core.inference import Analyzer
    except ImportError as exc:
        return None, f"inference is not available ({exc})"
    try:
        return Analyzer.from_bundle(model_dir), None
    except Exception as exc:  # BundleError, or LiteRT refusing a model
        return None, str(exc)


def startup_model(model_dir: str | Path | None, settings) -> tuple[object | None, str]:
    """The analyzer to start on, and what to tell the user ("" when nothing went wrong).

    ``--model`` first; else the bundle last loaded from the Analysis menu (remembered in
    ``settings``); else the bundled model. A bundle that cannot be loaded gives way to the bundled
    model, with the reason; a remembered one is then forgotten, so it is reported once.
    """
    from desktop.main_window import LAST_BUNDLE_KEY

    remembered = "" if model_dir is not None else str(settings.value(LAST_BUNDLE_KEY, "") or "")
    wanted = model_dir if model_dir is not None else (remembered or None)
    analyzer, error = load_analyzer(wanted)
    if error is None:
        return analyzer, ""
    if remembered:
        settings.setValue(LAST_BUNDLE_KEY, "")
    where = (f"The model bundle {wanted}" + (", last loaded from the Analysis menu," if remembered else "")
             if wanted is not None else "The bundled model")
    if wanted is not None:
        analyzer, _ = load_analyzer(None)
    now = (f"MammoLab uses {analyzer.name} v{analyzer.version} instead." if analyzer is not None
           else "The viewer works; analysis is off until a model bundle is loaded.")
    return analyzer, f"{where} could not be loaded:\n\n{error}\n\n{now}"


def run_gui(paths: list[str], model_dir: str | None = None, screenshot: str | None = None) -> int:
    """Run the desktop app until its window closes; returns the exit code.

    Parameters
    ----------
    paths : image files or one folder to open; empty opens the bundled sample image
    model_dir : a model bundle folder; ``None`` uses the bundled model
    screenshot : save a grab of the window here once the analysis is shown, then exit
    """
    app = make_application()
    from desktop.main_window import MainWindow

    if screenshot is not None:  # exactly the model asked for, never a remembered one
        analyzer, model_error = load_analyzer(model_dir)
        return _run_screenshot(app, paths, analyzer, model_error, Path(screenshot))

    settings = QSettings()
    analyzer, message = startup_model(model_dir, settings)
    window = MainWindow(analyzer=analyzer, settings=settings)
    window.show()
    if message:
        QTimer.singleShot(0, lambda: window.show_error("Model bundle refused", message))
    to_open = list(paths) or [str(p) for p in sample_images()[:1]]
    if to_open:
        QTimer.singleShot(0, lambda: window.open_paths(to_open))
    return app.exec()


def _run_screenshot(app: QApplication, paths, analyzer, model_error, out: Path) -> int:
    from desktop.main_window import MainWindow

    if analyzer is None:
        print(f"mammolab: the model bundle could not be loaded: {model_error}", file=sys.stderr)
        return 2
    to_open = list(paths) or [str(p) for p in sample_images()[:1]]
    if not to_open:
        print("mammolab: no image to open for the screenshot", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mammolab-") as scratch:
        # A throw-away settings file: the grab always shows the defaults, and a user's own
        # settings are neither read nor changed by an automated run.
        settings = QSettings(str(Path(scratch) / "settings.ini"), QSettings.Format.IniFormat)
        window = MainWindow(analyzer=analyzer, settings=settings, show_disclaimer=False)
        window.resize(*SCREENSHOT_SIZE)
        window.set_overlays_visible(mask=True, heatmap=True)
        state = {"code": None, "errors": []}

        def finish(code: int) -> None:
            if state["code"] is not None:
                return
            state["code"] = code
            app.processEvents()
            window.viewer.viewport().update()
            app.processEvents()
            if not window.grab().save(str(out)):
                print(f"mammolab: could not write the screenshot {out}", file=sys.stderr)
                state["code"] = 1
            window.close()
            app.quit()

        def on_error(title: str, message: str) -> None:
            state["errors"].append(f"{title}: {message}")
            print(f"mammolab: {title}: {message}", file=sys.stderr)
            if not window.runner.is_busy():  # nothing left to wait for (e.g. an empty folder)
                QTimer.singleShot(50, lambda: finish(1))

        def on_job_finished() -> None:
            ok = window.analysis is not None and not state["errors"]
            QTimer.singleShot(50, lambda: finish(0 if ok else 1))

        window.error_shown.connect(on_error)
        window.image_job_finished.connect(on_job_finished)
        QTimer.singleShot(SCREENSHOT_TIMEOUT * 1000, lambda: finish(3))
        window.show()
        QTimer.singleShot(0, lambda: window.open_paths(to_open))
        app.exec()
        settings.sync()
    if state["code"] == 0:
        print(f"screenshot saved to {out}", file=sys.stderr)
    elif state["code"] == 3:
        print(
            f"mammolab: no analysis after {SCREENSHOT_TIMEOUT} s; grabbed anyway", file=sys.stderr
        )
    return int(state["code"] or 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m desktop``: the same command line as ``mammolab``."""
    from core.cli import main as cli_main

    return cli_main(argv)
