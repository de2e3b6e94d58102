"""Analysis runs on a worker: the window keeps processing events, newer images supersede older
ones, and closing the window stops the workers cleanly.

A stand-in analyzer with ``Analyzer``'s interface makes the analysis deliberately slow, so the
timing is the test's, not the model's. The real model's numbers are checked in test_analysis.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from PySide6.QtCore import QThreadPool, QTimer

from core.inference import Analysis
from tests.desktop.conftest import open_and_wait

DELAY = 0.6  # s per analysis and per heatmap


class SlowAnalyzer:
    """Takes ``delay`` seconds per call and returns a square lesion in the image's middle."""

    name, version = "slow stand-in", "0.0.1"
    classes = ("Normal", "Benign", "Cancer")
    card: dict = {}
    path = None

    def __init__(self, delay: float = DELAY) -> None:
        self.delay = delay
        self.analysed: list = []
        self.threads: set[str] = set()

    def analyze(self, mammogram) -> Analysis:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        self.analysed.append(mammogram.path)
        height, width = mammogram.pixels.shape
        mask = np.zeros((height, width), bool)
        mask[height // 3 : height // 2, width // 3 : width // 2] = True
        return Analysis(
            probabilities=np.array([0.2, 0.3, 0.5], np.float32),
            classes=self.classes,
            lesion_probability=mask.astype(np.float32),
            lesion_mask=mask,
            breast_mask=np.ones_like(mask),
            lesion_area_frac=float(mask.mean()),
            model_name=self.name,
            model_version=self.version,
        )

    def heatmap(self, mammogram, analysis=None) -> np.ndarray:
        time.sleep(self.delay)
        return np.linspace(0, 1, mammogram.pixels.size, dtype=np.float32).reshape(
            mammogram.pixels.shape
        )


def test_event_loop_runs_while_the_analysis_runs(make_window, qtbot, format_files):
    slow = SlowAnalyzer()
    window = make_window(analyzer=slow)
    ticks = []
    busy_seen = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: (ticks.append(time.perf_counter()), busy_seen.append(
        window.busy_bar.isVisible() and window.results.is_busy())))  # fmt: skip
    timer.start()
    start = time.perf_counter()
    with qtbot.waitSignal(window.analysis_shown, timeout=20000):
        window.open_paths([str(format_files["png"])])
    timer.stop()
    elapsed = time.perf_counter() - start
    assert elapsed >= DELAY
    # A blocked GUI thread would deliver no ticks during the analysis; a free one about 60.
    during = [t for t in ticks if t - start > 0.1]
    assert len(during) >= 0.25 * (elapsed - 0.1) / 0.010
    assert any(busy_seen), "the busy indicator was not shown while analysing"
    assert threading.main_thread().name not in slow.threads
    assert window.results.bars.value_texts() == ["20.0 %", "30.0 %", "50.0 %"]


def test_bars_appear_before_the_heatmap(make_window, qtbot, format_files):
    window = make_window(analyzer=SlowAnalyzer())
    order = []
    window.analysis_shown.connect(lambda a: order.append("analysis"))
    window.heatmap_shown.connect(lambda h: order.append("heatmap"))
    window.image_shown.connect(lambda m: order.append("image"))
    open_and_wait(qtbot, window, format_files["png"], timeout=20000)
    assert order == ["image", "analysis", "heatmap"]
    assert window.viewer.heatmap() is not None
    assert not window.results.is_busy() and not window.busy_bar.isVisible()


def test_a_newer_image_supersedes_the_running_analysis(make_window, qtbot, format_files):
    slow = SlowAnalyzer()
    window = make_window(analyzer=slow)
    shown = []
    window.analysis_shown.connect(lambda a: shown.append(window.mammogram.path))
    window.image_shown.connect(lambda m: shown.append(("image", m.path)))
    first, second = format_files["png"], format_files["pgm"]
    window.open_paths([str(first)])
    qtbot.waitUntil(lambda: ("image", first) in shown, timeout=10000)  # first is being analysed
    window.open_paths([str(second)])
    qtbot.waitUntil(lambda: window.viewer.heatmap() is not None, timeout=20000)
    assert window.mammogram.path == second
    assert [s for s in shown if not isinstance(s, tuple)] == [second]  # first's bars never shown
    assert window.analysis is not None


def test_closing_waits_for_the_workers(make_window, qtbot, format_files):
    slow = SlowAnalyzer()
    window = make_window(analyzer=slow)
    window.open_paths([str(format_files["png"])])
    qtbot.waitUntil(lambda: window.mammogram is not None, timeout=10000)
    assert window.runner.is_busy()
    window.close()
    assert QThreadPool.globalInstance().activeThreadCount() == 0
    # The heatmap step never started: quit() stopped the job at the step after the analysis.
    assert window.viewer.heatmap() is None


def test_a_failed_open_during_the_heatmap_keeps_the_image_and_says_so(
    make_window, qtbot, format_files, bad_files
):
    window = make_window(analyzer=SlowAnalyzer())
    with qtbot.waitSignal(window.analysis_shown, timeout=20000):
        window.open_paths([str(format_files["png"])])
    shown = window.mammogram
    with qtbot.waitSignal(window.image_job_finished, timeout=20000):
        window.open_paths([str(bad_files["text"])])  # supersedes the running heatmap
    assert window.mammogram is shown and window.analysis is not None
    assert window.viewer.heatmap() is None
    assert "interrupted" in window.results.status_text()


def test_stepping_to_the_other_breast_reuses_its_reading(analyzer, mias_dir, tmp_path, monkeypatch):
    """Opening mdb002 after mdb001 reads the pair without analysing mdb001 again, and gives the
    same bars as a fresh reading; a changed file is analysed again."""
    import shutil

    from desktop import workers

    for name in ("mdb001.png", "mdb002.png"):
        shutil.copy(mias_dir / name, tmp_path / name)
    first = list(workers.analysis_job(tmp_path / "mdb001.png", analyzer, with_heatmap=False))
    calls = []
    real = analyzer.analyze
    monkeypatch.setattr(analyzer, "analyze", lambda m: calls.append(m.path.name) or real(m))
    second = list(workers.analysis_job(tmp_path / "mdb002.png", analyzer, with_heatmap=False))
    assert calls == ["mdb002.png"]  # mdb001 came from the first job
    pair = [s.value for s in second if s.kind == "other_breast"][0]
    single_1 = [s.value for s in first if s.kind == "analysis"][0]
    single_2 = [s.value for s in second if s.kind == "analysis"][0]
    np.testing.assert_array_equal(pair.probabilities, analyzer.compare(single_2, single_1))
    shutil.copy(mias_dir / "mdb007.png", tmp_path / "mdb001.png")  # another film, the partner's name
    calls.clear()
    list(workers.analysis_job(tmp_path / "mdb002.png", analyzer, with_heatmap=False))
    assert calls == ["mdb002.png", "mdb001.png"]
