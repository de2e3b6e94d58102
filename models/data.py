"""Training datasets: records for MIAS, Mini-DDSM and plain class folders, ground-truth lesion
masks, patient-grouped splits and class balancing.

A :class:`Record` describes one image (one view of one breast) and its truth; pixels are read
later, through :func:`core.io.read_image`, so that training sees exactly what the app sees.
Everything here is numpy, OpenCV and the standard library: no TensorFlow, so it loads and tests
quickly. scikit-learn and openpyxl are imported only by the functions that need them.

Labels are per image. A film or view is ``Normal`` unless it carries an abnormality of its own;
the other breast of a patient with a lesion is therefore ``Normal`` (as in MIAS's truth file).
Splits group images by patient, so both breasts and all views of a woman fall on one side.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from core.io import IMAGE_EXTENSIONS, ImageReadError, laterality_view_from_name, read_image

log = logging.getLogger(__name__)

CLASSES = ("Normal", "Benign", "Cancer")  # in order of severity; also the model's output order

MIAS_INFO = "Info.txt"
MINI_DDSM_XLSX = "DataWMask.xlsx"

# A JPEG lesion mask is 0/255 plus compression noise around edges.
MASK_THRESHOLD = 128  # grey level (8-bit) at or above which a mask pixel is lesion
# A mask whose filled contours cover this many times its drawn pixels is an outline, not a
# region: a 1-2 px ring around even a small (5 px radius) lesion gives about 3x.
OUTLINE_FILL_RATIO = 1.5


class DatasetError(ValueError):
    """A dataset folder or truth file that cannot be used; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class Lesion:
    """One annotated abnormality.

    Either a circle (``x``, ``y``, ``radius`` in full-resolution pixels, origin at the image's
    top-left corner, ``x`` = column, ``y`` = row) or a ``mask_path`` to a mask image the size
    of the mammogram. MIAS abnormalities spread over the whole breast have neither.
    """

    x: float | None = None
    y: float | None = None
    radius: float | None = None
    severity: str = ""  # "Benign" or "Cancer"
    kind: str = ""  # MIAS class (CALC, CIRC, SPIC, MISC, ARCH, ASYM); "" when unknown
    mask_path: Path | None = None

    @property
    def has_centre(self) -> bool:
        return self.x is not None and self.y is not None and self.radius is not None


@dataclass(frozen=True, kw_only=True)
class Record:
    """One image and its truth.

    ``label`` is one of :data:`CLASSES`; ``laterality`` "L"/"R"/None; ``view`` "CC"/"MLO"/None;
    ``source`` "mias", "mini-ddsm" or "folder". ``extra`` holds source-specific details (MIAS
    background tissue, Mini-DDSM case status, age, density) and takes no part in equality.
    """

    path: Path
    patient_id: str
    label: str
    laterality: str | None = None
    view: str | None = None
    lesions: tuple[Lesion, ...] = ()
    mask_paths: tuple[Path, ...] = ()
    source: str = "folder"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.label not in CLASSES:
            raise ValueError(f"{self.path}: label {self.label!r} is not one of {CLASSES}")

    @property
    def label_index(self) -> int:
        return CLASSES.index(self.label)


# --------------------------------------------------------------------------------------------
# MIAS


_MIAS_LINE = re.compile(r"^(mdb\d+)\s+(\S+)\s+(\S+)(.*)$", re.IGNORECASE)
_MIAS_KINDS = {"CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM"}
_MIAS_SEVERITY = {"B": "Benign", "M": "Cancer"}


def _find_child(root: Path, name: str) -> Path | None:
    """``root/name`` matched case-insensitively (truth files arrive as Info.txt, INFO.TXT...)."""
    exact = root / name
    if exact.exists():
        return exact
    if not root.is_dir():
        return None
    for child in root.iterdir():
        if child.name.lower() == name.lower():
            return child
    return None


def _mias_image(root: Path, ref: str) -> Path | None:
    for suffix in (".png", ".pgm", ".PNG", ".PGM"):
        path = root / f"{ref}{suffix}"
        if path.is_file():
            return path
    return None


def _parse_mias_line(line: str, lineno: int) -> tuple[str, str, str, str | None, tuple] | None:
    """``(ref, background, kind, severity, centre)`` of one truth line, or None (with a warning)
    when the line cannot be read. ``centre`` is ``(x, y, r)`` in MIAS coordinates or ``()``."""
    match = _MIAS_LINE.match(line.strip())
    if match is None:
        log.warning("%s line %d: not a MIAS truth line, skipped: %r", MIAS_INFO, lineno, line)
        return None
    ref, background, kind = match.group(1).lower(), match.group(2).upper(), match.group(3).upper()
    rest = match.group(4).split()
    if kind not in _MIAS_KINDS:
        log.warning("%s line %d: unknown abnormality class %r, skipped", MIAS_INFO, lineno, kind)
        return None
    if kind == "NORM":
        return ref, background, kind, None, ()
    if not rest or rest[0].upper() not in _MIAS_SEVERITY:
        log.warning(
            "%s line %d: %s without severity B/M, skipped: %r", MIAS_INFO, lineno, ref, line
        )
        return None
    severity = _MIAS_SEVERITY[rest[0].upper()]
    numbers = rest[1:]
    if not numbers:
        return ref, background, kind, severity, ()
    if len(numbers) == 3 and all(n.isdigit() for n in numbers):
        x, y, r = (float(n) for n in numbers)
        return ref, background, kind, severity, (x, y, r)
    if "NOTE" in " ".join(numbers).upper():
        # The truth file's note 4: calcifications spread over the breast have no centre.
        return ref, background, kind, severity, ()
    log.warning(
        "%s line %d: %s has an unreadable centre %r; kept as an abnormal film without a centre",
        MIAS_INFO,
        lineno,
        ref,
        " ".join(numbers),
    )
    return ref, background, kind, severity, ()


def load_mias(root: str | Path) -> list[Record]:
    """Records of the mini-MIAS films under ``root``, from its ``Info.txt``.

    Parameters
    ----------
    root
        Folder holding ``Info.txt`` and ``mdbNNN.png`` (or ``.pgm``).

    Returns
    -------
    list[Record]
        One record per film whose image exists, in reference order. Lesion centres are
        converted from MIAS's bottom-left origin to top-left (``row = height - y``, using the
        film's own height). Label: ``Cancer`` if any line of the film is malignant, else
        ``Benign`` if any is benign, else ``Normal``. Patient id = ``(number + 1) // 2``
        (odd films are right breasts, even films the left breast of the same woman).

    Raises
    ------
    DatasetError
        When ``Info.txt`` is missing.
    """
    root = Path(root)
    info = _find_child(root, MIAS_INFO)
    if info is None or not info.is_file():
        raise DatasetError(f"not a MIAS folder: no {MIAS_INFO} in {root}")

    films: dict[str, list[tuple[str, str, str | None, tuple]]] = {}
    with info.open(encoding="latin-1") as lines:
        for lineno, line in enumerate(lines, start=1):
            # The truth lines are the ones that start with a film reference; the rest is prose.
            if not line.strip().lower().startswith("mdb"):
                continue
            parsed = _parse_mias_line(line, lineno)
            if parsed is not None:
                ref, *entry = parsed
                films.setdefault(ref, []).append(tuple(entry))

    records = []
    missing = []
    for ref in sorted(films):
        path = _mias_image(root, ref)
        if path is None:
            missing.append(ref)
            continue
        entries = films[ref]
        severities = {sev for _, _, sev, _ in entries if sev is not None}
        label = "Cancer" if "Cancer" in severities else "Benign" if severities else "Normal"
        lesions = []
        centred = [(kind, sev, c) for _, kind, sev, c in entries if sev is not None and c]
        if centred:
            try:
                height = read_image(path).pixels.shape[0]
            except (ImageReadError, OSError) as exc:  # one bad film is left out, not fatal
                log.warning("MIAS film %s unreadable, skipped: %s", path, exc)
                continue
            for kind, sev, (x, y, r) in centred:
                lesions.append(Lesion(x=x, y=height - y, radius=r, severity=sev, kind=kind))
        number = int(ref[3:])
        records.append(
            Record(
                path=path,
                patient_id=f"mias-{(number + 1) // 2:03d}",
                label=label,
                laterality="R" if number % 2 else "L",
                view="MLO",
                lesions=tuple(lesions),
                source="mias",
                extra={
                    "background": entries[0][0],
                    "kinds": tuple(kind for _, kind, _, _ in entries if kind != "NORM"),
                    "without_centre": sum(1 for _, _, sev, c in entries if sev and not c),
                },
            )
        )
    if missing:
        log.info("MIAS: %d films listed in %s have no image: %s", len(missing), info, missing)
    return records


# --------------------------------------------------------------------------------------------
# Ground-truth masks


def fill_outline(mask: np.ndarray) -> np.ndarray:
    """Fill a lesion mask drawn as a closed outline; leave a region mask as it is.

    Parameters
    ----------
    mask
        (H, W) bool.

    Returns
    -------
    np.ndarray
        (H, W) bool. If filling the outer contours covers more than
        :data:`OUTLINE_FILL_RATIO` times the drawn pixels, the filled contours (outline
        included); otherwise ``mask`` unchanged.
    """
    drawn = mask.astype(np.uint8)
    n_drawn = int(drawn.sum())
    if n_drawn == 0:
        return mask.astype(bool)
    # Thresholding a JPEG outline can break it. Dilating first bridges gaps of a pixel or two,
    # so the outer contour is the lesion's; eroding the filled region by the same amount takes
    # the dilation back off.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    contours, _ = cv2.findContours(
        cv2.dilate(drawn, kernel), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    filled = np.zeros_like(drawn)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    filled = cv2.erode(filled, kernel)
    if filled.sum() > OUTLINE_FILL_RATIO * n_drawn:
        return filled.astype(bool) | mask.astype(bool)
    return mask.astype(bool)


def read_mask(path: str | Path) -> np.ndarray:
    """A lesion mask image as (H, W) bool: thresholded at :data:`MASK_THRESHOLD` (of 255, scaled
    for other bit depths) and, if it is drawn as an outline, filled."""
    raw = np.asarray(read_image(path).raw)
    if raw.ndim == 3:  # a colour mask: any channel marks the lesion
        raw = raw.max(axis=2)
    if np.issubdtype(raw.dtype, np.integer):
        full_scale = float(np.iinfo(raw.dtype).max) if raw.max() > 255 else 255.0
        binary = raw.astype(np.float32) >= MASK_THRESHOLD / 255.0 * full_scale
    else:
        binary = raw >= MASK_THRESHOLD / 255.0
    return fill_outline(binary)


def lesion_mask(record: Record, shape: tuple[int, int]) -> np.ndarray:
    """The full-resolution ground-truth lesion mask of ``record``.

    Parameters
    ----------
    record
        Its circle lesions are filled (clipped at the borders) and its mask files united.
    shape
        (H, W) of the record's image, in pixels.

    Returns
    -------
    np.ndarray
        (H, W) bool, True on lesion pixels; all False for normal images and for abnormalities
        without a location.

    Raises
    ------
    ValueError
        When a mask file's size differs from ``shape``.
    """
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height, width), dtype=bool)
    mask_paths = list(record.mask_paths)
    for lesion in record.lesions:
        if lesion.mask_path is not None and lesion.mask_path not in mask_paths:
            mask_paths.append(lesion.mask_path)
        if not lesion.has_centre:
            continue
        cx, cy, r = float(lesion.x), float(lesion.y), float(lesion.radius)
        r0, r1 = max(0, int(np.floor(cy - r))), min(height, int(np.ceil(cy + r)) + 1)
        c0, c1 = max(0, int(np.floor(cx - r))), min(width, int(np.ceil(cx + r)) + 1)
        if r0 >= r1 or c0 >= c1:
            continue  # entirely outside the image
        rows, cols = np.ogrid[r0:r1, c0:c1]
        out[r0:r1, c0:c1] |= (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
    for path in mask_paths:
        mask = read_mask(path)
        if mask.shape != (height, width):
            raise ValueError(
                f"lesion mask {path} is {mask.shape[1]}x{mask.shape[0]} px but its image is "
                f"{width}x{height} px"
            )
        out |= mask
    return out


# --------------------------------------------------------------------------------------------
# Mini-DDSM


# C_0029_1.LEFT_CC.jpg, C_0029_1.LEFT_CC_Mask.jpg, C_0236_1.RIGHT_MLO_MASK2.jpg; the letter is
# DDSM's scanner/volume prefix, and case numbers repeat across prefixes.
_DDSM_NAME = re.compile(
    r"^(?P<prefix>[A-Z])_(?P<case>\d+)_(?P<seq>\d+)\.(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)"
    r"(?:_MASK(?P<mask>\d*))?\.(?:jpe?g|png)$",
    re.IGNORECASE,
)
_STATUSES = {name.lower(): name for name in CLASSES}


def _status_dirs(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        return []
    return sorted(
        (_STATUSES[d.name.lower()], d)
        for d in root.iterdir()
        if d.is_dir() and d.name.lower() in _STATUSES
    )


def _view_label(status: str, has_lesion: bool, label_by: str) -> str:
    if label_by == "case":
        return status
    if label_by != "view":
        raise ValueError(f"label_by must be 'view' or 'case', not {label_by!r}")
    return status if has_lesion else "Normal"


def _ddsm_record(
    path: Path,
    status: str,
    masks: Sequence[Path],
    has_overlay: bool,
    label_by: str,
    extra: dict | None = None,
) -> Record:
    m = _DDSM_NAME.match(path.name)
    assert m is not None, path
    if status == "Normal" and masks:
        log.warning("Mini-DDSM: %s is in a Normal case but has lesion masks", path)
    lesions = tuple(Lesion(severity=status, mask_path=p) for p in masks if status != "Normal")
    return Record(
        path=path,
        patient_id=f"{m['prefix'].upper()}_{m['case']}",
        label=_view_label(status, bool(masks) or has_overlay, label_by),
        laterality=m["side"].upper()[0],
        view=m["view"].upper(),
        lesions=lesions,
        mask_paths=tuple(masks),
        source="mini-ddsm",
        extra={"case_status": status, "case": path.parent.name, **(extra or {})},
    )


def _mask_order(path: Path) -> int:
    number = _DDSM_NAME.match(path.name)["mask"]
    return int(number) if number else 1


def _image_key(name: str) -> str:
    """``C_0029_1.LEFT_CC`` for an image, its masks and its ``.OVERLAY``, lower-cased."""
    m = _DDSM_NAME.match(name)
    if m is not None:
        return f"{m['prefix']}_{m['case']}_{m['seq']}.{m['side']}_{m['view']}".lower()
    return name.rsplit(".", 1)[0].lower()


def load_mini_ddsm(root: str | Path, label_by: str = "view") -> list[Record]:
    """Records of a Mini-DDSM folder (the Kaggle "Complete Mini-DDSM" layout).

    ``root/<Status>/<case>/C_<case>_1.<SIDE>_<VIEW>.jpg`` with Status in Benign/Cancer/Normal,
    lesion masks ``..._Mask.jpg`` and ``..._MASK2.jpg`` beside the image. ``.OVERLAY``, ``.ics``
    and mask files are not images.

    Parameters
    ----------
    root
        The folder holding ``Benign/``, ``Cancer/`` and ``Normal/``.
    label_by
        ``"view"`` (default): a view of a Benign or Cancer case is labelled with the case's
        status only if it has a lesion (a mask or a DDSM ``.OVERLAY``); the lesion-free views
        (usually the other breast) are ``Normal``. ``"case"``: every view takes its case's status.

    Returns
    -------
    list[Record]
        Sorted by path. Patient id = volume prefix + case number (``"C_0029"``): DDSM case
        numbers repeat across volumes (``Normal/0236/A_0236...`` is not ``Benign/0236/C_0236...``).
        ``extra["case_status"]`` is the folder's status.
    """
    root = Path(root)
    records = []
    for status, status_dir in _status_dirs(root):
        for case_dir in sorted(d for d in status_dir.iterdir() if d.is_dir()):
            images: dict[str, Path] = {}
            masks: dict[str, list[Path]] = {}
            overlays = set()
            for f in case_dir.iterdir():
                m = _DDSM_NAME.match(f.name)
                if f.suffix.lower() == ".overlay":
                    overlays.add(_image_key(f.name))
                elif m is None:
                    continue
                elif m["mask"] is not None:
                    masks.setdefault(_image_key(f.name), []).append(f)
                else:
                    images[_image_key(f.name)] = f
            for key in sorted(set(masks) - set(images)):
                log.warning("Mini-DDSM: masks without their image in %s: %s", case_dir, masks[key])
            for key, path in sorted(images.items()):
                records.append(
                    _ddsm_record(
                        path,
                        status,
                        sorted(masks.get(key, []), key=_mask_order),
                        key in overlays,
                        label_by,
                    )
                )
    records.sort(key=lambda r: r.path)
    return records


def _xlsx_number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def load_mini_ddsm_xlsx(
    root: str | Path, xlsx: str | Path | None = None, label_by: str = "view"
) -> list[Record]:
    """Records of a Mini-DDSM folder from its metadata sheet ``DataWMask.xlsx``.

    Only the rows whose image exists under ``root`` are returned (the sheet lists the whole
    dataset). Same records as :func:`load_mini_ddsm`, plus ``extra["age"]`` (years) and
    ``extra["density"]`` (BI-RADS 1-4, 0 when missing in DDSM) as floats or None.

    Parameters
    ----------
    root
        The Mini-DDSM folder; the sheet's ``fullPath`` is relative to it.
    xlsx
        The sheet; default ``root/DataWMask.xlsx``.
    label_by
        As in :func:`load_mini_ddsm`.
    """
    from openpyxl import load_workbook  # training-only dependency

    root = Path(root)
    sheet_path = Path(xlsx) if xlsx is not None else _find_child(root, MINI_DDSM_XLSX)
    if sheet_path is None or not sheet_path.is_file():
        raise DatasetError(f"no {MINI_DDSM_XLSX} in {root}")

    # One walk of the folder instead of a stat per sheet row; keys are lower-cased relative
    # paths so the sheet's Windows-style paths match whatever case the folders have on disk.
    present = {p.relative_to(root).as_posix().lower(): p for p in root.rglob("*") if p.is_file()}

    def on_disk(cell) -> Path | None:
        if cell is None or str(cell).strip() in ("", "-"):
            return None
        return present.get(str(cell).strip().replace("\\", "/").lower())

    workbook = load_workbook(sheet_path, read_only=True, data_only=True)
    try:
        rows = workbook.worksheets[0].iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
        needed = ("fullPath", "fileName", "View", "Side", "Status", "Tumour_Contour")
        absent = [name for name in needed if name not in header]
        if absent:
            raise DatasetError(f"{sheet_path}: columns {absent} missing (found {header})")
        col = {name: header.index(name) for name in header if name}

        def cell(row, name):
            i = col.get(name)
            return row[i] if i is not None and i < len(row) else None

        records = []
        for row in rows:
            path = on_disk(cell(row, "fullPath"))
            if path is None:
                continue
            status = _STATUSES.get(str(cell(row, "Status")).strip().lower())
            if status is None or _DDSM_NAME.match(path.name) is None:
                log.warning("%s: row for %s not understood, skipped: %s", sheet_path, path, row)
                continue
            masks = []
            for name in ("Tumour_Contour", "Tumour_Contour2"):
                listed = cell(row, name)
                mask = on_disk(listed)
                if mask is not None:
                    masks.append(mask)
                elif listed not in (None, "", "-"):
                    log.warning("%s: mask %s listed but not found", sheet_path, listed)
            overlay = path.parent / f"{path.name.rsplit('.', 1)[0]}.OVERLAY"
            has_overlay = overlay.relative_to(root).as_posix().lower() in present
            records.append(
                _ddsm_record(
                    path,
                    status,
                    masks,
                    has_overlay,
                    label_by,
                    extra={
                        "age": _xlsx_number(cell(row, "Age")),
                        "density": _xlsx_number(cell(row, "Density")),
                    },
                )
            )
    finally:
        workbook.close()
    records.sort(key=lambda r: r.path)
    return records


# --------------------------------------------------------------------------------------------
# Class folders


def _read_patients_csv(root: Path, csv_path: Path) -> dict[Path, str]:
    patients = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "path" not in fields or "patient_id" not in fields:
            raise DatasetError(f"{csv_path}: needs the columns path,patient_id")
        for row in reader:
            rel, pid = (
                (row[fields["path"]] or "").strip(),
                (row[fields["patient_id"]] or "").strip(),
            )
            if rel and pid:
                p = Path(rel.replace("\\", "/"))
                patients[(p if p.is_absolute() else root / p).resolve()] = pid
    return patients


def load_folder(root: str | Path) -> list[Record]:
    """Records of a folder with ``Normal/``, ``Benign/`` and ``Cancer/`` subfolders.

    Folder names are matched case-insensitively and need not all be present; images are found
    recursively by extension (:data:`core.io.IMAGE_EXTENSIONS`). The patient id is the file
    stem, unless ``root/patients.csv`` (columns ``path,patient_id``, paths relative to ``root``)
    names it. Laterality and view are guessed from the file name.
    """
    root = Path(root)
    dirs = _status_dirs(root)
    if not dirs:
        raise DatasetError(f"no Normal/, Benign/ or Cancer/ subfolder in {root}")
    csv_path = _find_child(root, "patients.csv")
    patients = _read_patients_csv(root, csv_path) if csv_path is not None else {}

    records = []
    unlisted = 0
    for label, d in dirs:
        files = sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        for path in files:
            pid = patients.get(path.resolve())
            if pid is None:
                unlisted += patients != {}
                pid = path.stem
            laterality, view = laterality_view_from_name(path.name)
            records.append(
                Record(
                    path=path,
                    patient_id=pid,
                    label=label,
                    laterality=laterality,
                    view=view,
                    source="folder",
                )
            )
    if unlisted:
        log.warning(
            "%s: %d images not listed; their file name is their patient id", csv_path, unlisted
        )
    return records


# --------------------------------------------------------------------------------------------
# Any of the above


def _looks_like_mini_ddsm(root: Path) -> bool:
    for _, status_dir in _status_dirs(root):
        for case_dir in status_dir.iterdir():
            if case_dir.is_dir() and any(_DDSM_NAME.match(f.name) for f in case_dir.iterdir()):
                return True
    return False


def load_dataset(path: str | Path) -> list[Record]:
    """Records of a dataset folder, whichever of the known layouts it has.

    ``Info.txt`` -> MIAS (:func:`load_mias`); ``<Status>/<case>/C_<case>_1.<SIDE>_<VIEW>.jpg``
    -> Mini-DDSM (:func:`load_mini_ddsm`); ``Normal/``, ``Benign/``, ``Cancer/`` subfolders
    -> :func:`load_folder`.

    Raises
    ------
    DatasetError
        When ``path`` is not a folder or has none of these layouts.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    if _find_child(root, MIAS_INFO) is not None:
        return load_mias(root)
    if _looks_like_mini_ddsm(root):
        return load_mini_ddsm(root)
    if _status_dirs(root):
        return load_folder(root)
    raise DatasetError(
        f"{root} is not a dataset MammoLab knows: expected a MIAS folder (Info.txt), a "
        "Mini-DDSM folder (Benign/Cancer/Normal with case folders), or Normal/, Benign/ and "
        "Cancer/ subfolders of images"
    )


# --------------------------------------------------------------------------------------------
# Splits and balancing


def patient_labels(records: Sequence[Record]) -> np.ndarray:
    """(N,) int: for each record, the most severe class index among its patient's images."""
    worst: dict[str, int] = {}
    for r in records:
        worst[r.patient_id] = max(worst.get(r.patient_id, 0), r.label_index)
    return np.array([worst[r.patient_id] for r in records], dtype=np.int64)


def patient_kfold(
    records: Sequence[Record], k: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` folds grouped by patient and stratified by the patient's most severe label.

    Returns
    -------
    list[tuple[np.ndarray, np.ndarray]]
        ``(train_idx, test_idx)`` int arrays of record indices, sorted. Every record is in
        exactly one test fold; no patient is on both sides of a fold. The same ``records``
        order and ``seed`` give the same folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_patients = len({r.patient_id for r in records})
    if k < 2:
        raise ValueError(f"k must be at least 2, not {k}")
    if n_patients < k:
        raise DatasetError(f"{n_patients} patients cannot make {k} folds")
    groups = np.array([r.patient_id for r in records])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [
        (np.sort(train), np.sort(test))
        for train, test in splitter.split(np.zeros(len(records)), patient_labels(records), groups)
    ]


def patient_split(
    records: Sequence[Record], test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One train/test split grouped by patient and stratified by label.

    The test side is one fold of ``round(1 / test_fraction)`` patient folds, so its size is
    close to, not exactly, ``test_fraction`` (0.2 -> 1/5, 0.3 -> 1/3).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(train_idx, test_idx)`` sorted int arrays of record indices.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    return patient_kfold(records, k=max(2, round(1.0 / test_fraction)), seed=seed)[0]


def _label_indices(labels: Sequence[str | int] | np.ndarray) -> np.ndarray:
    return np.array(
        [CLASSES.index(v) if isinstance(v, str) else int(v) for v in labels], dtype=np.int64
    )


def class_weights(labels: Sequence[str | int] | np.ndarray) -> dict[int, float]:
    """Balanced class weights ``n / (n_classes_present * n_c)``, keyed by class index.

    ``labels`` are class names or indices; classes that do not occur get no entry.
    """
    y = _label_indices(labels)
    counts = Counter(y.tolist())
    return {c: len(y) / (len(counts) * n) for c, n in sorted(counts.items())}


def balanced_sample_indices(
    labels: Sequence[str | int] | np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` indices drawn with replacement so that every present class is equally likely.

    Returns
    -------
    np.ndarray
        (n,) int64 indices into ``labels``.
    """
    y = _label_indices(labels)
    if len(y) == 0:
        raise ValueError("no labels to sample from")
    counts = np.bincount(y)
    p = 1.0 / (np.count_nonzero(counts) * counts[y])
    return rng.choice(len(y), size=n, replace=True, p=p / p.sum()).astype(np.int64)
