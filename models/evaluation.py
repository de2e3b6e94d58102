"""How good a model is, with honest uncertainty: classification, calibration and lesion figures.

numpy, scipy and scikit-learn only (no TensorFlow), so reports can be recomputed from saved
predictions anywhere. Every figure a report gives comes with a bootstrap 95 % interval; when
patient ids are passed the bootstrap resamples patients, not images, because images of one
patient are not independent and resampling them one by one gives intervals that are too narrow.

Conventions
-----------
``y_true``  (N,) int labels in ``[0, C)``, in the order of ``classes``.
``probs``   (N, C) float class probabilities, rows summing to 1.
``groups``  (N,) patient ids (any hashable values), or ``None`` for independent images.
Undefined figures (precision of a class never predicted, AUC with one class absent) are
``None`` so that reports stay plain JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from core.decision import RULE_TEXT, decide

log = logging.getLogger(__name__)

__all__ = [
    "ECE_BINS",
    "apply_temperature",
    "bootstrap_samples",
    "classification_report",
    "compare_table",
    "confusion_matrix",
    "dice",
    "expected_calibration_error",
    "fit_temperature",
    "fold_class_priors",
    "format_figure",
    "iou",
    "lesion_candidates",
    "lesion_detection_sensitivity",
    "one_vs_rest_auc",
    "reliability_bins",
]

ECE_BINS = 15  # equal-width bins of top-label confidence
_EPS = 1e-12  # floor for probabilities before taking logs


# -- checking inputs ------------------------------------------------------------------------


def _check_predictions(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be an (N, C) array, got shape {p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"y_true must be (N,) with N = {len(p)} rows of probabilities, got {y.shape}")
    if len(y) == 0:
        raise ValueError("no predictions to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class labels")
        y = y.astype(np.int64)
    c = p.shape[1] if n_classes is None else n_classes
    if p.shape[1] != c:
        raise ValueError(f"probabilities have {p.shape[1]} columns but there are {c} classes")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinity")
    return y.astype(np.int64), p


# -- point figures ----------------------------------------------------------------------------


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with true classes in rows and predicted classes in columns, (C, C) int64."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _cm_figures(cm: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy and per-class precision/recall/F1 from a confusion matrix.

    Balanced accuracy is the mean recall over the classes present in ``y_true`` (as in
    scikit-learn); F1 is ``2 TP / (2 TP + FP + FN)``, undefined only when the class is neither
    present nor predicted.
    """
    tp = np.diag(cm).astype(np.float64)
    true_n = cm.sum(axis=1)
    pred_n = cm.sum(axis=0)
    recall = [_ratio(tp[k], true_n[k]) for k in range(len(cm))]
    present = [r for r in recall if r is not None]
    return {
        "accuracy": _ratio(tp.sum(), cm.sum()),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "precision": [_ratio(tp[k], pred_n[k]) for k in range(len(cm))],
        "recall": recall,
        "f1": [_ratio(2 * tp[k], true_n[k] + pred_n[k]) for k in range(len(cm))],
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(xs), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new) - 1]
    return ranks


def one_vs_rest_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (bool) against the rest.

    The Mann-Whitney form with average ranks for ties, equal to
    ``sklearn.metrics.roc_auc_score``; ``None`` when either side is empty.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def reliability_bins(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Top-label confidence against accuracy in ``n_bins`` equal-width bins.

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (a confidence of exactly 0
    falls in the first bin). Confidence is the largest probability of a row; a row is correct when
    its arg-max is the true label.

    Returns
    -------
    dict
        ``edges`` (n_bins + 1,), ``count`` (n_bins,) int, ``confidence`` and ``accuracy``
        (n_bins,) float with NaN in empty bins.
    """
    y, p = _check_predictions(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "confidence": mean_conf,
        "accuracy": mean_acc,
    }


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """Top-label ECE: ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over the bins of
    :func:`reliability_bins` (Guo et al. 2017)."""
    b = reliability_bins(y_true, probs, n_bins)
    used = b["count"] > 0
    weights = b["count"][used] / b["count"].sum()
    return float(np.sum(weights * np.abs(b["accuracy"][used] - b["confidence"][used])))


def _figures(y: np.ndarray, p: np.ndarray, prior: np.ndarray | None = None) -> dict[str, Any]:
    """Every figure of a report on one (re)sample, as plain floats or None."""
    n_classes = p.shape[1]
    cm = confusion_matrix(y, decide(p, prior), n_classes)
    out = _cm_figures(cm)
    out["auc"] = [one_vs_rest_auc(y == k, p[:, k]) for k in range(n_classes)]
    defined = [a for a in out["auc"] if a is not None]
    # Macro AUC needs every class present, or it silently averages a different set of classes.
    out["macro_auc"] = float(np.mean(defined)) if len(defined) == n_classes else None
    out["ece"] = expected_calibration_error(y, p)
    out["confusion_matrix"] = cm
    return out


# -- bootstrap --------------------------------------------------------------------------------


def bootstrap_samples(
    n: int, n_boot: int, seed: int = 0, groups: Sequence[Any] | np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Index arrays of bootstrap resamples.

    Without ``groups`` each resample draws ``n`` images with replacement. With ``groups`` (one
    patient id per image) it draws as many patients as there are, with replacement, and takes
    every image of each drawn patient, so a resample holds all or none of a patient's images
    (a patient drawn twice appears twice) and its length varies.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, size=n)
        return
    g = np.asarray(groups)
    if len(g) != n:
        raise ValueError(f"groups must give one patient id per image ({n}), got {len(g)}")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    for _ in range(n_boot):
        picks = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[i] for i in picks])


def _interval(values: list[float | None], point: float | None) -> dict[str, Any]:
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    if point is None or len(kept) == 0:
        ci = None
    else:
        ci = [float(v) for v in np.percentile(kept, [2.5, 97.5])]
    return {"value": point, "ci95": ci, "n_boot_used": int(len(kept))}


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
    class_prior: np.ndarray | None = None,
) -> dict[str, Any]:
    """Classification figures with bootstrap 95 % intervals.

    Parameters
    ----------
    y_true : array-like
        (N,) int labels in ``[0, C)``.
    probs : np.ndarray
        (N, C) float class probabilities in ``classes`` order; the prediction is the arg-max.
    classes : sequence of str
        C class names in output order.
    n_boot : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling, so a report is reproducible.
    groups : array-like, optional
        (N,) patient ids; when given the bootstrap resamples patients (see
        :func:`bootstrap_samples`).
    class_prior : np.ndarray, optional
        (C,) or one per image (N, C): the predicted class is then the balanced call
        :func:`core.decision.decide` (arg-max of the probabilities over the prior) instead of
        the arg-max. Accuracy, recall, precision and the confusion matrix follow the call; AUC
        and ECE depend on the probabilities only.

    Returns
    -------
    dict
        JSON-serialisable::

            classes, n, n_per_class {class: int}, n_patients (or None), n_boot, seed,
            accuracy, balanced_accuracy, macro_auc, ece:   {value, ci95: [lo, hi], n_boot_used}
            per_class {class: {precision, recall, f1, auc: {value, ci95, n_boot_used}}}
            confusion_matrix [[int]] (rows true, columns predicted), method (str)

        ``value`` is measured on all the data; ``ci95`` is the 2.5th and 97.5th percentile over
        the resamples where the figure is defined (``n_boot_used`` of them); both are ``None``
        when the figure is undefined on the data.
    """
    classes = [str(c) for c in classes]
    y, p = _check_predictions(y_true, probs, len(classes))
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"groups must give one patient id per image ({len(y)}), got {len(groups)}")
    if n_boot < 0:
        raise ValueError("n_boot must be >= 0")
    prior = None
    if class_prior is not None:
        prior = np.broadcast_to(np.asarray(class_prior, np.float64), p.shape)
        if not (np.isfinite(prior).all() and (prior > 0).all()):
            raise ValueError("class_prior must be finite numbers > 0")
    point = _figures(y, p, prior)
    boots = [_figures(y[i], p[i], None if prior is None else prior[i])
             for i in bootstrap_samples(len(y), n_boot, seed, groups)]

    def interval(key: str, k: int | None = None) -> dict[str, Any]:
        if k is None:
            return _interval([b[key] for b in boots], point[key])
        return _interval([b[key][k] for b in boots], point[key][k])

    per_class = {
        name: {m: interval(m, k) for m in ("precision", "recall", "f1", "auc")}
        for k, name in enumerate(classes)
    }
    n_patients = None if groups is None else int(len(np.unique(np.asarray(groups))))
    unit = f"{n_patients} patients (all images of a drawn patient)" if groups is not None else f"{len(y)} images"
    method = (
        f"Point figures on all {len(y)} images. 95 % intervals: percentile bootstrap, {n_boot} "
        f"resamples of {unit} with replacement, seed {seed}; resamples where a figure is "
        "undefined (e.g. a class absent for its one-vs-rest AUC) are skipped for that figure. "
        + ("Prediction = arg-max of the probabilities. " if prior is None else
           f"Prediction = {RULE_TEXT}, the prior being the class shares of the films the model "
           "was trained on. ")
        + "AUC one-vs-rest per class; macro AUC = their "
        f"unweighted mean. ECE: top-label confidence, {ECE_BINS} equal-width bins."
    )
    return {
        "classes": classes,
        "n": int(len(y)),
        "n_per_class": {name: int((y == k).sum()) for k, name in enumerate(classes)},
        "n_patients": n_patients,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "accuracy": interval("accuracy"),
        "balanced_accuracy": interval("balanced_accuracy"),
        "macro_auc": interval("macro_auc"),
        "ece": interval("ece"),
        "per_class": per_class,
        "confusion_matrix": point["confusion_matrix"].tolist(),
        "decision": "argmax" if prior is None else "balanced",
        "method": method,
    }


def fold_class_priors(labels: Sequence[int] | np.ndarray, folds: Sequence[int] | np.ndarray,
                      n_classes: int) -> np.ndarray:
    """(N, C): for each image, the class shares of the images outside its fold.

    The prior a cross-validated image is called with (``classification_report(class_prior=)``)
    comes from its fold's training images only, as a shipped prior comes from the shipped
    model's training images.
    """
    labels, folds = np.asarray(labels, np.int64), np.asarray(folds)
    if labels.shape != folds.shape:
        raise ValueError(f"one fold per label: {labels.shape} labels, {folds.shape} folds")
    out = np.zeros((len(labels), n_classes))
    for k in np.unique(folds):
        train = labels[folds != k]
        if len(train) == 0:
            raise ValueError("every fold needs training images outside it")
        out[folds == k] = np.bincount(train, minlength=n_classes)[:n_classes] / len(train)
    if (out <= 0).any():
        raise ValueError("every class needs training images outside every fold")
    return out


# -- temperature scaling ----------------------------------------------------------------------


def _as_logits(logits_or_probs: np.ndarray) -> np.ndarray:
    """Rows that are non-negative and sum to 1 are probabilities (logged); anything else logits."""
    z = np.asarray(logits_or_probs, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"expected an (N, C) array, got shape {z.shape}")
    if np.all(z >= 0) and np.allclose(z.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.clip(z, _EPS, 1.0))
    return z


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fit_temperature(
    logits_or_probs: np.ndarray, y_true: Sequence[int] | np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature ``T`` minimising the mean negative log-likelihood of ``softmax(z / T)``.

    Parameters
    ----------
    logits_or_probs : np.ndarray
        (N, C) logits, or probabilities (every row non-negative and summing to 1), which are
        turned into logits by ``log p``: softmax is unchanged by a per-row constant, so the two
        give the same ``T``.
    y_true : array-like
        (N,) int labels.
    bounds : (float, float)
        Search range of ``T``; a bounded scalar search over ``log T`` (Brent's method).

    Returns
    -------
    float
        ``T > 1`` softens over-confident predictions, ``T < 1`` sharpens under-confident ones.
    """
    z = _as_logits(logits_or_probs)
    y, _ = _check_predictions(y_true, z)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z / np.exp(log_t))[rows, y].mean())

    res = optimize.minimize_scalar(
        nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded", options={"xatol": 1e-5}
    )
    t = float(np.exp(res.x))
    if not (bounds[0] * 1.01 < t < bounds[1] / 1.01):
        log.warning("temperature %.3g is at the edge of the search range %s", t, bounds)
    return t


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` over the last axis, the same as the app applies at inference.

    Probabilities are floored at 1e-12 before the log. Returns float64 of the input's shape.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)) / float(temperature)
    return np.exp(_log_softmax(z))


# -- segmentation -----------------------------------------------------------------------------


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"prediction {a.shape} and truth {b.shape} differ in shape")
    return a, b


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2 |A ∩ B| / (|A| + |B|)`` of two bool masks; 1.0 when both are empty
    (nothing to find and nothing found is a perfect answer)."""
    a, b = _pair(pred, truth)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union ``|A ∩ B| / |A ∪ B|`` of two bool masks; 1.0 when both are empty."""
    a, b = _pair(pred, truth)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for lesions and plateaus


def lesion_candidates(prob_map: np.ndarray, peak_radius: int = 2, min_score: float = 0.0) -> np.ndarray:
    """Local maxima of a probability map, one per plateau, as candidates ``(row, col, score)``.

    A pixel is a peak when it equals the maximum of the ``(2 r + 1)`` square around it and its
    value exceeds ``min_score``. 8-connected peak pixels of one plateau form one candidate,
    placed at its pixel nearest to the plateau's centroid; its score is the peak value.

    Returns
    -------
    np.ndarray
        (K, 3) float64 rows ``(row, col, score)`` sorted by descending score.
    """
    p = np.asarray(prob_map, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probability map must be 2-D, got shape {p.shape}")
    peaks = (p == ndimage.maximum_filter(p, size=2 * peak_radius + 1, mode="nearest")) & (p > min_score)
    labels, n = ndimage.label(peaks, structure=_EIGHT)
    out = np.empty((n, 3), dtype=np.float64)
    for i, sl in enumerate(ndimage.find_objects(labels)):
        rr, cc = np.nonzero(labels[sl] == i + 1)
        rr, cc = rr + sl[0].start, cc + sl[1].start
        j = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
        out[i] = (rr[j], cc[j], p[rr[j], cc[j]])
    return out[np.argsort(-out[:, 2], kind="stable")]


def lesion_detection_sensitivity(
    prob_maps: Sequence[np.ndarray],
    truth_masks: Sequence[np.ndarray],
    fp_per_image: Sequence[float] = (1, 2),
    peak_radius: int = 2,
    min_score: float = 0.0,
) -> dict[str, Any]:
    """Lesion-level sensitivity at fixed average false positives per image (FROC points).

    Definitions
    -----------
    - Lesion: an 8-connected component of a ground-truth mask.
    - Candidate: a local maximum of the probability map (:func:`lesion_candidates`), scored by
      its peak value.
    - Hit: a candidate whose pixel lies inside a lesion. A lesion is detected at threshold ``t``
      when at least one of its candidates scores above ``t``; further candidates in the same
      lesion are neither hits nor false positives.
    - False positive: a candidate outside every lesion.
    - Operating point for ``f`` false positives per image: keep candidates scoring strictly
      above ``t``, where ``t`` is the smallest threshold leaving at most ``floor(f * n_images)``
      false positives over all images (``t = min_score`` when there are fewer false positives
      than that). Sensitivity = detected lesions / all lesions.

    Parameters
    ----------
    prob_maps, truth_masks : sequences of np.ndarray
        Per image, an (H, W) float map in [0, 1] and an (H, W) bool mask of the same shape.
    fp_per_image : sequence of float
        Average false positives per image at which to report sensitivity.
    peak_radius, min_score : see :func:`lesion_candidates`.

    Returns
    -------
    dict
        ``n_images``, ``n_lesions``, ``n_candidates``, ``operating_points`` (list of
        ``{fp_per_image, threshold, sensitivity, detected, false_positives}``; sensitivity is
        ``None`` without lesions), ``method``.
    """
    if len(prob_maps) != len(truth_masks):
        raise ValueError(f"{len(prob_maps)} probability maps but {len(truth_masks)} truth masks")
    if len(prob_maps) == 0:
        raise ValueError("no images to evaluate")
    lesion_best: list[float] = []  # best candidate score inside each lesion (-inf: none)
    fp_scores: list[float] = []
    n_candidates = 0
    for prob, truth in zip(prob_maps, truth_masks, strict=True):
        prob = np.asarray(prob, dtype=np.float64)
        truth = np.asarray(truth, dtype=bool)
        if prob.shape != truth.shape:
            raise ValueError(f"probability map {prob.shape} and truth mask {truth.shape} differ")
        lesions, n_lesions = ndimage.label(truth, structure=_EIGHT)
        best = np.full(n_lesions + 1, -np.inf)
        cands = lesion_candidates(prob, peak_radius, min_score)
        n_candidates += len(cands)
        for r, c, s in cands:
            k = lesions[int(r), int(c)]
            if k == 0:
                fp_scores.append(float(s))
            else:
                best[k] = max(best[k], s)
        lesion_best.extend(best[1:].tolist())
    best_arr = np.array(lesion_best)
    fp_sorted = np.sort(np.array(fp_scores))[::-1]
    n_images = len(prob_maps)
    points = []
    for f in fp_per_image:
        allowed = int(np.floor(f * n_images + 1e-9))
        t = float(fp_sorted[allowed]) if allowed < len(fp_sorted) else float(min_score)
        detected = int((best_arr > t).sum())
        points.append({
            "fp_per_image": float(f),
            "threshold": t,
            "sensitivity": detected / len(best_arr) if len(best_arr) else None,
            "detected": detected,
            "false_positives": int((fp_sorted > t).sum()),
        })
    return {
        "n_images": n_images,
        "n_lesions": int(len(best_arr)),
        "n_candidates": int(n_candidates),
        "operating_points": points,
        "method": (
            f"Candidates: local maxima of each probability map ({2 * peak_radius + 1} px window, "
            f"score > {min_score:g}), one per plateau. A lesion (8-connected truth component) is "
            "detected when a candidate inside it scores above the threshold; candidates outside "
            "every lesion are false positives. The threshold is the lowest leaving at most "
            "floor(f x images) false positives in total."
        ),
    }


# -- side by side -----------------------------------------------------------------------------


def format_figure(fig: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``{value, ci95}`` as ``"0.812 (0.750–0.860)"``; ``"n/a"`` when undefined."""
    if not fig or fig.get("value") is None:
        return "n/a"
    text = f"{fig['value']:.{digits}f}"
    if fig.get("ci95"):
        lo, hi = fig["ci95"]
        text += f" ({lo:.{digits}f}–{hi:.{digits}f})"
    return text


def compare_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the main figures of several :func:`classification_report` results.

    One row per model; columns n, accuracy, balanced accuracy, macro AUC, each class' AUC
    (union of the classes, in order of first appearance) and ECE, each as
    ``value (95 % interval)``; ``n/a`` where undefined or absent.
    """
    classes: list[str] = []
    for report in results.values():
        for name in report.get("classes", []):
            if name not in classes:
                classes.append(name)
    head = ["Model", "n", "Accuracy", "Balanced accuracy", "Macro AUC"]
    head += [f"AUC {c}" for c in classes] + ["ECE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for model, r in results.items():
        per_class = r.get("per_class", {})
        row = [str(model), str(r.get("n", "n/a")), format_figure(r.get("accuracy")),
               format_figure(r.get("balanced_accuracy")), format_figure(r.get("macro_auc"))]
        row += [format_figure(per_class.get(c, {}).get("auc")) for c in classes]
        row.append(format_figure(r.get("ece")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
