"""Run a model bundle on a mammogram with LiteRT: tiled segmenter, candidates, multi-branch classifier.

The walk for one image::

    Mammogram ──breast mask, working transform (core.preprocess)──▶
      canvas (working resolution, chest wall left, letterboxed) ──segmenter.tflite──▶
      per-cell class probabilities (normal tissue / benign lesion / malignant lesion)
      ──the most lesion-like cells re-read from their own patch (verifier.tflite, if any)──▶
      ──top-K lesion cells inside the breast──▶ K native-resolution patches
      whole breast at low resolution + patches + cell scores ──classifier.tflite──▶
      class probabilities / temperature ──▶ Analysis (maps back at full resolution)

No TensorFlow on this path: only numpy, OpenCV and ``ai_edge_litert``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.bundle import Bundle, BundleError, load_bundle
from core.decision import decide
from core.io import ImageReadError, Mammogram
from core.pairing import bilateral_probs, check_bilateral, check_single_film, single_film_probs
from core.paths import default_bundle_dir
from core.preprocess import (
    PreprocessConfig,
    Transform,
    breast_mask,
    letterbox,
    working_image_transform,
)

log = logging.getLogger(__name__)

__all__ = ["Analysis", "Analyzer", "BundleError", "Candidates", "candidate_patches", "top_cells",
           "verify_cells"]


@dataclass
class Analysis:
    """What the models say about one mammogram; every map is at the image's full resolution."""

    # (n_classes,) float32, sums to 1: the single-film stage's reading when the bundle has one
    # (pipeline.single_film), else the classifier's after temperature
    probabilities: np.ndarray
    classes: tuple[str, ...]
    lesion_probability: np.ndarray  # (H, W) float32 in [0, 1]
    lesion_mask: np.ndarray  # (H, W) bool
    breast_mask: np.ndarray  # (H, W) bool
    lesion_area_frac: float  # lesion pixels / breast pixels
    model_name: str
    model_version: str
    candidates_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # full-res (x, y)
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    raw_probabilities: np.ndarray | None = None  # (n_classes,) the classifier's, before temperature
    # The prior of the balanced call (core.decision) when the bundle gives one; None: arg-max.
    call_prior: np.ndarray | None = None
    # The model inputs and cell map of this analysis, so heatmap() does not run them again.
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def predicted(self) -> str:
        """The class the model calls (:mod:`core.decision`)."""
        return self.classes[decide(self.probabilities, self.call_prior)]

    @property
    def most_probable(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]

    def probability(self, name: str) -> float:
        return float(self.probabilities[self.classes.index(name)])


@dataclass(frozen=True)
class Candidates:
    """Lesion candidates found on the segmenter's cell grid."""

    cells_rc: np.ndarray  # (K, 2) int, (row, col) on the cell grid
    canvas_xy: np.ndarray  # (K, 2) float, cell centres on the canvas
    scores: np.ndarray  # (K, n_cell_classes) float32, cell class probabilities


class NoBreastError(ImageReadError):
    """An image in which no breast is found (blank, or too dark): nothing for the models to read.

    Reading it anyway would give a confident Normal, so it is refused with the reason.
    """

    def __init__(self, mammogram: Mammogram, threshold: float) -> None:
        brightest = float(mammogram.pixels.max())  # core.io never returns an empty image
        if brightest < threshold:
            reason = (f"no breast found: the image is blank or too dark (its brightest pixel is "
                      f"{100 * brightest:.1f} % of full scale; breast tissue is read from "
                      f"{100 * threshold:.0f} % up)")
            meta = mammogram.meta or {}
            if meta.get("format") != "DICOM" and meta.get("bits_stored") == 16:
                # 16-bit PNG or TIFF files carry no bit depth of their data (DICOM's BitsStored).
                reason += (". A 16-bit file holding 10- to 14-bit data reads this dark: export it "
                           "scaled to the full 16-bit range, or as 8-bit")
        else:
            reason = "no breast found: no region of the image is large and bright enough to be one"
        super().__init__(mammogram.path, reason)


MIN_SIDE = 256  # px; a whole mammogram is about 1000 px a side even at 0.2 mm a pixel
MAX_ASPECT = 4.0  # longest side over shortest; films are 1 : 1 to about 1 : 2.5
MIN_GREY_SHARE = 0.01  # of pixels between 10 % and 90 % of the image's range; films have 8 % and up


class NotAMammogramError(ImageReadError):
    """An image the models must not read: too small, a strip, or black and white only (a lesion
    mask, a drawing). Each would get a confident reading of nothing, so it is refused."""


def check_readable(mammogram: Mammogram) -> None:
    """Refuse an image that cannot be a whole mammogram (:meth:`Analyzer.analyze` runs the size
    check before the models and the grey check after looking for the breast).

    Raises
    ------
    NotAMammogramError
        The image has a side under :data:`MIN_SIDE`, is longer than :data:`MAX_ASPECT` times its
        width, or has under :data:`MIN_GREY_SHARE` of its pixels between black and white.
    """
    check_size(mammogram)
    check_greys(mammogram)


def check_size(mammogram: Mammogram) -> None:
    """Refuse a thumbnail or a strip (see :func:`check_readable`)."""
    h, w = mammogram.pixels.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise NotAMammogramError(mammogram.path, (
            f"the image is {w} x {h} pixels, too small for a mammogram (the models read lesions at "
            f"full resolution and need at least {MIN_SIDE} pixels a side; open the original, not a "
            "downsampled copy)"))
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise NotAMammogramError(mammogram.path, (
            f"the image is {w} x {h} pixels, a strip rather than a mammogram (the models read "
            f"images at most {MAX_ASPECT:g} times longer than wide)"))


def check_greys(mammogram: Mammogram) -> None:
    """Refuse an image of black and white only (see :func:`check_readable`). Its range is the
    image's own, so :class:`NoBreastError` (blank, or data darker than its container) comes
    first where a breast is looked for: its reason says more."""
    h, w = mammogram.pixels.shape[:2]
    sample = mammogram.pixels[:: max(1, h // 512), :: max(1, w // 512)]
    lo, hi = float(sample.min()), float(sample.max())
    if hi > lo:
        grey = float(np.mean(np.abs(sample - (lo + hi) / 2) < 0.4 * (hi - lo)))
        if grey < MIN_GREY_SHARE:
            raise NotAMammogramError(mammogram.path, (
                f"the image is black and white only ({100 * grey:.2f} % of its pixels in between): "
                "a lesion mask or a drawing, not a mammogram"))


def top_cells(cell_probs: np.ndarray, breast_cells: np.ndarray, k: int, cell_px: int) -> Candidates:
    """The ``k`` breast cells with the highest lesion probability (1 - P(normal tissue)).

    Parameters
    ----------
    cell_probs : np.ndarray
        (rows, cols, C) float32 cell class probabilities, class 0 = normal tissue.
    breast_cells : np.ndarray
        (rows, cols) bool, cells mostly inside the breast.
    k : int
        Number of candidates; fewer breast cells than ``k`` repeat the best one.
    cell_px : int
        Cell side on the canvas, px.
    """
    lesion = 1.0 - cell_probs[..., 0]
    score = np.where(breast_cells, lesion, -1.0).ravel()
    order = np.argsort(-score, kind="stable")
    n_valid = max(1, int((score >= 0).sum()))
    picks = [order[i % n_valid] for i in range(k)]
    rc = np.array([divmod(int(i), cell_probs.shape[1]) for i in picks], dtype=np.int64)
    xy = (rc[:, ::-1].astype(np.float64) + 0.5) * cell_px
    return Candidates(rc, xy, cell_probs[rc[:, 0], rc[:, 1]].astype(np.float32))


def check_verify_shifts(shifts: Any) -> np.ndarray:
    """model.json's ``pipeline.verify_shifts`` as an (S, 2) float array of crop offsets (x, y, px).

    Raises ValueError naming what is wrong: not a non-empty list of [x, y] pairs of finite numbers.
    """
    try:
        out = np.asarray(shifts, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"verify_shifts must be a list of [x, y] offsets, got {shifts!r}") from None
    if out.ndim != 2 or out.shape[1] != 2 or len(out) == 0 or not np.isfinite(out).all():
        raise ValueError(f"verify_shifts must be a non-empty list of [x, y] offsets, got {shifts!r}")
    return out


def verify_cells(cells: np.ndarray, canvas: np.ndarray, breast_cells: np.ndarray, k: int,
                 cell_px: int, patch_px: int, read: Callable[[np.ndarray], np.ndarray],
                 shifts: Sequence[Sequence[float]] = ((0, 0),)) -> np.ndarray:
    """Re-read the ``k`` most lesion-like cells from their own patch and average the two readings.

    The segmenter reads every cell convolutionally, with the whole canvas around each window; the
    scanners were trained on isolated ``patch_px`` patches. ``read`` gives the scanners' reading of
    such patches, cut from the canvas exactly as in training around each candidate cell: one
    patch per entry of ``shifts`` (x, y offsets of the patch centre from the cell centre, px;
    the scanners were trained on patches whose centres wander around the lesion, so several
    shifted crops read a cell more steadily than one). The verifier's reading of a cell is the
    mean over its crops, and each candidate's probabilities become the mean of the segmenter's
    and the verifier's readings. The other cells keep the segmenter's reading.

    Parameters
    ----------
    cells : np.ndarray
        (rows, cols, C) cell probabilities from the segmenter.
    canvas : np.ndarray
        (rows * cell_px, cols * cell_px) float32 [0, 1], the segmenter's input.
    breast_cells : np.ndarray
        (rows, cols) bool.
    read : callable
        (k * len(shifts), patch_px, patch_px) float32 -> (k * len(shifts), C) probabilities; the
        patches come shift by shift (all k candidates at the first shift, then at the second...).
    shifts : sequence of (x, y)
        Crop offsets; the default, one unshifted crop, is the plain re-read.

    Returns
    -------
    np.ndarray
        A new (rows, cols, C) float32 array.
    """
    out = cells.astype(np.float32, copy=True)
    if k <= 0 or not breast_cells.any():
        return out
    offsets = np.asarray(shifts, np.float64).reshape(-1, 2)
    cand = top_cells(cells, breast_cells, k, cell_px)
    centres = (cand.canvas_xy[None] + offsets[:, None]).reshape(-1, 2)  # shift by shift
    patches = candidate_patches(np.asarray(canvas, np.float32), centres, patch_px)  # one padding
    readings = np.asarray(read(patches), np.float32)
    want = (len(offsets) * k, cells.shape[-1])
    if readings.shape != want:
        raise ValueError(f"the verifier gave shape {readings.shape}, expected {want}")
    second = readings.reshape(len(offsets), k, cells.shape[-1]).mean(axis=0)
    r, c = cand.cells_rc[:, 0], cand.cells_rc[:, 1]
    out[r, c] = 0.5 * (cells[r, c] + second)  # repeated candidates write the same value
    return out


def canvas_lesion_map(cells: np.ndarray, cell_px: int, canvas_breast: np.ndarray) -> np.ndarray:
    """Cell lesion probabilities (1 - P(normal tissue)), smoothly upsampled to the canvas.

    The one definition of the lesion map: the app shows it (mapped to full resolution) and
    training measures Dice on it. Zero outside the breast.

    Returns
    -------
    np.ndarray
        ``canvas_breast.shape`` float32 in [0, 1].
    """
    lesion = (1.0 - cells[..., 0]).astype(np.float32)
    rows, cols = lesion.shape
    up = np.zeros(canvas_breast.shape, dtype=np.float32)
    up[: rows * cell_px, : cols * cell_px] = cv2.resize(
        lesion, (cols * cell_px, rows * cell_px), interpolation=cv2.INTER_CUBIC)
    return np.clip(up, 0.0, 1.0) * canvas_breast


def scan_prior(cell_probs: np.ndarray, breast: np.ndarray, top: int = 3) -> np.ndarray:
    """The patch-scan reading of a cell map: class probabilities from its top-scoring cells.

    Benign and Cancer are the means of the ``top`` highest benign and malignant cell
    probabilities inside the breast; Normal is one minus the mean of the ``top`` highest lesion
    probabilities (1 - P(normal tissue)); the three are then normalised to sum to 1.

    Parameters
    ----------
    cell_probs : np.ndarray
        (rows, cols, 3) cell probabilities (normal tissue, benign, malignant).
    breast : np.ndarray
        (rows, cols) bool, the breast's cells.

    Returns
    -------
    np.ndarray
        (3,) float32, sums to 1.
    """
    p = cell_probs[breast]
    if len(p) == 0:
        return np.array([1.0, 0.0, 0.0], np.float32)
    top_mean = lambda v: float(np.sort(v)[-top:].mean())  # noqa: E731
    out = np.array([1.0 - top_mean(1.0 - p[:, 0]), top_mean(p[:, 1]), top_mean(p[:, 2])])
    out = np.clip(out, 1e-6, None)
    return (out / out.sum()).astype(np.float32)


def candidate_patches(work: np.ndarray, centres_xy: np.ndarray, size: int) -> np.ndarray:
    """Square patches of the working image centred on each point, zero-padded at the borders.

    Returns
    -------
    np.ndarray
        (K, size, size) float32.
    """
    half = size // 2
    padded = np.pad(work, half, mode="constant")
    out = np.empty((len(centres_xy), size, size), dtype=np.float32)
    for i, (x, y) in enumerate(centres_xy):
        cx = int(np.clip(np.floor(x), 0, work.shape[1] - 1)) + half
        cy = int(np.clip(np.floor(y), 0, work.shape[0] - 1)) + half
        out[i] = padded[cy - half : cy - half + size, cx - half : cx - half + size]
    return out


def canvas_transform(work: Transform, canvas_hw: tuple[int, int]) -> Transform:
    """Working resolution, shrunk only if the breast does not fit the canvas; chest wall at x = 0."""
    ch, cw = canvas_hw
    h, w = work.scaled_shape
    f = min(1.0, ch / h, cw / w)
    nh, nw = max(1, min(ch, int(round(h * f)))), max(1, min(cw, int(round(w * f))))
    x0, y0, x1, y1 = work.box
    return Transform(work.original_shape, work.box, work.flipped, nw / (x1 - x0), nh / (y1 - y0),
                     (nh, nw), (0, 0), (ch, cw))


def pipeline_inputs(mammogram: Mammogram, config: PreprocessConfig, canvas_hw: tuple[int, int],
                    global_px: int, mask: np.ndarray | None = None) -> dict[str, Any]:
    """The segmenter canvas and the classifier's whole-breast input, with their transforms.

    Training (``models/``) calls this too, so a model never sees pixels the app would not give it.

    Returns
    -------
    dict
        ``mask`` (H, W) bool full-res breast; ``work_t`` working-resolution transform;
        ``canvas_t``/``canvas`` (canvas_hw) float32 [0, 1]; ``canvas_breast`` bool;
        ``global_t``/``global`` (global_px, global_px) float32 [0, 1].
    """
    if mask is None:
        mask = breast_mask(mammogram.pixels, config.threshold)
    work_t = working_image_transform(mammogram, config, mask)
    canvas_t = canvas_transform(work_t, canvas_hw)
    canvas = canvas_t.apply(mammogram.pixels, pad_value=config.pad_value)
    canvas_breast = canvas_t.apply(mask, nearest=True).astype(bool)
    global_t = letterbox(work_t, global_px)
    global_img = global_t.apply(mammogram.pixels, pad_value=config.pad_value)
    return {"mask": mask, "work_t": work_t, "canvas_t": canvas_t, "canvas": canvas,
            "canvas_breast": canvas_breast, "global_t": global_t, "global": global_img}


def breast_cells(canvas_breast: np.ndarray, cell_px: int) -> np.ndarray:
    """(cell rows, cell cols) bool: cells at least half inside the breast."""
    c = cell_px
    rows, cols = canvas_breast.shape[0] // c, canvas_breast.shape[1] // c
    frac = canvas_breast[: rows * c, : cols * c].reshape(rows, c, cols, c).mean(axis=(1, 3))
    return frac >= 0.5


def patches_at(mammogram: Mammogram, inputs: dict[str, Any], cand: Candidates, patch_px: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Native-resolution patches around the candidates, and the candidates' full-res (x, y)."""
    full_xy = inputs["canvas_t"].inverse(cand.canvas_xy)
    work = inputs["work_t"].apply(mammogram.pixels)
    return candidate_patches(work, inputs["work_t"].forward(full_xy), patch_px), full_xy


def default_threads() -> int:
    """LiteRT threads per model when none are asked for: the cores this process may use, at most
    8. LiteRT's own default ran a film's analysis 1.6x slower than 2 threads on a 2-core machine
    (2.0 s against 1.24 s for mdb028), and slower than 1 thread (1.59 s)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class _Model:
    """One .tflite file behind LiteRT, its inputs matched by name."""

    def __init__(self, path: Path, threads: int | None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interp = Interpreter(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"{path}: LiteRT cannot load this model ({exc})") from None
        self.inputs = self._interp.get_input_details()
        self.outputs = self._interp.get_output_details()

    def input_index(self, name: str) -> int:
        for d in self.inputs:
            if name in d["name"]:
                return d["index"]
        raise BundleError(f"model has no input named like '{name}': {[d['name'] for d in self.inputs]}")

    def input_shape(self, name: str) -> tuple[int, ...]:
        for d in self.inputs:
            if name in d["name"]:
                return tuple(int(s) for s in d["shape"])
        raise BundleError(f"model has no input named like '{name}'")

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, value in feeds.items():
            self._interp.set_tensor(self.input_index(name), value.astype(np.float32))
        self._interp.invoke()
        return [self._interp.get_tensor(d["index"]) for d in self.outputs]


class Analyzer:
    """A loaded bundle, ready to analyse mammograms. Not thread-safe: one per worker."""

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        """``threads``: LiteRT threads per model (None: ``default_threads()``)."""
        self.bundle = bundle
        card = bundle.card
        self.config = PreprocessConfig.from_dict(card["preprocessing"])
        p = card["pipeline"]
        try:
            self.canvas_hw = (int(p["canvas"][0]), int(p["canvas"][1]))
            self.cell_px = int(p["cell_px"])
            self.top_k = int(p["top_k"])
            self.patch_px = int(p["patch_px"])
            self.global_px = int(p["global_px"])
            self.mask_threshold = float(p.get("mask_threshold", 0.5))
            self.temperature = float(card.get("temperature", 1.0))
            self.verify_top = int(p.get("verify_top", 0))
            self.verify_shifts = check_verify_shifts(p.get("verify_shifts", [[0, 0]]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{bundle.path}: model.json pipeline settings incomplete ({exc})") from None
        # The logistic stages (core.pairing) and the priors of their balanced calls
        # (core.decision); a stage without a prior calls its arg-max.
        self.bilateral, self.pair_prior = self._stage(p, "bilateral", check_bilateral)
        self.single_film, self.single_prior = self._stage(p, "single_film", check_single_film)
        threads = default_threads() if threads is None else int(threads)
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self._seg = _Model(bundle.file("segmenter.tflite"), threads)
        self._cls = _Model(bundle.file("classifier.tflite"), threads)
        self._ver = _Model(bundle.file("verifier.tflite"), threads) if self.verify_top > 0 else None
        if self._ver is not None:
            want = (1, self.verify_top * len(self.verify_shifts), self.patch_px, self.patch_px, 1)
            got = self._ver.input_shape("verify_patches")
            if got != want:
                raise BundleError(f"{bundle.path}: verifier.tflite takes {got}, but model.json's "
                                  f"pipeline asks for {want}")
        self.cell_classes = tuple(p.get("cell_classes", ("normal", "benign", "malignant")))
        self.uses_prior = any("prior_log" in d["name"] for d in self._cls.inputs)

    def _stage(self, pipeline: dict[str, Any], key: str, check) -> tuple[dict | None, np.ndarray | None]:
        """``pipeline[key]`` checked by ``check``: (coef and intercept, class prior or None), or
        (None, None) when the bundle has no such stage; BundleError says what is wrong."""
        if pipeline.get(key) is None:
            return None, None
        try:
            params = check(pipeline[key], self.bundle.classes)
        except ValueError as exc:
            raise BundleError(f"{self.bundle.path}: model.json {exc}") from None
        return params, params.pop("class_prior", None)

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, threads: int | None = None) -> Analyzer:
        """Load and verify a bundle folder (``None``: the bundled model)."""
        return cls(load_bundle(path if path is not None else default_bundle_dir()), threads)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.classes

    @property
    def card(self) -> dict[str, Any]:
        return self.bundle.card

    @property
    def path(self) -> Path:
        return self.bundle.path

    @property
    def reads_pairs(self) -> bool:
        """Whether the bundle can read a film beside the other breast (:meth:`compare`)."""
        return self.bilateral is not None

    def compare(self, film: Analysis, other: Analysis) -> np.ndarray:
        """Class probabilities of ``film`` read beside ``other``, the other breast's same view.

        Uses both films' raw classifier probabilities and the bundle's bilateral model
        (:mod:`core.pairing`); these probabilities replace the film's single-film ones.
        """
        if self.bilateral is None:
            raise ValueError("this bundle has no bilateral model")
        if film.raw_probabilities is None or other.raw_probabilities is None:
            raise ValueError("both analyses need their raw classifier probabilities")
        return self.compare_raw(film.raw_probabilities, other.raw_probabilities)

    def call_pair(self, probabilities: np.ndarray) -> str:
        """The class a film read beside the other breast is called (:mod:`core.decision`):
        the balanced call when the bundle gives the prior, else the most probable class."""
        return self.classes[decide(np.asarray(probabilities), self.pair_prior)]

    def compare_raw(self, film: np.ndarray, other: np.ndarray) -> np.ndarray:
        """:meth:`compare` on the two films' raw classifier probabilities."""
        if self.bilateral is None:
            raise ValueError("this bundle has no bilateral model")
        return bilateral_probs(np.asarray(film), np.asarray(other), **self.bilateral).astype(np.float32)

    # -- stages, public so training, tests and the heatmap use exactly the same steps ----------

    def segment(self, canvas: np.ndarray) -> np.ndarray:
        """Canvas (rows, cols) float32 [0, 1] -> cell probabilities (cell rows, cell cols, C)."""
        (out,) = self._seg({"image": canvas[None, :, :, None]})
        return out[0]

    def verify(self, patches: np.ndarray) -> np.ndarray:
        """(verify_top x shifts, P, P) patches -> (verify_top x shifts, C) the scanners' readings."""
        if self._ver is None:
            raise ValueError("this bundle has no verifier")
        (out,) = self._ver({"verify_patches": patches[None, ..., None]})
        return out[0]

    def cell_map(self, canvas: np.ndarray, in_breast: np.ndarray) -> np.ndarray:
        """The segmenter's cell map, its top cells re-read by the verifier if the bundle has one."""
        cells = self.segment(canvas)
        if self._ver is None:
            return cells
        return verify_cells(cells, canvas, in_breast, self.verify_top, self.cell_px, self.patch_px,
                            self.verify, self.verify_shifts)

    def classify(self, global_img: np.ndarray, patches: np.ndarray, scores: np.ndarray,
                 prior: np.ndarray | None = None) -> np.ndarray:
        """Raw classifier probabilities (before temperature), shape (n_classes,).

        ``prior`` is the patch-scan reading of the cell map (:func:`scan_prior`), for
        classifiers that take it (input ``prior_log``) as the prior their head corrects.
        """
        feeds = {
            "global": global_img[None, :, :, None],
            "patches": patches[None, :, :, :, None],
            "scores": scores[None],
        }
        if self.uses_prior:
            if prior is None:
                raise ValueError("this classifier needs the patch-scan prior")
            feeds["prior_log"] = np.log(np.clip(prior, 1e-6, 1.0))[None]
        out = self._cls(feeds)
        return out[0][0]

    def read_alone(self, raw: np.ndarray) -> np.ndarray:
        """The probabilities of a film read alone, from the classifier's raw ones: the bundle's
        single-film stage (which replaces the temperature), else :meth:`calibrate`."""
        if self.single_film is not None:
            return single_film_probs(np.asarray(raw), **self.single_film).astype(np.float32)
        return self.calibrate(np.asarray(raw))

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Temperature scaling on probabilities: softmax(log p / T)."""
        logits = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / self.temperature
        e = np.exp(logits - logits.max())
        return (e / e.sum()).astype(np.float32)

    def inputs_for(self, mammogram: Mammogram, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Everything the two models see for one image, with the transforms to map back."""
        return pipeline_inputs(mammogram, self.config, self.canvas_hw, self.global_px, mask)

    def breast_cells(self, canvas_breast: np.ndarray) -> np.ndarray:
        return breast_cells(canvas_breast, self.cell_px)

    def analyze(self, mammogram: Mammogram) -> Analysis:
        """Classify and segment one mammogram.

        Returns
        -------
        Analysis
            Probabilities after temperature; lesion maps at full resolution.

        Raises
        ------
        NotAMammogramError
            The image cannot be a whole mammogram (see :func:`check_readable`).
        NoBreastError
            No breast is found in the image (blank or too dark).
        """
        t0 = time.perf_counter()
        check_size(mammogram)
        x = self.inputs_for(mammogram)
        if not x["mask"].any():
            raise NoBreastError(mammogram, self.config.threshold)
        check_greys(mammogram)
        t1 = time.perf_counter()
        in_breast = self.breast_cells(x["canvas_breast"])
        cells = self.cell_map(x["canvas"], in_breast)
        t2 = time.perf_counter()
        cand = top_cells(cells, in_breast, self.top_k, self.cell_px)
        canvas_t: Transform = x["canvas_t"]
        patches, full_xy = patches_at(mammogram, x, cand, self.patch_px)
        raw = self.classify(x["global"], patches, cand.scores, scan_prior(cells, in_breast))
        probs = self.read_alone(raw)
        t3 = time.perf_counter()
        lesion_map = self._lesion_map(cells, x["canvas_breast"], canvas_t)
        mask = x["mask"]
        lesion_mask = (lesion_map >= self.mask_threshold) & mask
        area = float(lesion_mask.sum()) / max(1, int(mask.sum()))
        t4 = time.perf_counter()
        return Analysis(
            probabilities=probs, classes=self.classes, lesion_probability=lesion_map,
            lesion_mask=lesion_mask, breast_mask=mask, lesion_area_frac=area,
            model_name=self.name, model_version=self.version, candidates_xy=full_xy,
            cache={"inputs": x, "cells": cells}, raw_probabilities=np.asarray(raw, np.float32),
            call_prior=self.single_prior,
            timings={"preprocess": t1 - t0, "segmenter": t2 - t1, "classifier": t3 - t2,
                     "maps": t4 - t3, "total": t4 - t0},
        )

    def _lesion_map(self, cells: np.ndarray, canvas_breast: np.ndarray, canvas_t: Transform) -> np.ndarray:
        """The canvas lesion map at full resolution."""
        return canvas_t.to_original(canvas_lesion_map(cells, self.cell_px, canvas_breast))

    def heatmap(self, mammogram: Mammogram, analysis: Analysis | None = None,
                cell: int = 32, stride: int | None = None) -> np.ndarray:
        """Occlusion sensitivity of the predicted class, over the whole breast.

        Each ``cell`` x ``cell`` square of the whole-breast input (px) is hidden in turn: its
        pixels are set to the pad value, and every candidate whose centre falls inside it is
        hidden too (its patch blanked, its cell scores set to normal tissue). The drop in the
        predicted class' probability, clipped at zero and scaled to [0, 1], is the heat of that
        square, so the map explains both branches of the classifier.

        Returns
        -------
        np.ndarray
            (H, W) float32 in [0, 1] at full resolution, zero outside the breast.
        """
        if analysis is not None and "cells" in analysis.cache:
            x, cells = analysis.cache["inputs"], analysis.cache["cells"]
            in_breast = self.breast_cells(x["canvas_breast"])
        else:
            x = self.inputs_for(mammogram)
            in_breast = self.breast_cells(x["canvas_breast"])
            cells = self.cell_map(x["canvas"], in_breast)
        cand = top_cells(cells, in_breast, self.top_k, self.cell_px)
        patches, full_xy = patches_at(mammogram, x, cand, self.patch_px)
        scores = cand.scores
        base = self.classify(x["global"], patches, scores, scan_prior(cells, in_breast))
        target = (decide(self.read_alone(base), self.single_prior) if analysis is None
                  else self.classes.index(analysis.predicted))
        g = x["global"]
        cand_g = x["global_t"].forward(full_xy)  # candidate centres on the whole-breast input
        normal = np.zeros_like(scores[0])
        normal[0] = 1.0
        stride = stride or cell
        size = g.shape[0]
        heat = np.zeros_like(g)
        count = np.zeros_like(g)
        for y in range(0, size - cell + 1, stride):
            for xx in range(0, size - cell + 1, stride):
                occluded = g.copy()
                occluded[y : y + cell, xx : xx + cell] = self.config.pad_value
                inside = ((cand_g[:, 0] >= xx) & (cand_g[:, 0] < xx + cell)
                          & (cand_g[:, 1] >= y) & (cand_g[:, 1] < y + cell))
                p, sc = patches, scores
                if inside.any():
                    p, sc = patches.copy(), scores.copy()
                    p[inside] = self.config.pad_value
                    sc[inside] = normal
                # The square's cells count as normal tissue for the scan prior too.
                corners = x["canvas_t"].forward(x["global_t"].inverse(
                    np.array([[xx, y], [xx + cell, y + cell]], np.float64)))
                c0 = np.floor(corners.min(axis=0) / self.cell_px).astype(int)
                c1 = np.ceil(corners.max(axis=0) / self.cell_px).astype(int)
                hidden = cells.copy()
                hidden[max(0, c0[1]) : max(0, c1[1]), max(0, c0[0]) : max(0, c1[0])] = normal
                drop = base[target] - self.classify(occluded, p, sc, scan_prior(hidden, in_breast))[target]
                heat[y : y + cell, xx : xx + cell] += max(0.0, float(drop))
                count[y : y + cell, xx : xx + cell] += 1
        heat = heat / np.maximum(count, 1)
        peak = float(heat.max())
        if peak > 0:
            heat /= peak
        heat = cv2.GaussianBlur(heat, (0, 0), cell / 4)
        # Inside the breast only: the letterbox's edges would otherwise show as hard lines.
        return np.clip(x["global_t"].to_original(heat), 0.0, 1.0) * x["mask"]
