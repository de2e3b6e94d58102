"""Reading mammograms: one function from a file to display-ready pixels and what the file says.

``read_image(path)`` looks at the content, not the extension, and picks one of two readers:

- DICOM (``DICM`` at byte 128, or a bare data set without the preamble) through pydicom, with
  the grey-scale chain in the standard's order, each step done by pydicom's own function::

      stored values ─ modality LUT / rescale ─▶ raw ─ VOI LUT or window ─▶ [0, 1]
                    ─ MONOCHROME1 / Presentation LUT Shape INVERSE: 1 - x ─▶ pixels

  Without any VOI the full stored range (from BitsStored and PixelRepresentation, through the
  rescale) maps to [0, 1], never the image's own minimum and maximum, so two images of the same
  detector keep their relative brightness.
- PNG, JPEG, TIFF and PGM/PNM through Pillow: EXIF orientation applied, colour and palette
  converted to grey, integers scaled by their bit depth's range (a 16-bit PNG by 65535).

The chain runs on a lookup table of every storable value (at most 65536 entries for 8- and 16-bit
data), and the image is mapped through it once into float32: a 4600 x 2900 mammogram never
exists as a float64 copy.

Every failure is an :class:`ImageReadError` naming the file and the reason in plain words.
"""

from __future__ import annotations

import logging
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut, pixel_array
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pgm", ".pnm", ".dcm", ".dicom"}
)
DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})

MAX_SIDE = 20_000  # px, longest accepted side (the largest mammography detectors are ~ 4000 x 5600)
MAX_PIXELS = 200_000_000  # px per image (a float32 copy is then 800 MB)

# Pillow formats read; others (EPS, PDF, ...) are refused rather than handed to external tools.
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "PPM")
_FORMAT_NAMES = {"PPM": "PNM"}  # Pillow names the whole PBM/PGM/PPM family after PPM

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_TAGS = frozenset(Tag(t) for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))

_SIDES = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
# Mammographic views (DICOM CID 4014 abbreviations); a file name may carry any of these.
_VIEWS = frozenset({"CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO"})
# Tag values may also say axillary tail and cleavage views; names too rarely do to risk it.
_TAG_VIEWS = _VIEWS | {"AT", "CV"}
_VIEW_MEANINGS = {  # ViewCodeSequence code meanings, lower-case letters only
    "craniocaudal": "CC",
    "mediolateraloblique": "MLO",
    "mediolateral": "ML",
    "lateromedial": "LM",
    "lateromedialoblique": "LMO",
    "craniocaudalexaggeratedlaterally": "XCCL",
    "craniocaudalexaggeratedmedially": "XCCM",
    "caudocranialfrombelow": "FB",
    "superolateraltoinferomedialoblique": "SIO",
    "axillarytail": "AT",
    "cleavage": "CV",
}
_TAG_VALUE_CHARS = 120  # longest value text kept in meta["dicom_tags"]
_TAG_BYTES_SHOWN = 64  # byte values longer than this are summarised by their length

# Explicit VRs a bare data set may start with (its first element's bytes 4-5).
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)


class ImageReadError(ValueError):
    """A file MammoLab cannot read; the message names the file and says why in plain words.

    Attributes
    ----------
    path : pathlib.Path or None
        The file that failed.
    reason : str
        The reason alone, without the file name.
    """

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = Path(path) if path is not None else None
        self.reason = reason
        name = self.path.name if self.path is not None else "image"
        super().__init__(f"{name}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Batch jobs may cross process boundaries; the default pickling would call cls(message).
        return type(self), (self.path, self.reason)


@dataclass(frozen=True, eq=False)
class Mammogram:
    """One image as MammoLab shows and analyses it.

    Attributes
    ----------
    pixels : numpy.ndarray
        (H, W) float32 in [0, 1], display-ready (brighter = denser), full resolution.
    raw : numpy.ndarray
        (H, W) stored values before the display mapping: for DICOM after the modality LUT or
        rescale (the units of the file's windows), for other formats the integers in the file
        after grey conversion and EXIF orientation.
    meta : dict
        ``format``, ``width``, ``height``, ``bits_stored``, ``laterality`` ("L", "R" or None),
        ``view`` ("CC", "MLO", ... or None), ``pixel_spacing_mm`` ((row, col) or None),
        ``window`` ((centre, width) in raw units or None), ``windows`` (list of (centre, width,
        explanation)), ``window_function`` (the DICOM VOI LUT Function of those windows,
        "LINEAR" by default), ``stored_range`` ((low, high): every value ``raw`` can hold, in
        its units), ``frames``, ``photometric``, ``transfer_syntax``, ``voi`` (the display
        mapping applied, in words), ``inverted`` and ``dicom_tags`` (list of dicts with ``tag``,
        ``keyword``, ``name``, ``vr``, ``value``; empty for other formats).
    path : pathlib.Path or None
        Where the image was read from.
    """

    pixels: np.ndarray
    raw: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def read_image(path: str | Path) -> Mammogram:
    """Read a mammogram from a DICOM, PNG, JPEG, TIFF or PGM/PNM file.

    Parameters
    ----------
    path : str or pathlib.Path
        The file. Its content decides how it is read, not its extension.

    Returns
    -------
    Mammogram
        ``pixels`` (H, W) float32 in [0, 1], brighter = denser, at full resolution; the first
        frame of a multi-frame file.

    Raises
    ------
    ImageReadError
        For anything that cannot be shown: missing, empty or damaged file, unknown format,
        colour DICOM, no pixel data, an absurd declared size.
    """
    path = Path(path)
    _check_file(path)
    try:
        with path.open("rb") as f:
            head = f.read(132)
        if head[128:132] == b"DICM":
            return _read_dicom(path, force=False)
        if _looks_like_bare_dicom(head, path.stat().st_size):
            return _read_dicom(path, force=True)
        return _read_pillow(path)
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise ImageReadError(path, "not enough memory to open this image") from exc
    except OSError as exc:
        raise ImageReadError(path, f"the file could not be read ({describe_error(exc)})") from exc
    except Exception as exc:  # any decoder's own error type must not reach the user raw
        raise ImageReadError(path, f"the file could not be read ({describe_error(exc)})") from exc


def has_dicom_preamble(path: str | Path) -> bool:
    """Whether the file has the DICOM preamble: ``DICM`` at byte 128 (False if unreadable)."""
    try:
        with Path(path).open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_identity(path: str | Path) -> dict[str, Any] | None:
    """PatientID, StudyDate, laterality and view of a DICOM file from its header alone.

    Returns None when the file is not a readable DICOM file; the same rules as
    :func:`read_image` decide the laterality and view.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_dicom_preamble(path))
        laterality, view = _dicom_laterality_view(ds, path)
        return {"patient_id": str(ds.get("PatientID", "") or ""),
                "study_date": str(ds.get("StudyDate", "") or ""), "laterality": laterality, "view": view}
    except Exception as exc:  # any damage: the file simply has no identity to pair by
        logger.debug("no DICOM identity for %s (%s)", path, describe_error(exc))
        return None


def looks_like_image(path: str | Path) -> bool:
    """Whether a file found in a folder is taken as an image: an image extension (any case), or
    no extension and the DICOM preamble, as scanners write them."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    return path.suffix == "" and has_dicom_preamble(path)


def laterality_view_from_name(name: str | Path) -> tuple[str | None, str | None]:
    """Laterality and view spelt in a file name or identifier.

    Understands Mini-DDSM and CBIS-DDSM names (``C_0029_1.LEFT_CC.jpg``,
    ``Mass-Test_P_00173_RIGHT_MLO``) and short forms (``R_CC``, ``LMLO``). Only the last path
    component is looked at.

    Returns
    -------
    tuple
        (laterality, view): "L"/"R" or None, and "CC", "MLO", ... or None. A name that spells
        both sides gives None for the laterality.
    """
    sides: set[str] = set()
    views: list[str] = []
    for token in re.split(r"[^A-Z0-9]+", Path(str(name)).name.upper()):
        if token in _SIDES:
            sides.add(_SIDES[token])
        elif token in _VIEWS:
            views.append(token)
        elif len(token) > 2 and token[0] in "LR" and token[1:] in _VIEWS:
            sides.add(token[0])
            views.append(token[1:])
    laterality = sides.pop() if len(sides) == 1 else None
    view = views[0] if len(set(views)) == 1 else None
    return laterality, view


# --- files -----------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"the file cannot be opened ({describe_error(exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(path, "this is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(path, "this is not a regular file")
    if st.st_size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")


def describe_error(exc: BaseException) -> str:
    """An exception in a few words for a one-line message: an OS error's own text, else the
    first line of the message, else the exception's type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


def _check_size(path: Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"the image declares an empty size ({width} x {height} pixels)")
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageReadError(
            path,
            f"the image is too large to open safely ({width} x {height} pixels; MammoLab opens "
            f"at most {MAX_SIDE} pixels a side and {MAX_PIXELS // 1_000_000} million pixels)",
        )


def _looks_like_bare_dicom(head: bytes, size: int) -> bool:
    """Whether a file without the preamble starts like a DICOM data set.

    Such files begin with the file meta group (0002) or the identifying group (0008), little- or
    big-endian, followed by an explicit VR or an implicit length that fits in the file. Random
    bytes pass this with a chance of about one in ten million.
    """
    if len(head) < 8:
        return False
    for order in "<>":
        group, element = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008) or element > 0x00FF:
            continue
        if head[4:6] in _VRS:
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if order == "<" and 8 + length <= size:
            return True
    return False


# --- DICOM -----------------------------------------------------------------------------------


def _read_dicom(path: Path, force: bool) -> Mammogram:
    try:
        ds = pydicom.dcmread(path, force=force)
    except InvalidDicomError as exc:
        raise ImageReadError(
            path, f"not a DICOM file MammoLab can read ({describe_error(exc)})"
        ) from exc
    except Exception as exc:
        raise ImageReadError(
            path, f"the DICOM file is damaged or incomplete ({describe_error(exc)})"
        ) from exc

    if not any(tag in ds for tag in _PIXEL_TAGS):
        if not any(dictionary_has_tag(tag) for tag in ds.keys()):
            raise ImageReadError(
                path, "the DICOM file is damaged: nothing readable follows its header"
            )
        raise ImageReadError(
            path,
            "DICOM file has no pixel data (it may be a report, a presentation state or a "
            "DICOMDIR, or the file is incomplete)",
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME:
        shown = photometric or "(missing)"
        raise ImageReadError(
            path,
            f"photometric interpretation {shown} is not supported: MammoLab reads grey-scale "
            "DICOM images (MONOCHROME1 or MONOCHROME2)",
        )
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    _check_size(path, columns, rows)
    _ensure_transfer_syntax(ds)

    try:
        stored = pixel_array(ds, index=0)  # decodes the first frame only
    except Exception as exc:
        syntax = ds.file_meta.TransferSyntaxUID.name
        raise ImageReadError(
            path,
            "the DICOM pixel data could not be decoded, the file may be damaged or incomplete "
            f"({syntax}: {describe_error(exc)})",
        ) from exc
    if stored.ndim != 2:
        raise ImageReadError(path, f"expected one grey-scale frame, got an array of {stored.shape}")

    # One inversion for either: the DX IOD pairs MONOCHROME1 with Presentation LUT Shape INVERSE
    # as two names for the same step, not two steps that cancel.
    inverted = photometric == "MONOCHROME1" or (
        str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    )
    raw, pixels, voi = _grey_chain(stored, ds, inverted)

    windows = _windows(ds)
    laterality, view = _dicom_laterality_view(ds, path)
    meta: dict[str, Any] = {
        "format": "DICOM",
        "width": columns,
        "height": rows,
        "bits_stored": int(ds.get("BitsStored") or 8 * stored.dtype.itemsize),
        "laterality": laterality,
        "view": view,
        "pixel_spacing_mm": _pixel_spacing(ds),
        "window": windows[0][:2] if windows else None,
        "windows": windows,
        "window_function": str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR",
        "stored_range": _modality_range(ds),  # what raw can hold, in its units
        "frames": int(ds.get("NumberOfFrames") or 1),
        "photometric": photometric,
        "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
        "voi": voi,
        "inverted": inverted,
        "dicom_tags": _dicom_tags(ds),
    }
    return Mammogram(pixels=pixels, raw=raw, meta=meta, path=path)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a data set read without file meta the transfer syntax it was found to use."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _grey_chain(
    stored: np.ndarray, ds: Dataset, inverted: bool
) -> tuple[np.ndarray, np.ndarray, str]:
    """Modality LUT, VOI, [0, 1], inversion: returns (raw, pixels float32, VOI in words).

    For 8- and 16-bit integers the chain runs once over every storable value and the image is
    then looked up in that table, which is both faster and lighter than running pydicom's float64
    functions over 13 million pixels. Wider or float data go through the same functions directly.
    """
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        unsigned = np.dtype(f"u{stored.dtype.itemsize}")
        index = stored.view(unsigned)
        # Every value the container can hold, in the order of its unsigned bit pattern.
        values = np.arange(2 ** (8 * unsigned.itemsize), dtype=unsigned).view(stored.dtype)
        modality = apply_modality_lut(values, ds)
        display, voi = _display(modality, ds, inverted)
        pixels = display.take(index)
        raw = stored if modality is values else _compact(modality).take(index)
        return raw, pixels, voi
    modality = apply_modality_lut(stored, ds)
    display, voi = _display(modality, ds, inverted)
    return modality, display, voi


def _display(modality: np.ndarray, ds: Dataset, inverted: bool) -> tuple[np.ndarray, str]:
    """VOI LUT or window (pydicom's), or the full stored range, as float32 [0, 1], inverted
    (``1 - x`` in float32) for MONOCHROME1."""
    voi_name = "full stored range"
    low, high = _modality_range(ds)
    out: np.ndarray = modality
    if ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds):
        voi_input = modality
        if ds.get("VOILUTSequence") and modality.dtype.kind == "f":
            integral = np.round(modality)
            if np.array_equal(integral, modality):  # a LUT indexes integers
                voi_input = integral.astype(np.int64)
        try:
            with np.errstate(over="ignore"):  # a steep sigmoid saturates to exactly 0 or 1
                out = apply_voi_lut(voi_input, ds, index=0, prefer_lut=True)
        except (ValueError, NotImplementedError, IndexError, TypeError) as exc:
            logger.warning("VOI of the file ignored, showing the full range: %s", exc)
            out = modality
        else:
            if ds.get("VOILUTSequence"):
                voi_name = "VOI LUT"
                low, high = _voi_lut_range(ds)
            else:
                function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
                voi_name = f"window ({function.lower()})"
                low, high = _modality_range(ds, rising=False)  # the range pydicom maps into
    span = float(high - low) or 1.0  # negative for a falling range: still maps low to 0
    scaled = (np.asarray(out, dtype=np.float64) - float(low)) / span
    display = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    if inverted:
        np.subtract(np.float32(1.0), display, out=display)
    return display, voi_name


def _modality_range(ds: Dataset, rising: bool = True) -> tuple[float, float]:
    """The stored range after the modality LUT or rescale, in rising order.

    The same range pydicom's windowing maps into, so a window's output and the no-window case
    share one normalisation. ``rising=False`` keeps pydicom's own order: with a negative
    rescale slope its window output runs from the image of the lowest stored value down to the
    image of the highest, so ``(low, high)`` is then falling.
    """
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
        if rising:
            low, high = sorted((low, high))
    return low, high


def _voi_lut_range(ds: Dataset) -> tuple[float, float]:
    """The output range of the first VOI LUT: its smallest and largest entry."""
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
    table = apply_voi(np.arange(first, first + entries), ds, index=0)
    return float(table.min()), float(table.max())


def _compact(values: np.ndarray) -> np.ndarray:
    """int32 for integral modality values (the status bar shows integers), else float32."""
    if values.dtype.kind in "iu":
        return values
    if np.array_equal(values, np.round(values)) and np.abs(values).max() < 2**31:
        return values.astype(np.int32)
    return values.astype(np.float32)


def _windows(ds: Dataset) -> list[tuple[float, float, str]]:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return []
    centres = _as_list(ds.WindowCenter)
    widths = _as_list(ds.WindowWidth)
    explanations = [str(e) for e in _as_list(ds.get("WindowCenterWidthExplanation", []))]
    windows = []
    for i, (centre, width) in enumerate(zip(centres, widths, strict=False)):
        try:
            c, w = float(centre), float(width)
        except (TypeError, ValueError):
            continue
        text = explanations[i] if i < len(explanations) else ""
        windows.append((c, w, text))
    return windows


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _as_list(ds.get(keyword))
        try:
            spacing = tuple(float(v) for v in values[:2])
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and all(s > 0 for s in spacing):
            return spacing[0], spacing[1]
    return None


def _dicom_laterality_view(ds: Dataset, path: Path) -> tuple[str | None, str | None]:
    """Tags first (ImageLaterality, Laterality; ViewPosition, ViewCodeSequence, a view written in
    PatientOrientation as CBIS-DDSM does), then identifiers and the file and folder names."""
    laterality = None
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            laterality = value
            break

    view = None
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position in _TAG_VIEWS:
        view = position
    if view is None and ds.get("ViewCodeSequence"):
        meaning = str(ds.ViewCodeSequence[0].get("CodeMeaning", ""))
        view = _VIEW_MEANINGS.get(re.sub(r"[^a-z]", "", meaning.lower()))
    if view is None:
        orientation = _as_list(ds.get("PatientOrientation"))
        if len(orientation) == 1 and str(orientation[0]).strip().upper() in _TAG_VIEWS:
            view = str(orientation[0]).strip().upper()

    names = [str(ds.get(k, "") or "") for k in ("PatientID", "PatientName", "SeriesDescription")]
    names += [path.name, *(p.name for p in list(path.parents)[:3])]
    for name in names:
        if laterality is not None and view is not None:
            break
        side, named_view = laterality_view_from_name(name)
        laterality = laterality or side
        view = view or named_view
    return laterality, view


def _dicom_tags(ds: Dataset) -> list[dict[str, str]]:
    """Every top-level element but the pixel data, as short display strings."""
    tags = []
    for source in (ds.file_meta, ds):
        for tag in list(source.keys()):
            if tag in _PIXEL_TAGS:
                continue
            try:
                elem = source[tag]
                value = _tag_value(elem)
                keyword, name, vr = elem.keyword, elem.name, str(elem.VR)
            except Exception as exc:  # one malformed element must not hide the others
                keyword, name, vr, value = "", "", "", f"<unreadable: {describe_error(exc)}>"
            tags.append(
                {
                    "tag": f"({tag.group:04X},{tag.element:04X})",
                    "keyword": keyword,
                    "name": name,
                    "vr": vr,
                    "value": value,
                }
            )
    return tags


def _tag_value(elem: Any) -> str:
    if elem.VR == "SQ":
        n = len(elem.value)
        return f"<sequence of {n} item{'' if n == 1 else 's'}>"
    value = elem.value
    if isinstance(value, bytes | bytearray):
        if len(value) <= _TAG_BYTES_SHOWN:
            text = value.rstrip(b"\x00 ")
            if all(32 <= b < 127 for b in text):
                return text.decode("ascii")
            return value.hex(" ")
        return f"<{len(value)} bytes>"
    if value is None:
        return ""
    if not isinstance(value, list | tuple | MultiValue):  # a PersonName iterates by character
        text = str(value)
    else:
        items = list(value)
        text = "\\".join(str(v) for v in items[:16]) + ("\\…" if len(items) > 16 else "")
    return text if len(text) <= _TAG_VALUE_CHARS else text[: _TAG_VALUE_CHARS - 1] + "…"


# --- PNG, JPEG, TIFF, PGM/PNM ----------------------------------------------------------------


def _read_pillow(path: Path) -> Mammogram:
    try:
        image = Image.open(path, formats=_PIL_FORMATS)
    except UnidentifiedImageError as exc:
        if path.suffix.lower() in DICOM_EXTENSIONS:
            reason = (
                "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM data set at the start)"
            )
        else:
            reason = "not an image MammoLab can read (the content is not PNG, JPEG, TIFF, PGM/PNM or DICOM)"
        raise ImageReadError(path, reason) from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            path,
            f"the image is too large to open safely (MammoLab opens at most {MAX_SIDE} pixels a "
            f"side and {MAX_PIXELS // 1_000_000} million pixels)",
        ) from exc

    with image:
        _check_size(path, image.width, image.height)
        file_format = image.format or "unknown"
        frames = int(getattr(image, "n_frames", 1))
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            raw, full_scale = _grey_integers(image, path, file_format)
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(
                path, f"the image data is damaged or incomplete ({describe_error(exc)})"
            ) from exc

    # One float32 per possible integer, so each pixel is exactly float32(value / full_scale).
    values = np.arange(np.iinfo(raw.dtype).max + 1, dtype=np.float64)
    pixels = np.clip(values / full_scale, 0.0, 1.0).astype(np.float32).take(raw)
    laterality, view = laterality_view_from_name(path.name)
    for parent in list(path.parents)[:3]:
        if laterality is not None and view is not None:
            break
        side, named_view = laterality_view_from_name(parent.name)
        laterality, view = laterality or side, view or named_view
    meta: dict[str, Any] = {
        "format": _FORMAT_NAMES.get(file_format, file_format),
        "width": int(raw.shape[1]),
        "height": int(raw.shape[0]),
        "bits_stored": int(full_scale).bit_length(),
        "laterality": laterality,
        "view": view,
        "pixel_spacing_mm": None,
        "window": None,
        "windows": [],
        "window_function": "LINEAR",
        "stored_range": (0.0, float(full_scale)),
        "frames": frames,
        "photometric": None,
        "transfer_syntax": None,
        "voi": "full stored range",
        "inverted": False,
        "dicom_tags": [],
    }
    return Mammogram(pixels=pixels, raw=raw, meta=meta, path=path)


def _grey_integers(image: Image.Image, path: Path, file_format: str) -> tuple[np.ndarray, int]:
    """The grey integers of a loaded Pillow image and the value that means full white."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.uint8), 1
    if mode == "F":
        raise ImageReadError(
            path, "floating-point images are not supported; save the image as 8- or 16-bit"
        )
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(path, "32-bit images are not supported; save it as 8- or 16-bit")
        values = values.astype(np.uint16)
        if file_format == "PPM":
            return _pnm_integers(values, path, 65535)
        return values, 65535
    if mode != "L":
        image = image.convert("L")  # colour, palette, alpha: ITU-R 601-2 luma
    values = np.asarray(image, dtype=np.uint8)
    if file_format == "PPM":
        return _pnm_integers(values, path, 255)
    return values, 255


def _pnm_integers(values: np.ndarray, path: Path, full: int) -> tuple[np.ndarray, int]:
    """Undo Pillow's stretch of a PGM whose maxval is not 255 or 65535: the file's integers."""
    maxval = _pnm_maxval(path)
    if maxval is None or maxval == full:
        return values, full
    original = np.rint(values.astype(np.float64) * (maxval / full)).astype(values.dtype)
    return original, maxval


def _pnm_maxval(path: Path) -> int | None:
    with path.open("rb") as f:
        head = f.read(1024)
    text = re.sub(rb"#[^\n]*", b" ", head)
    fields = text.split(maxsplit=4)
    if len(fields) < 4 or fields[0] not in (b"P2", b"P5"):
        return None
    try:
        return int(fields[3])
    except ValueError:
        return None
