"""core.pairing: who is the other breast of a film, and the bilateral reading of a pair."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from core.pairing import (
    FilmId,
    _dicom_film_id,
    bilateral_features,
    bilateral_probs,
    check_bilateral,
    film_id,
    find_other_breast,
    pair_files,
    pair_up,
    search_other_breast,
)

CLASSES = ("Normal", "Benign", "Cancer")


def test_mias_numbering_pairs_films_2k_minus_1_and_2k(tmp_path):
    a, b, c = film_id(tmp_path / "mdb001.png"), film_id(tmp_path / "mdb002.png"), film_id(tmp_path / "mdb003.png")
    assert a.patient == b.patient != c.patient
    assert {a.side, b.side} == {"odd", "even"} and a.view == b.view == "MLO"
    # The same numbers in another folder are another data set's women.
    assert film_id(tmp_path / "x" / "mdb001.png").patient != a.patient


def test_names_with_side_words_pair_by_the_rest_of_the_name(tmp_path):
    left = film_id(tmp_path / "C_0029_1.LEFT_CC.jpg")
    right = film_id(tmp_path / "C_0029_1.RIGHT_CC.jpg")
    mlo = film_id(tmp_path / "C_0029_1.RIGHT_MLO.jpg")
    assert (left.patient, left.side, left.view) == (right.patient, "L", "CC") and right.side == "R"
    assert mlo.view == "MLO" and mlo.patient == left.patient
    assert film_id(tmp_path / "P7_R_MLO.png") == FilmId(f"{tmp_path.resolve()}/P7", "R", "MLO")
    # No side, or a side without a view (CC could meet MLO): nothing to pair by.
    assert film_id(tmp_path / "scan_0042.png") is None
    assert film_id(tmp_path / "P7_L.png") is None
    # A name that is all side and view: the folder is the patient.
    assert film_id(tmp_path / "LCC.png").patient == film_id(tmp_path / "RCC.png").patient
    # Words the names do not use as views (AT, CV) stay part of the patient.
    assert film_id(tmp_path / "case_at_L_CC.png").patient != film_id(tmp_path / "case_R_CC.png").patient


def test_cbis_dicoms_pair_left_and_right_of_the_same_view(cbis_dicoms):
    files = sorted(cbis_dicoms)
    ids = [film_id(f) for f in files]
    assert all(i is not None for i in ids)
    partner = pair_files(files)
    for i, j in enumerate(partner):
        assert j >= 0 and partner[j] == i
        assert ids[i].patient == ids[j].patient and ids[i].view == ids[j].view
        assert {ids[i].side, ids[j].side} == {"L", "R"}
    # The header alone and the read image's metadata give the same identity.
    from core.io import read_image

    assert film_id(files[0], read_image(files[0]).meta) == ids[0]


def test_ambiguous_groups_stay_single():
    p = "w1"
    ids = [FilmId(p, "L", "CC"), FilmId(p, "R", "CC"), FilmId(p, "R", "CC"),  # two right CCs
           FilmId("w2", "L", "MLO"), FilmId("w2", "L", "MLO"),  # same side twice
           FilmId("w3", "L", "MLO"), FilmId("w3", "R", "CC"),  # views differ
           None, FilmId("w4", "L", None), FilmId("w4", "R", None)]
    assert pair_up(ids) == [-1, -1, -1, -1, -1, -1, -1, -1, 9, 8]


def test_the_search_says_why_there_is_no_partner(tmp_path, mias_dir, monkeypatch):
    from core import pairing

    shutil.copy(mias_dir / "mdb001.png", tmp_path / "scan.png")
    assert "cannot be told" in search_other_breast(tmp_path / "scan.png").reason
    shutil.copy(mias_dir / "mdb001.png", tmp_path / "mdb001.png")
    assert "no film of the other breast" in search_other_breast(tmp_path / "mdb001.png").reason
    for name in ("mdb002.png", "mdb002.pgm"):
        shutil.copy(mias_dir / "mdb002.png", tmp_path / name)
    found = search_other_breast(tmp_path / "mdb001.png")
    assert found.path is None and "ambiguous" in found.reason
    monkeypatch.setattr(pairing, "MAX_FOLDER_FILES", 3)
    assert "not searched" in search_other_breast(tmp_path / "mdb001.png").reason


def test_a_prior_exam_does_not_pair_with_the_current_one():
    now = {"patient_id": "P_00173_LEFT_CC", "study_date": "20240101", "laterality": "L", "view": "CC"}
    before = {**now, "study_date": "20220101", "laterality": "R"}
    assert pair_up([_dicom_film_id(now), _dicom_film_id(before)]) == [-1, -1]
    assert pair_up([_dicom_film_id(now), _dicom_film_id({**before, "study_date": "20240101"})]) == [1, 0]
    assert _dicom_film_id({**now, "patient_id": ""}) is None


def test_find_other_breast_looks_beside_the_film_only(tmp_path, mias_dir):
    shutil.copy(mias_dir / "mdb001.png", tmp_path / "mdb001.png")
    assert find_other_breast(tmp_path / "mdb001.png") is None
    (tmp_path / "sub").mkdir()
    shutil.copy(mias_dir / "mdb002.png", tmp_path / "sub" / "mdb002.png")
    assert find_other_breast(tmp_path / "mdb001.png") is None  # not in subfolders
    shutil.copy(mias_dir / "mdb002.png", tmp_path / "mdb002.png")
    (tmp_path / "mdb002.txt").write_text("notes")
    assert find_other_breast(tmp_path / "mdb001.png") == tmp_path / "mdb002.png"
    assert find_other_breast(tmp_path / "mdb002.png") == tmp_path / "mdb001.png"


def test_bilateral_probs_are_a_softmax_of_the_log_odds_features():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=5)
    other = rng.dirichlet(np.ones(3), size=5)
    coef = rng.normal(size=(3, 4))
    intercept = rng.normal(size=3)
    x = bilateral_features(probs, other)
    np.testing.assert_allclose(x[:, 0], np.log(probs[:, 1] / probs[:, 0]))
    np.testing.assert_allclose(x[:, 3], np.log(other[:, 2] / other[:, 0]))
    z = x @ coef.T + intercept
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    got = bilateral_probs(probs, other, coef, intercept)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(bilateral_probs(probs[0], other[0], coef, intercept), want[0], rtol=1e-12)


def test_bilateral_settings_are_checked():
    good = {"coef": np.zeros((3, 4)).tolist(), "intercept": [0, 0, 0]}
    assert check_bilateral(good, CLASSES)["coef"].shape == (3, 4)
    with pytest.raises(ValueError, match="lacks 'coef'"):
        check_bilateral({"intercept": [0, 0, 0]}, CLASSES)
    with pytest.raises(ValueError, match=r"\(3, 4\) coef"):
        check_bilateral({"coef": [[0, 0]], "intercept": [0, 0, 0]}, CLASSES)
    with pytest.raises(ValueError, match="non-finite"):
        check_bilateral({"coef": good["coef"], "intercept": [0, float("nan"), 0]}, CLASSES)
    with pytest.raises(ValueError, match="must be numbers"):
        check_bilateral({"coef": "x", "intercept": [0, 0, 0]}, CLASSES)
    with pytest.raises(ValueError, match="in this order"):
        check_bilateral(good, ("Cancer", "Benign", "Normal"))


def test_the_bilateral_class_prior_is_checked_and_normalised():
    good = {"coef": np.zeros((3, 4)).tolist(), "intercept": [0, 0, 0]}
    assert "class_prior" not in check_bilateral(good, CLASSES)  # no prior: the pair's arg-max
    got = check_bilateral({**good, "class_prior": [165, 51, 42]}, CLASSES)["class_prior"]
    np.testing.assert_allclose(got, np.array([165, 51, 42]) / 258)
    for bad, message in (([0.5, 0.5], "one number per class"), ([0.5, 0.5, 0.0], "> 0"),
                         ([0.5, float("inf"), 0.2], "> 0"), ("often", "list of numbers"),
                         ([[0.2], [0.3], [0.5]], "one number per class"), ([None, 1, 1], "> 0")):
        with pytest.raises(ValueError, match=f"pipeline.bilateral class_prior .*{message}"):
            check_bilateral({**good, "class_prior": bad}, CLASSES)


def test_single_film_stage_is_the_bilateral_form_on_the_films_own_log_odds():
    from core.pairing import check_single_film, single_features, single_film_probs

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=6)
    coef, intercept = rng.normal(size=(3, 2)), rng.normal(size=3)
    x = single_features(probs)
    np.testing.assert_allclose(x, bilateral_features(probs, probs)[:, :2])
    z = x @ coef.T + intercept
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(single_film_probs(probs, coef, intercept), want, rtol=1e-12)
    np.testing.assert_allclose(single_film_probs(probs[2], coef, intercept), want[2], rtol=1e-12)
    good = {"coef": coef.tolist(), "intercept": intercept.tolist(), "class_prior": [2, 1, 1]}
    np.testing.assert_allclose(check_single_film(good, CLASSES)["class_prior"], [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match=r"pipeline.single_film needs a \(3, 2\) coef"):
        check_single_film({**good, "coef": np.zeros((3, 4)).tolist()}, CLASSES)
    with pytest.raises(ValueError, match="pipeline.single_film class_prior"):
        check_single_film({**good, "class_prior": [1, 1]}, CLASSES)
    with pytest.raises(ValueError, match="pipeline.single_film must be an object"):
        check_single_film([1, 2], CLASSES)
