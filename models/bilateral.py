"""The bilateral stage: reading a film beside the other breast of the same woman.

The shipped classifier reads one film. This stage fits a small multinomial logistic model on its
out-of-fold probabilities: the inputs are the film's log-odds of Benign and Cancer against
Normal and the same for the other breast's film (:func:`core.pairing.bilateral_features`); the
output is the three class probabilities. A lesion on one side only raises the film's log-odds
but not the other's; a dense or bright pair raises both, and the model learns to discount that.

Honest figures: both films of a woman are in the same cross-validation fold, the classifier's
probabilities are out of fold, and each fold's films are read by a bilateral model fitted on the
other folds' films only (cross-fitting). The shipped model is then fitted on all of them.
Films without a partner keep the single-film probabilities.

``python -m models.bilateral RUN`` prints the figures of a recipe run and, per model of the run,
the cancer AUC of P(cancer) alone and with the other breast's cancer log-odds subtracted (the
probe that motivated the stage). When the run saved its out-of-fold cell maps with the breast
cells (``oof_cells.npz``), it also prints the *local* asymmetry probe
(:func:`local_asymmetry`): the stage with each film's cells compared with the same place in the
other breast added to its inputs. On the MIAS folds that lowered the cross-fitted cancer AUC
(0.856 -> 0.844), so it is a probe, not part of the shipped stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from core.pairing import bilateral_features, bilateral_probs, single_features, single_film_probs
from models import evaluation as ev

CANCER = 2  # column of P(cancer) in the recipe's predictions
CLASSES = ["Normal", "Benign", "Cancer"]
REGULARISATION_C = 1.0  # scikit-learn's default inverse L2 strength; chosen before looking, kept


def contralateral(patients: np.ndarray) -> np.ndarray:
    """(N,) index of the other film of the same patient, -1 unless the patient has exactly two."""
    patients = np.asarray(patients)
    out = np.full(len(patients), -1, np.int64)
    for pid in np.unique(patients):
        films = np.flatnonzero(patients == pid)
        if len(films) == 2:
            out[films[0]], out[films[1]] = films[1], films[0]
    return out


def bilateral_score(p_cancer: np.ndarray, other: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """Cancer log-odds minus ``weight`` times the contralateral film's (unpaired films unchanged)."""
    p = np.clip(np.asarray(p_cancer, np.float64), 1e-6, 1 - 1e-6)
    logit = np.log(p / (1 - p))
    paired = other >= 0
    out = logit.copy()
    out[paired] -= weight * logit[other[paired]]
    return out


def _paired_rows(other: np.ndarray, n: int, rows: np.ndarray | None) -> np.ndarray:
    """(N,) bool: films with a partner, among ``rows`` (default: all)."""
    use = np.asarray(other) >= 0
    if rows is not None:
        mask = np.zeros(n, bool)
        mask[rows] = True
        use &= mask
    return use


def fit_bilateral(probs: np.ndarray, other: np.ndarray, y: np.ndarray,
                  rows: np.ndarray | None = None) -> dict[str, list] | None:
    """The bilateral model fitted on the paired films among ``rows`` (default: all).

    Returns ``{"coef": (3, 4), "intercept": (3,)}`` as lists (model.json's
    ``pipeline.bilateral``), or None when those films do not hold all three classes.
    """
    probs, other, y = np.asarray(probs, np.float64), np.asarray(other), np.asarray(y)
    use = _paired_rows(other, len(y), rows)
    if len(np.unique(y[use])) < 3:
        return None
    m = _logistic(bilateral_features(probs[use], probs[other[use]]), y[use])
    return {"coef": m.coef_.tolist(), "intercept": m.intercept_.tolist()}


def _logistic(x: np.ndarray, y: np.ndarray):
    """The stage's multinomial logistic model (L2, C = REGULARISATION_C) fitted on ``x``, ``y``."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny smoke runs
        return LogisticRegression(C=REGULARISATION_C, max_iter=5000).fit(x, y)


def apply_bilateral(probs: np.ndarray, other: np.ndarray, single: np.ndarray,
                    params: dict[str, list] | None, rows: np.ndarray | None = None) -> np.ndarray:
    """``single`` with the paired films among ``rows`` replaced by their bilateral reading."""
    out = np.array(single, np.float64, copy=True)
    if params is None:
        return out
    use = _paired_rows(other, len(out), rows)
    if use.any():
        out[use] = bilateral_probs(probs[use], probs[other[use]], np.asarray(params["coef"]),
                                   np.asarray(params["intercept"]))
    return out


def cross_fitted(probs: np.ndarray, single: np.ndarray, patients: np.ndarray, y: np.ndarray,
                 folds: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    """Each fold's films read by a bilateral model fitted on the other folds' films.

    Returns the probabilities and, per fold, whether a bilateral model could be fitted (a fold
    whose training films lack a class keeps the single-film probabilities).
    """
    other = contralateral(patients)
    paired = other >= 0
    if (folds[paired] != folds[other[paired]]).any():
        raise ValueError("both films of a woman must be in the same fold")
    out = np.array(single, np.float64, copy=True)
    fitted = []
    for k in np.unique(folds):
        params = fit_bilateral(probs, other, y, np.flatnonzero(folds != k))
        fitted.append(params is not None)
        out = apply_bilateral(probs, other, out, params, np.flatnonzero(folds == k))
    return out, fitted


def evaluate_bilateral(oof: dict[str, Any], single: np.ndarray, seed: int = 0,
                       class_prior: np.ndarray | None = None) -> dict[str, Any]:
    """Cross-fitted figures of the bilateral stage and the model to ship.

    Parameters
    ----------
    oof : dict
        The run's ``oof_predictions.json``.
    single : ndarray
        (N, 3) the single-film probabilities the app would show (after the shipped temperature);
        films without a partner keep these.
    class_prior : ndarray, optional
        (C,) or (N, C) priors of the balanced call (:func:`core.decision.decide`) for the report;
        None: arg-max.
    """
    y = np.asarray(oof["labels"])
    patients = np.asarray(oof["patients"])
    folds = np.asarray(oof["folds"])
    probs = np.asarray(oof["lesion_multibranch"], np.float64)
    other = contralateral(patients)
    combined, fitted = cross_fitted(probs, single, patients, y, folds)
    params = fit_bilateral(probs, other, y)
    return {
        "params": params,
        "probabilities": combined,
        "report": ev.classification_report(y, combined, CLASSES, groups=patients, seed=seed,
                                           class_prior=class_prior),
        "paired_films": int((other >= 0).sum()),
        "folds_with_model": fitted,
        "method": "multinomial logistic regression (L2, C = 1) on the log-odds of Benign and "
                  "Cancer against Normal of the film and of the other breast's film, from the "
                  "classifier's out-of-fold probabilities; each fold read by the model fitted on "
                  "the other folds (cross-fitted); the shipped model is fitted on all paired films; "
                  "films without a partner keep their single-film probabilities",
    }


def fit_single_film(probs: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None) -> dict[str, list] | None:
    """The single-film stage fitted on the films among ``rows`` (default: all): the bilateral
    model's form on the film's own log-odds only (:func:`core.pairing.single_features`).

    Returns ``{"coef": (3, 2), "intercept": (3,)}`` as lists (model.json's
    ``pipeline.single_film``), or None when those films do not hold all three classes.
    """
    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    if rows is not None:
        probs, y = probs[rows], y[rows]
    if len(np.unique(y)) < 3:
        return None
    m = _logistic(single_features(probs), y)
    return {"coef": m.coef_.tolist(), "intercept": m.intercept_.tolist()}


def evaluate_single_film(probs: np.ndarray, baseline: np.ndarray, y: np.ndarray, patients: np.ndarray,
                         folds: np.ndarray, seed: int = 0,
                         class_prior: np.ndarray | None = None) -> dict[str, Any]:
    """Cross-fitted figures of the single-film stage, and whether it ships.

    Each fold's films are read by the stage fitted on the other folds' out-of-fold probabilities
    ``probs`` (the classifier's raw ones). It ships when its cross-fitted log loss (a proper
    score: discrimination and calibration together) is lower than that of ``baseline``, the
    single-film probabilities the app would show without it (after the shipped temperature).
    A fold whose training films lack a class keeps ``baseline``.
    """
    from sklearn.metrics import log_loss

    probs, y, folds = np.asarray(probs, np.float64), np.asarray(y), np.asarray(folds)
    out = np.array(baseline, np.float64, copy=True)
    fitted = []
    for k in np.unique(folds):
        params = fit_single_film(probs, y, np.flatnonzero(folds != k))
        fitted.append(params is not None)
        if params is not None:
            test = folds == k
            out[test] = single_film_probs(probs[test], np.asarray(params["coef"]),
                                          np.asarray(params["intercept"]))
    labels = list(range(len(CLASSES)))
    loss = float(log_loss(y, np.clip(out, 1e-12, 1.0), labels=labels))
    loss_before = float(log_loss(y, np.clip(baseline, 1e-12, 1.0), labels=labels))
    params = fit_single_film(probs, y)
    return {
        "params": params,
        "shipped": bool(params is not None and all(fitted) and loss < loss_before),
        "probabilities": out,
        "report": ev.classification_report(y, out, CLASSES, groups=patients, seed=seed,
                                           class_prior=class_prior),
        "log_loss": loss, "log_loss_before": loss_before, "folds_with_model": fitted,
        "method": "multinomial logistic regression (L2, C = 1) on the film's own log-odds of Benign "
                  "and Cancer against Normal, from the classifier's out-of-fold probabilities; each "
                  "fold read by the model fitted on the other folds (cross-fitted); shipped, in "
                  "place of the temperature, when its cross-fitted log loss is lower than the "
                  "single-film probabilities' after the temperature",
    }


def local_asymmetry(cells: np.ndarray, breast: np.ndarray, other_cells: np.ndarray,
                    other_breast: np.ndarray, window: int = 5, top: int = 3) -> np.ndarray:
    """(2,) how far the film's most lesion-like cells stand above the other breast at that place.

    For benign, then malignant: each breast cell's log-odds against normal tissue, minus the
    largest log-odds among the other film's cells in the ``window`` x ``window`` cells around
    the same cell, averaged over the film's ``top`` largest differences. Both canvases have the
    chest wall at x = 0 and the breast's top at y = 0 (:mod:`core.preprocess`), so the same cell
    is roughly the same place in both breasts; the window allows for positioning. Cells of the
    other film outside its breast count as its 10th-percentile breast cell.

    ``cells``/``other_cells`` are (rows, cols, 3) cell probabilities (normal tissue, benign,
    malignant); ``breast``/``other_breast`` (rows, cols) bool.
    """
    import cv2

    def log_odds(c: np.ndarray, k: int) -> np.ndarray:
        c = np.clip(np.asarray(c, np.float64), 1e-6, 1.0)
        return np.log(c[..., k]) - np.log(c[..., 0])

    out = np.zeros(2)
    if not breast.any():
        return out
    for j, k in enumerate((1, 2)):
        mine, theirs = log_odds(cells, k), log_odds(other_cells, k)
        fill = float(np.percentile(theirs[other_breast], 10)) if other_breast.any() else 0.0
        theirs = np.where(other_breast, theirs, fill).astype(np.float32)
        nearby = cv2.dilate(theirs, np.ones((window, window), np.uint8))  # max over the window
        diff = np.sort((mine - nearby)[breast])
        out[j] = float(diff[-top:].mean())
    return out


def _cross_fitted_features(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each fold's probabilities from a multinomial logistic model fitted on the other folds."""
    out = np.zeros((len(y), len(CLASSES)))
    for k in np.unique(folds):
        out[folds == k] = _logistic(x[folds != k], y[folds != k]).predict_proba(x[folds == k])
    return out


def asymmetry_probe(oof: dict[str, Any], cells: np.ndarray, breast: np.ndarray, window: int = 5,
                    top: int = 3, seed: int = 0, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Cross-fitted reports of the bilateral stage on the paired films, without and with
    :func:`local_asymmetry` (both ways, both lesion classes) among its inputs.

    ``cells`` (N, rows, cols, 3) are the run's out-of-fold cell maps, ``breast`` (N, rows, cols)
    its breast cells, in ``oof``'s film order.
    """
    y = np.asarray(oof["labels"])
    patients = np.asarray(oof["patients"])
    folds = np.asarray(oof["folds"])
    probs = np.asarray(oof["lesion_multibranch"], np.float64)
    other = contralateral(patients)
    use = np.flatnonzero(other >= 0)
    base = bilateral_features(probs[use], probs[other[use]])
    asym = np.stack([np.concatenate([local_asymmetry(cells[i], breast[i], cells[j], breast[j], window, top),
                                     local_asymmetry(cells[j], breast[j], cells[i], breast[i], window, top)])
                     for i, j in zip(use, other[use], strict=True)])
    out = {}
    for name, x in (("bilateral", base), ("bilateral + local asymmetry", np.hstack([base, asym]))):
        p = _cross_fitted_features(x, y[use], folds[use])
        out[name] = ev.classification_report(y[use], p, CLASSES, groups=patients[use], seed=seed,
                                             n_boot=n_boot)
    return out


def _auc_with_interval(positive: np.ndarray, score: np.ndarray, groups: np.ndarray, seed: int,
                       n_boot: int) -> dict[str, Any]:
    point = ev.one_vs_rest_auc(positive, score)
    values = [ev.one_vs_rest_auc(positive[i], score[i])
              for i in ev.bootstrap_samples(len(score), n_boot, seed, groups)]
    kept = np.array([v for v in values if v is not None])
    ci = [float(v) for v in np.percentile(kept, [2.5, 97.5])] if len(kept) else None
    return {"value": point, "ci95": ci}


def report(oof: dict[str, Any], seed: int = 0, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Per model: cancer AUC of P(cancer) alone and with the contralateral subtracted."""
    y = np.asarray(oof["labels"])
    patients = np.asarray(oof["patients"])
    other = contralateral(patients)
    out = {}
    for name in ("lesion_multibranch", "patch_scan", "seed_multibranch"):
        if name not in oof:
            continue
        p = np.asarray(oof[name], np.float64)[:, CANCER]
        out[name] = {
            "single": _auc_with_interval(y == CANCER, p, patients, seed, n_boot),
            "bilateral": _auc_with_interval(y == CANCER, bilateral_score(p, other), patients, seed, n_boot),
            "paired_films": int((other >= 0).sum()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.bilateral", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="run folder of the bundle recipe (oof_predictions.json)")
    p.add_argument("--window", type=int, default=5, help="local asymmetry probe: window in cells")
    p.add_argument("--top", type=int, default=3, help="local asymmetry probe: cells averaged")
    args = p.parse_args(argv)
    if args.window < 1 or args.top < 1:
        p.error("--window and --top must be at least 1")
    path = args.run / "oof_predictions.json"
    try:
        oof = json.loads(path.read_text())
        result = report(oof)
        staged = (evaluate_bilateral(oof, np.asarray(oof["lesion_multibranch"], np.float64))
                  if "folds" in oof and "lesion_multibranch" in oof else None)
        probe = None
        cells_path = args.run / "oof_cells.npz"
        if staged is not None and cells_path.exists():
            path = cells_path
            with np.load(cells_path) as saved:
                if "breast" in saved.files:
                    probe = asymmetry_probe(oof, saved["cells"], saved["breast"], args.window, args.top)
    except (OSError, json.JSONDecodeError, KeyError, ValueError, IndexError) as exc:
        print(f"models.bilateral: cannot read {path} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    print("| Model | films paired | cancer AUC, one film | cancer AUC, minus the other breast |")
    print("|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['paired_films']} | {ev.format_figure(r['single'])} | "
              f"{ev.format_figure(r['bilateral'])} |")
    if staged is not None:
        print()
        print(ev.compare_table({"one film (T = 1)": ev.classification_report(
            np.asarray(oof["labels"]), np.asarray(oof["lesion_multibranch"]), CLASSES,
            groups=np.asarray(oof["patients"])), "beside the other breast (cross-fitted)": staged["report"]}))
    if probe is not None:
        print()
        print(f"Local asymmetry probe (window {args.window} cells, top {args.top}; paired films only, "
              "cross-fitted):")
        print(ev.compare_table(probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
