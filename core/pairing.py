"""The other breast: which film pairs with which, and the bilateral reading of a pair.

A radiologist reads a mammogram beside the other breast's: a density or a distortion present on
one side only is suspicious, the same pattern on both sides usually is not. The bundled model
does the same when it can (model.json ``pipeline.bilateral``): the classifier's reading of a film
and of the matching view of the other breast go into a small multinomial logistic model fitted on
out-of-fold readings (``models.bilateral``). A film read alone goes through the same form of model
on its own reading only (``pipeline.single_film``), when the bundle has one.

Pairing needs to know patient, side and view:

- DICOM: PatientID (with side and view words removed, as CBIS-DDSM writes
  ``Mass-Test_P_00173_LEFT_CC``), the laterality and view tags (:mod:`core.io`'s rules);
- MIAS names ``mdbNNN``: films 2k-1 and 2k are the two MLO views of one woman;
- other names that spell a side (``C_0029_1.LEFT_CC.jpg``, ``P7_R_MLO.png``): the rest of the
  name, in the same folder, is the patient.

A film pairs only when its group (patient and view) holds exactly one film of each side; anything
ambiguous stays a single-film reading.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.decision import check_class_prior
from core.io import dicom_identity, has_dicom_preamble, laterality_view_from_name, looks_like_image

log = logging.getLogger(__name__)

_MIAS = re.compile(r"^mdb(\d{3})$", re.IGNORECASE)
_WORD = re.compile(r"[^A-Z0-9]+")
MAX_FOLDER_FILES = 2000  # a folder larger than this is not searched for the other breast
_CACHE_LIMIT = 50_000
_identities: dict[tuple[str, int, int], FilmId | None] = {}


@dataclass(frozen=True)
class FilmId:
    """Who and what a film shows, as far as pairing needs it."""

    patient: str
    side: str  # "L" or "R"; for MIAS numbering, "odd" or "even"
    view: str | None


def _strip_side_view(text: str) -> str:
    """An identifier without its side and view words, by :func:`core.io.laterality_view_from_name`'s
    rules (``Mass-Test_P_00173_LEFT_CC`` -> ``MASS-TEST-P-00173``)."""
    words = [w for w in _WORD.split(text.upper()) if w]
    return "-".join(w for w in words if laterality_view_from_name(w) == (None, None))


def _is_dicom(path: Path) -> bool:
    """By content, as :func:`core.io.read_image` decides (``.dcm`` files without a preamble too)."""
    return path.suffix.lower() in (".dcm", ".dicom") or has_dicom_preamble(path)


def _dicom_film_id(ident: dict[str, Any]) -> FilmId | None:
    patient = _strip_side_view(ident.get("patient_id") or "")
    if not patient or ident.get("laterality") not in ("L", "R"):
        return None
    # The study date keeps a prior exam from pairing with the current one.
    return FilmId(f"dicom:{patient}:{ident.get('study_date') or ''}", ident["laterality"], ident.get("view"))


def film_id(path: str | Path, meta: dict[str, Any] | None = None) -> FilmId | None:
    """The pairing identity of a film, or None when it cannot be told.

    Parameters
    ----------
    path : path
        The file; its name (and for DICOM, its header) is what is looked at.
    meta : dict, optional
        :attr:`core.io.Mammogram.meta` when the image is already read (saves reading the header).
    """
    path = Path(path)
    if meta is not None:
        if meta.get("format") == "DICOM":
            tags = {t.get("keyword"): t.get("value") for t in meta.get("dicom_tags", [])}
            return _dicom_film_id({"patient_id": str(tags.get("PatientID") or ""),
                                   "study_date": str(tags.get("StudyDate") or ""),
                                   "laterality": meta.get("laterality"), "view": meta.get("view")})
        return _name_film_id(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:  # not a readable file: only its name can say anything
        return None if path.suffix.lower() in (".dcm", ".dicom") else _name_film_id(path)
    if key in _identities:
        return _identities[key]
    if _is_dicom(path):
        ident = dicom_identity(path)
        fid = _dicom_film_id(ident) if ident is not None else None
    else:
        fid = _name_film_id(path)
    if len(_identities) >= _CACHE_LIMIT:
        _identities.clear()
    _identities[key] = fid
    return fid


def _name_film_id(path: Path) -> FilmId | None:
    folder = path.parent.resolve()
    m = _MIAS.match(path.stem)
    if m:
        n = int(m.group(1))
        return FilmId(f"{folder}/mias-{(n + 1) // 2:03d}", "odd" if n % 2 else "even", "MLO")
    side, view = laterality_view_from_name(path.stem)
    if side is None or view is None:  # without the view, CC could pair with MLO
        return None
    # A name that is all side and view (``LCC.png``) leaves the folder as the patient.
    patient = _strip_side_view(path.stem) or "(folder)"
    return FilmId(f"{folder}/{patient}", side, view)


def pair_up(ids: Sequence[FilmId | None]) -> list[int]:
    """For each film, the index of its other-breast film, or -1.

    Films pair when their patient and view match, their sides differ, and their group holds
    exactly those two films.
    """
    groups: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for i, fid in enumerate(ids):
        if fid is not None:
            groups[(fid.patient, fid.view)].append(i)
    out = [-1] * len(ids)
    for members in groups.values():
        if len(members) == 2:
            a, b = members
            if ids[a].side != ids[b].side:
                out[a], out[b] = b, a
    return out


def pair_files(paths: Sequence[str | Path]) -> list[int]:
    """:func:`pair_up` on files, reading no pixels (DICOM headers only)."""
    ids = []
    for p in paths:
        try:
            ids.append(film_id(p))
        except Exception as exc:  # a file that cannot be identified is read alone
            log.debug("no pairing identity for %s (%s)", p, exc)
            ids.append(None)
    return pair_up(ids)


@dataclass(frozen=True)
class Search:
    """Where the other breast's film is (``path``), or why there is none (``reason``)."""

    path: Path | None
    reason: str = ""


def search_other_breast(path: str | Path, meta: dict[str, Any] | None = None) -> Search:
    """The other breast's film of ``path`` in the same folder (not below it), or why not.

    Folders of more than :data:`MAX_FOLDER_FILES` entries are not searched.
    """
    path = Path(path)
    own = film_id(path, meta)
    if own is None:
        return Search(None, "its patient, side and view cannot be told (DICOM tags, MIAS "
                            "numbering, or a name such as P7_L_CC)")
    try:
        entries = sorted(path.parent.iterdir())
    except OSError as exc:
        return Search(None, f"its folder cannot be listed ({exc.strerror or exc})")
    if len(entries) > MAX_FOLDER_FILES:
        return Search(None, f"its folder holds over {MAX_FOLDER_FILES} files and is not searched")
    others = [f for f in entries
              if f.name != path.name and not f.name.startswith(".") and f.is_file()
              and looks_like_image(f)]
    ids: list[FilmId | None] = [own, *(film_id(f) for f in others)]
    partner = pair_up(ids)[0]
    if partner > 0:
        return Search(others[partner - 1])
    same = [i for i in ids[1:] if i is not None and (i.patient, i.view) == (own.patient, own.view)]
    if any(i.side != own.side for i in same):
        return Search(None, "several films of this woman and view are in the folder, so which is "
                            "the other breast is ambiguous")
    return Search(None, "no film of the other breast (same patient and view) is in its folder")


def find_other_breast(path: str | Path, meta: dict[str, Any] | None = None) -> Path | None:
    """The other breast's film of ``path`` in the same folder, or None (:func:`search_other_breast`)."""
    return search_other_breast(path, meta).path


# -- the bilateral reading ---------------------------------------------------------------------


def single_features(probs: np.ndarray) -> np.ndarray:
    """(N, 2): log-odds of Benign and Cancer against Normal of raw classifier probabilities
    (N, 3) or (3,), classes in the bundle's order (Normal, Benign, Cancer), clipped at 1e-6."""
    lp = np.log(np.clip(np.atleast_2d(np.asarray(probs, np.float64)), 1e-6, 1.0))
    return lp[:, 1:] - lp[:, :1]


def bilateral_features(probs: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(N, 4): :func:`single_features` of the film, then of the other breast's film."""
    return np.concatenate([single_features(probs), single_features(other)], axis=1)


BILATERAL_CLASSES = ("Normal", "Benign", "Cancer")  # the order the features assume


def _check_stage(params: Any, classes: Sequence[str], where: str, n_features: int) -> dict[str, np.ndarray]:
    """A logistic stage's model.json entry as arrays: ``coef`` (3, n_features), ``intercept``
    and, when given, ``class_prior``; ValueError names ``where`` and what is wrong."""
    if tuple(classes) != BILATERAL_CLASSES:
        raise ValueError(f"{where} needs the classes {list(BILATERAL_CLASSES)} in this "
                         f"order (the bundle has {list(classes)})")
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be an object")
    try:
        coef = np.asarray(params["coef"], np.float64)
        intercept = np.asarray(params["intercept"], np.float64)
    except KeyError as exc:
        raise ValueError(f"{where} lacks {exc}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{where} coef and intercept must be numbers") from None
    if coef.shape != (3, n_features) or intercept.shape != (3,):
        raise ValueError(f"{where} needs a (3, {n_features}) coef and 3 intercepts "
                         f"(got {coef.shape} and {intercept.shape})")
    if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
        raise ValueError(f"{where} holds non-finite numbers")
    out = {"coef": coef, "intercept": intercept}
    if params.get("class_prior") is not None:
        try:
            out["class_prior"] = check_class_prior(params["class_prior"], len(BILATERAL_CLASSES))
        except ValueError as exc:
            raise ValueError(f"{where} {exc}") from None
    return out


def check_bilateral(params: Any, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """model.json's ``pipeline.bilateral`` as arrays; ValueError says what is wrong.

    Returns ``coef`` and ``intercept``, and ``class_prior`` when the entry has one (the prior of
    the pair's balanced call, :mod:`core.decision`).
    """
    return _check_stage(params, classes, "pipeline.bilateral", 4)


def check_single_film(params: Any, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """model.json's ``pipeline.single_film`` (the film read alone) as :func:`check_bilateral`."""
    return _check_stage(params, classes, "pipeline.single_film", 2)


def _softmax_linear(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    z = x @ np.asarray(coef).T + np.asarray(intercept)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def bilateral_probs(probs: np.ndarray, other: np.ndarray, coef: np.ndarray,
                    intercept: np.ndarray) -> np.ndarray:
    """Class probabilities of a film read beside the other breast, (N, 3) (or (3,) for one pair)."""
    out = _softmax_linear(bilateral_features(probs, other), coef, intercept)
    return out[0] if np.ndim(probs) == 1 else out


def single_film_probs(probs: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Class probabilities of a film read alone by the single-film stage (the bilateral model's
    form without the other breast), (N, 3) or (3,), from raw classifier probabilities."""
    out = _softmax_linear(single_features(probs), coef, intercept)
    return out[0] if np.ndim(probs) == 1 else out
