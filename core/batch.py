"""Batch classification as a generator: one progress record per file, a summary at the end.

The GUI runs :func:`classify_files` in a superqt ``GeneratorWorker`` (progress and cancel for
free); the CLI iterates it and prints. Nothing is written unless asked (``masks_dir``,
:func:`write_csv`).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from core.io import ImageReadError, looks_like_image, read_image
from core.pairing import pair_files

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "status", "error", "predicted", "p_normal", "p_benign", "p_cancer",
               "lesion_area_frac", "model_version")


@dataclass
class BatchRow:
    """One file's result; ``status`` is ``ok`` or ``error``."""

    path: Path
    status: str
    error: str = ""
    predicted: str = ""
    probabilities: tuple[float, ...] = ()
    lesion_area_frac: float | None = None
    model_version: str = ""
    index: int = 0  # 1-based position in the run
    total: int = 0
    elapsed_s: float = 0.0
    other_breast: Path | None = None  # read beside this film (the other breast), if any
    single_probabilities: tuple[float, ...] = ()  # the film read alone (= probabilities if unpaired)

    @property
    def reason(self) -> str:
        """``error`` without the file name it starts with, for a line that names the file already."""
        return self.error.removeprefix(f"{Path(self.path).name}: ")

    def as_csv(self) -> dict[str, str]:
        p = list(self.probabilities) + [None] * (3 - len(self.probabilities))
        fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
        return {
            "path": str(self.path), "status": self.status, "error": self.error,
            "predicted": self.predicted, "p_normal": fmt(p[0]), "p_benign": fmt(p[1]),
            "p_cancer": fmt(p[2]), "lesion_area_frac": fmt(self.lesion_area_frac),
            "model_version": self.model_version,
        }


@dataclass
class BatchSummary:
    total: int
    ok: int
    failed: int
    skipped: int
    cancelled: bool
    seconds: float
    paired: int = 0  # films read beside the other breast


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], int]:
    """Files to classify: named files always; folders scanned recursively.

    In folders, images are recognised by extension (any case) or, for extension-less files,
    by the DICOM preamble. Other files are skipped and counted. Missing paths are kept so the
    caller reports them as errors.

    Returns
    -------
    tuple[list[Path], int]
        Files in a stable order, and how many folder entries were skipped.
    """
    files: list[Path] = []
    skipped = 0
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    f = Path(root) / name
                    if name.startswith("."):
                        skipped += 1
                    elif looks_like_image(f):
                        files.append(f)
                    else:
                        skipped += 1
        else:
            files.append(p)
    return files, skipped


def classify_files(analyzer, files: list[Path], masks_dir: str | Path | None = None,
                   skipped: int = 0, pair: bool = True) -> Generator[BatchRow, None, BatchSummary]:
    """Classify each file, yielding a :class:`BatchRow`; never stops at a bad file.

    With a bundle that reads pairs (:attr:`core.inference.Analyzer.reads_pairs`), a film whose
    other breast is also among ``files`` (:func:`core.pairing.pair_files`) is read beside it: the
    two are analysed one after the other and both rows carry the bilateral probabilities and
    ``other_breast`` (``single_probabilities`` keeps each film's own reading). Rows come in file
    order. Films without a partner, or whose partner failed, keep the single-film reading.

    Closing the generator (``.close()``, or a superqt worker's ``quit()``) cancels the run after
    the current file; the summary is then not returned.

    Parameters
    ----------
    analyzer : core.inference.Analyzer
        The loaded bundle.
    files : list[Path]
        From :func:`find_images`.
    masks_dir : path, optional
        Write each lesion mask as ``<stem>_mask.png`` (0/255) here.
    skipped : int
        Carried into the summary.
    pair : bool
        Read films beside the other breast when the bundle can (default).
    """
    start = time.perf_counter()
    out_dir = Path(masks_dir) if masks_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()
    if out_dir:  # a mask never takes the name of an image being classified
        used_names |= {f.name for f in files if f.parent.resolve() == out_dir.resolve()}
    partner = pair_files(files) if pair and getattr(analyzer, "reads_pairs", False) else [-1] * len(files)

    def analyse(i: int) -> tuple[BatchRow, object]:
        f = files[i]
        row = BatchRow(path=f, status="ok", total=len(files), model_version=analyzer.version)
        analysis = None
        try:
            m = read_image(f)
            analysis = analyzer.analyze(m)
            row.predicted = analysis.predicted
            row.probabilities = tuple(float(v) for v in analysis.probabilities)
            row.single_probabilities = row.probabilities
            row.lesion_area_frac = analysis.lesion_area_frac
            if out_dir:
                name = _unique_name(f, used_names)
                cv2.imwrite(str(out_dir / name), analysis.lesion_mask.astype(np.uint8) * 255)
        except ImageReadError as exc:
            row.status, row.error = "error", str(exc)
        except Exception as exc:  # one bad file must never stop a batch
            log.exception("analysis failed for %s", f)
            row.status, row.error = "error", f"{f.name}: analysis failed ({type(exc).__name__}: {exc})"
            analysis = None
        return row, analysis

    ok = failed = paired = 0
    held: dict[int, BatchRow] = {}  # rows of partners analysed early, yielded in file order
    for i in range(len(files)):
        if i in held:
            row = held.pop(i)
        elif partner[i] > i:  # analyse both films now; the partner's row waits for its turn
            (row, a), (later, b) = analyse(i), analyse(partner[i])
            if a is not None and b is not None:
                _read_pair(analyzer, row, a, later, b)
            held[partner[i]] = later
        else:
            row, _ = analyse(i)
        ok += row.status == "ok"
        failed += row.status != "ok"
        paired += row.other_breast is not None
        row.index = i + 1
        row.elapsed_s = time.perf_counter() - start
        yield row
    return BatchSummary(len(files), ok, failed, skipped, False, time.perf_counter() - start, paired)


def _read_pair(analyzer, row_a: BatchRow, a, row_b: BatchRow, b) -> None:
    """Give both rows the pair's reading; on any failure both keep their single-film reading."""
    try:
        pa, pb = analyzer.compare(a, b), analyzer.compare(b, a)
    except Exception:  # the pair's reading is extra: never worth a lost row
        log.exception("reading %s beside %s failed", row_a.path, row_b.path)
        return
    for row, probs, other in ((row_a, pa, row_b.path), (row_b, pb, row_a.path)):
        row.probabilities = tuple(float(v) for v in probs)
        row.predicted = analyzer.call_pair(probs)
        row.other_breast = other


def _unique_name(path: Path, used: set[str]) -> str:
    base = f"{path.stem}_mask"
    name, n = f"{base}.png", 1
    while name in used:
        n += 1
        name = f"{base}_{n}.png"
    used.add(name)
    return name


def write_csv(rows: Iterable[BatchRow], path: str | Path) -> Path:
    """Write rows with exactly :data:`CSV_COLUMNS`; written to a temporary file, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r.as_csv())
    os.replace(tmp, path)
    return path


PAIR_COLUMNS = ("path", "other_breast", "p_normal_alone", "p_benign_alone", "p_cancer_alone")


def write_pairs_csv(rows: Iterable[BatchRow], path: str | Path) -> Path:
    """For each classified film: the other breast it was read beside (empty if none) and its
    single-film probabilities; written to a temporary file, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    fmt = lambda v: f"{v:.6f}"  # noqa: E731
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(PAIR_COLUMNS)
        for r in rows:
            if r.status != "ok":
                continue
            alone = list(r.single_probabilities) + [None] * (3 - len(r.single_probabilities))
            w.writerow([str(r.path), str(r.other_breast or ""),
                        *("" if v is None else fmt(v) for v in alone[:3])])
    os.replace(tmp, path)
    return path
