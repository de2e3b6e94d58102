"""The bilateral probe: pairing by patient and the contralateral-subtracted cancer score."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.bilateral import bilateral_score, contralateral, main, report


def test_contralateral_pairs_only_patients_with_two_films():
    patients = np.array(["a", "b", "a", "c", "c", "c", "d"])
    assert contralateral(patients).tolist() == [2, -1, 0, -1, -1, -1, -1]


def test_subtracting_the_other_breast_removes_a_per_woman_offset():
    """Each woman's films share a random offset (density, exposure); one breast of some women has
    cancer, which adds a smaller amount. The single-film score is blurred by the offsets; the
    bilateral score ranks every cancer first."""
    rng = np.random.default_rng(0)
    women = 40
    offset = rng.normal(0, 3, women)
    cancer = np.zeros(2 * women, bool)
    cancer[0 : 2 * women : 4] = True  # the right breast of every other woman
    logit = np.repeat(offset, 2) + cancer * 1.0 + rng.normal(0, 0.05, 2 * women)
    p = 1 / (1 + np.exp(-logit))
    patients = np.repeat(np.arange(women), 2)
    labels = np.where(cancer, 2, 0)
    probs = np.stack([1 - p, np.zeros_like(p), p], axis=1)
    r = report({"labels": labels.tolist(), "patients": patients.tolist(),
                "patch_scan": probs.tolist()}, n_boot=50)["patch_scan"]
    assert r["single"]["value"] < 0.8
    assert r["bilateral"]["value"] == 1.0
    assert r["paired_films"] == 2 * women
    # Unpaired films keep their own log-odds.
    lone = bilateral_score(np.array([0.5, 0.9]), np.array([-1, -1]))
    np.testing.assert_allclose(lone, [0.0, np.log(9.0)])


def test_cli_reports_a_run_and_refuses_a_missing_one(tmp_path, capsys):
    oof = {"labels": [2, 0, 0, 0], "patients": ["a", "a", "b", "b"],
           "lesion_multibranch": [[0.2, 0.1, 0.7], [0.6, 0.2, 0.2], [0.5, 0.2, 0.3], [0.5, 0.3, 0.2]]}
    (tmp_path / "oof_predictions.json").write_text(json.dumps(oof))
    assert main([str(tmp_path)]) == 0
    assert "| lesion_multibranch | 4 |" in capsys.readouterr().out
    assert main([str(tmp_path / "none")]) == 2
    assert "cannot read" in capsys.readouterr().err


def _women(n_women: int, seed: int):
    """Synthetic out-of-fold readings: each woman's two films share an offset on every class's
    log-odds (density, exposure); one film of some women has a lesion that adds to its own."""
    rng = np.random.default_rng(seed)
    offset = np.repeat(rng.normal(0, 1.5, (n_women, 2)), 2, axis=0)
    labels = np.zeros(2 * n_women, np.int64)
    labels[0::6] = 2
    labels[2::6] = 1
    lift = np.zeros((2 * n_women, 2))
    lift[labels == 1, 0] = 1.0
    lift[labels == 2, 1] = 1.5
    logits = np.concatenate([np.zeros((2 * n_women, 1)), offset + lift + rng.normal(0, 0.3, lift.shape)], 1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    patients = np.repeat(np.arange(n_women), 2)
    folds = (patients // 3) % 3  # every fold holds women of each kind
    return probs, labels, patients, folds


def test_the_fitted_model_is_what_core_applies():
    from sklearn.linear_model import LogisticRegression

    from core.pairing import bilateral_features, bilateral_probs
    from models.bilateral import fit_bilateral

    probs, y, patients, _ = _women(60, 0)
    other = contralateral(patients)
    params = fit_bilateral(probs, other, y)
    assert np.shape(params["coef"]) == (3, 4) and len(params["intercept"]) == 3
    x = bilateral_features(probs, probs[other])
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(bilateral_probs(probs, probs[other], np.array(params["coef"]),
                                               np.array(params["intercept"])), sk, atol=1e-6)
    # Without all three classes there is nothing to fit.
    assert fit_bilateral(probs, other, np.where(y == 1, 0, y)) is None


def test_cross_fitting_never_reads_a_fold_with_its_own_labels():
    from models.bilateral import cross_fitted

    probs, y, patients, folds = _women(60, 1)
    out, fitted = cross_fitted(probs, probs, patients, y, folds)
    assert fitted == [True, True, True]
    shuffled = y.copy()
    rng = np.random.default_rng(2)
    shuffled[folds == 0] = rng.permutation(shuffled[folds == 0])
    again, _ = cross_fitted(probs, probs, patients, shuffled, folds)
    np.testing.assert_allclose(again[folds == 0], out[folds == 0])  # fold 0 read by folds 1-2
    assert not np.allclose(again[folds != 0], out[folds != 0])
    # Partners split across folds would leak a woman into her own model: refused.
    with pytest.raises(ValueError, match="same fold"):
        cross_fitted(probs, probs, patients, y, np.arange(len(y)) % 3)


def test_the_stage_beats_one_film_when_the_other_breast_carries_the_offset():
    """The per-woman offset hides lesions from a single film; the pair model removes it."""
    from models import evaluation as ev
    from models.bilateral import evaluate_bilateral

    probs, y, patients, folds = _women(90, 3)
    oof = {"labels": y.tolist(), "patients": patients.tolist(), "folds": folds.tolist(),
           "lesion_multibranch": probs.tolist()}
    staged = evaluate_bilateral(oof, probs)
    single = ev.classification_report(y, probs, ["Normal", "Benign", "Cancer"], groups=patients, n_boot=20)
    assert staged["paired_films"] == len(y) and staged["params"] is not None
    assert staged["report"]["macro_auc"]["value"] > single["macro_auc"]["value"] + 0.05
    # An unpaired film keeps its single-film probabilities.
    lone = {**oof, "patients": [*oof["patients"][:-1], "alone"]}
    kept = evaluate_bilateral(lone, probs)["probabilities"]
    np.testing.assert_allclose(kept[-1], probs[-1])


def _cells(malignant: dict[tuple[int, int], float], shape=(8, 6)) -> np.ndarray:
    """A cell map of normal tissue (P(malignant) 0.01) with the given malignant cells."""
    c = np.zeros((*shape, 3))
    c[..., 0], c[..., 1], c[..., 2] = 0.98, 0.01, 0.01
    for (r, col), p in malignant.items():
        c[r, col] = [1 - p - 0.01, 0.01, p]
    return c


def test_local_asymmetry_sees_a_lesion_the_other_breast_lacks_at_that_place():
    from models.bilateral import local_asymmetry

    breast = np.ones((8, 6), bool)
    lesion = _cells({(3, 2): 0.9})
    odds = np.log(0.9 / 0.09) - np.log(0.01 / 0.98)  # its malignant log-odds above normal tissue
    # Other breast normal: the lesion stands out by its log-odds (top 1).
    assert local_asymmetry(lesion, breast, _cells({}), breast, top=1)[1] == pytest.approx(odds, rel=1e-5)
    # The same finding one cell away in the other breast (within the window): nothing stands out.
    assert local_asymmetry(lesion, breast, _cells({(4, 3): 0.9}), breast, top=1)[1] == pytest.approx(0.0, abs=1e-5)
    # ... but four cells away it is outside a 5-cell window and the lesion stands out again.
    far = local_asymmetry(lesion, breast, _cells({(7, 5): 0.9}), breast, top=1)[1]
    assert far == pytest.approx(odds, rel=1e-5)
    # An empty breast gives zeros.
    assert local_asymmetry(lesion, np.zeros_like(breast), _cells({}), breast).tolist() == [0.0, 0.0]


def test_cli_prints_the_asymmetry_probe_when_the_run_saved_cell_maps(tmp_path, capsys):
    probs, y, patients, folds = _women(30, 5)
    (tmp_path / "oof_predictions.json").write_text(json.dumps(
        {"labels": y.tolist(), "patients": patients.tolist(), "folds": folds.tolist(),
         "lesion_multibranch": probs.tolist()}))
    rng = np.random.default_rng(0)
    cells = rng.dirichlet([8, 1, 1], (len(y), 8, 6))
    np.savez_compressed(tmp_path / "oof_cells.npz", cells=cells, breast=np.ones((len(y), 8, 6), bool))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Local asymmetry probe" in out and "| bilateral + local asymmetry | 60 |" in out
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--window", "0"])


def test_single_film_stage_is_cross_fitted_and_ships_only_when_it_lowers_the_log_loss():
    """A classifier whose cancer signal leaks into its benign log-odds: the stage, fitted on the
    other folds, reorders the films (higher cancer AUC) and lowers the log loss, so it ships;
    on readings that carry nothing it does not beat the class shares and does not ship."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from core.pairing import single_features, single_film_probs
    from models.bilateral import evaluate_single_film, fit_single_film

    rng = np.random.default_rng(5)
    n = 300
    y = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])
    logits = np.zeros((n, 3))
    logits[:, 1] = 1.2 * (y == 2) + 0.8 * (y == 1) + rng.normal(0, 0.6, n)  # cancer shows as benign
    logits[:, 2] = 0.5 * (y == 2) - 0.6 * (y == 1) + rng.normal(0, 0.6, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    patients = np.arange(n)
    folds = np.arange(n) % 5
    stage = evaluate_single_film(probs, probs, y, patients, folds)
    assert stage["shipped"] and stage["log_loss"] < stage["log_loss_before"]
    assert roc_auc_score(y == 2, stage["probabilities"][:, 2]) > roc_auc_score(y == 2, probs[:, 2]) + 0.05
    # Fold 0 is read by the model of folds 1-4: its own labels do not move its reading.
    shuffled = y.copy()
    shuffled[folds == 0] = rng.permutation(shuffled[folds == 0])
    again = evaluate_single_film(probs, probs, shuffled, patients, folds)["probabilities"]
    np.testing.assert_allclose(again[folds == 0], stage["probabilities"][folds == 0])
    # The shipped parameters are what core applies.
    x = single_features(probs)
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(x, y).predict_proba(x)
    params = fit_single_film(probs, y)
    np.testing.assert_allclose(single_film_probs(probs, np.array(params["coef"]), np.array(params["intercept"])),
                               sk, atol=1e-6)
    # Readings that carry nothing, against the training folds' class shares: not shipped.
    noise = rng.dirichlet(np.ones(3), size=n)
    shares = np.stack([np.bincount(y[folds != f], minlength=3) / (folds != f).sum() for f in folds])
    flat = evaluate_single_film(noise, shares, y, patients, folds)
    assert not flat["shipped"] and flat["log_loss"] >= flat["log_loss_before"]
    assert fit_single_film(probs, np.where(y == 1, 0, y)) is None
