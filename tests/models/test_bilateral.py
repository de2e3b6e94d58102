"""The bilateral probe: pairing by patient and the contralateral-subtracted cancer score."""

from __future__ import annotations

import json

import numpy as np

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
