"""Background work: reading and analysing one image, and classifying a folder.

Jobs are generators run by superqt's ``GeneratorWorker`` on the global thread pool. They yield a
record per step and never touch a widget; results come back to the main thread through the
worker's signals. ``quit()`` stops a job at its next yield, which is how a newer image
supersedes an older one and how Cancel stops a batch.

One ``Analyzer`` holds LiteRT interpreters, which must not be invoked from two threads at once;
``ANALYZER_LOCK`` serialises calls on the app's analyzer (a batch uses its own analyzer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QThreadPool, Signal
from superqt.utils import GeneratorWorker, WorkerBase, thread_worker

log = logging.getLogger(__name__)

ANALYZER_LOCK = threading.Lock()

# Raw classifier probabilities of recently analysed files, so stepping from one breast to the
# other does not analyse the first again as the partner. Keyed by file identity and analyzer.
_RAW_CACHE: dict[tuple, Any] = {}
_RAW_CACHE_SIZE = 64
_RAW_CACHE_LOCK = threading.Lock()


def _raw_key(path: Path, analyzer) -> tuple | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    card = getattr(analyzer, "card", None) or {}
    model = (str(getattr(analyzer, "path", "")), str(getattr(analyzer, "version", "")),
             str(card.get("files", {}).get("classifier.tflite", {}).get("sha256", id(analyzer))))
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, model)


def remember_raw(path: Path, analyzer, analysis) -> None:
    """Keep ``analysis``'s raw classifier probabilities for :func:`recalled_raw`."""
    key = _raw_key(path, analyzer)
    if key is None or getattr(analysis, "raw_probabilities", None) is None:
        return
    with _RAW_CACHE_LOCK:
        _RAW_CACHE.pop(key, None)
        _RAW_CACHE[key] = analysis.raw_probabilities
        while len(_RAW_CACHE) > _RAW_CACHE_SIZE:
            _RAW_CACHE.pop(next(iter(_RAW_CACHE)))


def recalled_raw(path: Path, analyzer):
    """Raw classifier probabilities of an unchanged file analysed by ``analyzer``, or None."""
    key = _raw_key(path, analyzer)
    with _RAW_CACHE_LOCK:
        return None if key is None else _RAW_CACHE.get(key)


@dataclass(frozen=True)
class Step:
    """One record a job yields: ``kind`` names the step, ``value`` carries its result."""

    # "image", "analysis", "other_breast_found", "other_breast", "heatmap", "read_failed",
    # "analysis_failed", "other_breast_failed", "heatmap_failed"
    kind: str
    value: Any
    seconds: float = 0.0


@dataclass(frozen=True)
class OtherBreast:
    """The film read beside the other breast: ``path`` is None when no partner was found."""

    path: Path | None
    probabilities: Any = None  # (n_classes,) the bilateral reading, or None
    predicted: str | None = None
    single: Any = None  # the film's own core.inference.Analysis
    reason: str = ""  # why there is no partner (path None)


def other_breast_steps(path: Path, mammogram, analysis, analyzer) -> Generator[Step, None, None]:
    """Find the other breast's film beside ``path``, analyse it and read the pair.

    Yields ``other_breast_found`` (the partner's path; a point where a newer request can stop
    the job) before analysing the partner, then one ``other_breast`` step (an
    :class:`OtherBreast`, its ``path`` None and ``reason`` said when there is no partner) or an
    ``other_breast_failed`` step carrying ``(partner path, exception)``; the film's own analysis
    stands either way.
    """
    from core.io import read_image
    from core.pairing import search_other_breast

    start = time.perf_counter()
    try:
        found = search_other_breast(path, mammogram.meta)
        other_path, reason = found.path, found.reason
    except Exception as exc:  # a folder that cannot be searched is simply no partner
        log.exception("searching beside %s for the other breast failed", path)
        other_path, reason = None, f"the search for it failed ({exc})"
    if other_path is None:
        yield Step("other_breast", OtherBreast(None, single=analysis, reason=reason),
                   time.perf_counter() - start)
        return
    yield Step("other_breast_found", other_path, time.perf_counter() - start)
    try:
        other_raw = recalled_raw(other_path, analyzer)
        if other_raw is None:
            other = read_image(other_path)
            with ANALYZER_LOCK:
                other_analysis = analyzer.analyze(other)
            remember_raw(other_path, analyzer, other_analysis)
            other_raw = other_analysis.raw_probabilities
        probs = analyzer.compare_raw(analysis.raw_probabilities, other_raw)
    except Exception as exc:
        log.info("the other breast %s could not be read: %s", other_path, exc)
        yield Step("other_breast_failed", (other_path, exc))
        return
    predicted = analyzer.call_pair(probs)
    yield Step("other_breast", OtherBreast(other_path, probs, predicted, analysis),
               time.perf_counter() - start)


def analysis_job(path: Path, analyzer, with_heatmap: bool = True,
                 compare: bool = True) -> Generator[Step, None, None]:
    """Read ``path``, analyse it, read it beside the other breast, then compute the heatmap.

    Yields the mammogram first so the image shows at once, the analysis next so the confidence
    bars appear before the (slower) steps. With ``compare`` and a bundle that reads pairs, the
    other breast's film (same folder, same view) is found and analysed and the bars are
    replaced by the pair's reading. Failures are yielded as ``*_failed`` steps carrying the
    exception; only a failed read or analysis ends the job.
    """
    # Imported here: the window must start even without core.io.
    from core.io import ImageReadError, read_image

    start = time.perf_counter()
    try:
        mammogram = read_image(path)
    except Exception as exc:  # every failure to read becomes a message, never a crash
        log.info("could not read %s: %s", path, exc)
        yield Step("read_failed", exc)
        return
    yield Step("image", mammogram, time.perf_counter() - start)
    if analyzer is None:
        return
    start = time.perf_counter()
    try:
        with ANALYZER_LOCK:
            analysis = analyzer.analyze(mammogram)
    except Exception as exc:
        if isinstance(exc, ImageReadError):  # an image the models cannot read (no breast in it)
            log.info("%s not analysed: %s", path, exc)
        else:
            log.exception("analysis of %s failed", path)
        yield Step("analysis_failed", exc)
        return
    remember_raw(path, analyzer, analysis)
    yield Step("analysis", analysis, time.perf_counter() - start)
    if compare and getattr(analyzer, "reads_pairs", False):
        yield from other_breast_steps(path, mammogram, analysis, analyzer)
    if not with_heatmap:
        return
    start = time.perf_counter()
    try:
        with ANALYZER_LOCK:
            heat = analyzer.heatmap(mammogram, analysis)
    except Exception as exc:
        log.exception("heatmap of %s failed", path)
        yield Step("heatmap_failed", exc)
        return
    yield Step("heatmap", heat, time.perf_counter() - start)


class AnalysisRunner(QObject):
    """Keeps at most one image job in flight: a newer request supersedes the older one.

    Results of a superseded job are dropped, whatever thread timing does; only the current
    request's steps are re-emitted, as ``step_ready(request, step)``.
    """

    step_ready = Signal(int, object)  # request number, Step
    busy_changed = Signal(bool)
    job_finished = Signal(int)  # request number; emitted when the current job ends

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._request = 0
        self._worker: GeneratorWorker | None = None
        self._workers: set[WorkerBase] = set()

    def current_request(self) -> int:
        return self._request

    def is_busy(self) -> bool:
        return self._worker is not None

    def start(self, path: Path, analyzer, with_heatmap: bool = True, compare: bool = True) -> int:
        """Start reading and analysing ``path``; returns the request number."""
        self.cancel()
        self._request += 1
        request = self._request
        worker = thread_worker(analysis_job, start_thread=False)(path, analyzer, with_heatmap, compare)
        worker.yielded.connect(lambda step, r=request: self._on_worker_yielded(r, step))
        worker.finished.connect(lambda w=worker, r=request: self._on_worker_finished(w, r))
        self._worker = worker
        self._workers.add(worker)
        self.busy_changed.emit(True)
        worker.start()
        return request

    def cancel(self) -> None:
        """Ask the current job to stop at its next step; its results will be ignored."""
        if self._worker is not None:
            self._worker.quit()
            self._worker = None
            self._request += 1
            self.busy_changed.emit(False)

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Stop every job and wait for their threads; False if one is still running."""
        self.cancel()
        for worker in list(self._workers):
            worker.quit()
        return QThreadPool.globalInstance().waitForDone(timeout_ms)

    def _on_worker_yielded(self, request: int, step: Step) -> None:
        if request == self._request:
            self.step_ready.emit(request, step)

    def _on_worker_finished(self, worker: WorkerBase, request: int) -> None:
        self._workers.discard(worker)
        if worker is self._worker:
            self._worker = None
            self.busy_changed.emit(False)
            self.job_finished.emit(request)


def batch_job(bundle_path: Path | None, files: list[Path]) -> Generator[Any, None, Any]:
    """Load a private analyzer from ``bundle_path`` and classify ``files``, one row per yield.

    A private analyzer keeps the batch from contending with the viewer's analysis. Yields
    ``("loaded", None)`` once the model is ready, then each ``core.batch`` row; returns the
    batch summary. Nothing is written to disk.
    """
    from core.batch import classify_files
    from core.inference import Analyzer

    analyzer = Analyzer.from_bundle(bundle_path)
    yield ("loaded", None)
    rows = classify_files(analyzer, files)
    while True:
        try:
            row = next(rows)
        except StopIteration as stop:
            return stop.value
        yield ("row", row)
