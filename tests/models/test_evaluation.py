"""Evaluation figures: exact values on hand-made examples, honest intervals, FROC points, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics

from models import evaluation as ev

CLASSES = ("Normal", "Benign", "Cancer")


def one_hot_probs(pred: list[int], n_classes: int = 3, conf: float = 0.8) -> np.ndarray:
    """Rows with ``conf`` on the predicted class and the rest shared equally."""
    p = np.full((len(pred), n_classes), (1 - conf) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def synthetic(n: int, seed: int, sharpen: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); predictions softmax(sharpen * z) (over-confident if > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 3))
    true_p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in true_p])
    zs = sharpen * z
    return y, np.exp(zs) / np.exp(zs).sum(1, keepdims=True)


# -- classification --------------------------------------------------------------------------


def test_hand_made_report_exact_values():
    y = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 2, 0]
    r = ev.classification_report(y, one_hot_probs(pred), CLASSES, n_boot=50)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert r["accuracy"]["value"] == pytest.approx(5 / 8)
    assert r["balanced_accuracy"]["value"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert r["per_class"]["Normal"]["precision"]["value"] == pytest.approx(2 / 3)
    assert r["per_class"]["Benign"]["recall"]["value"] == pytest.approx(1 / 2)
    assert r["per_class"]["Cancer"]["f1"]["value"] == pytest.approx(2 * 2 / (3 + 3))
    assert r["n_per_class"] == {"Normal": 3, "Benign": 2, "Cancer": 3}
    assert r["n"] == 8 and r["n_patients"] is None
    json.dumps(r, allow_nan=False)  # plain JSON, no NaN


def test_point_figures_agree_with_scikit_learn():
    y, p = synthetic(300, seed=1)
    r = ev.classification_report(y, p, CLASSES, n_boot=0)
    pred = p.argmax(1)
    assert r["accuracy"]["value"] == pytest.approx(metrics.accuracy_score(y, pred))
    assert r["balanced_accuracy"]["value"] == pytest.approx(metrics.balanced_accuracy_score(y, pred))
    prec, rec, f1, _ = metrics.precision_recall_fscore_support(y, pred, labels=[0, 1, 2])
    for k, name in enumerate(CLASSES):
        pc = r["per_class"][name]
        assert pc["precision"]["value"] == pytest.approx(prec[k])
        assert pc["recall"]["value"] == pytest.approx(rec[k])
        assert pc["f1"]["value"] == pytest.approx(f1[k])
        assert pc["auc"]["value"] == pytest.approx(metrics.roc_auc_score(y == k, p[:, k]))
    assert r["macro_auc"]["value"] == pytest.approx(metrics.roc_auc_score(y, p, multi_class="ovr"))
    assert r["confusion_matrix"] == metrics.confusion_matrix(y, pred).tolist()


def test_auc_is_one_when_perfectly_separated_and_near_half_for_noise():
    y = np.repeat([0, 1, 2], 40)
    r = ev.classification_report(y, one_hot_probs(list(y), conf=0.9), CLASSES, n_boot=100)
    for name in CLASSES:
        assert r["per_class"][name]["auc"]["value"] == 1.0
        assert r["per_class"][name]["auc"]["ci95"] == [1.0, 1.0]
    assert r["accuracy"]["value"] == 1.0 and r["macro_auc"]["value"] == 1.0

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    noise = rng.dirichlet(np.ones(3), size=3000)
    r = ev.classification_report(y, noise, CLASSES, n_boot=0)
    assert abs(r["macro_auc"]["value"] - 0.5) < 0.03


def test_auc_ties_use_average_ranks():
    # One positive tied with one negative: half a correctly ordered pair.
    assert ev.one_vs_rest_auc(np.array([1, 0], bool), np.array([0.5, 0.5])) == 0.5
    assert ev.one_vs_rest_auc(np.array([1, 1], bool), np.array([0.5, 0.7])) is None


def test_intervals_contain_point_and_narrow_with_more_data():
    widths = []
    for n in (100, 1600):
        y, p = synthetic(n, seed=3)
        r = ev.classification_report(y, p, CLASSES, n_boot=300, seed=0)
        for key in ("accuracy", "balanced_accuracy", "macro_auc", "ece"):
            lo, hi = r[key]["ci95"]
            assert lo <= r[key]["value"] <= hi, key
        auc = r["per_class"]["Cancer"]["auc"]
        assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
        widths.append(r["accuracy"]["ci95"][1] - r["accuracy"]["ci95"][0])
    # The width shrinks like 1 / sqrt(n): 16 x the data, about a quarter of the width.
    assert widths[1] < 0.5 * widths[0]


def test_report_is_reproducible_with_a_seed():
    y, p = synthetic(200, seed=4)
    a = ev.classification_report(y, p, CLASSES, n_boot=100, seed=7)
    b = ev.classification_report(y, p, CLASSES, n_boot=100, seed=7)
    c = ev.classification_report(y, p, CLASSES, n_boot=100, seed=8)
    assert a == b
    assert a["accuracy"]["ci95"] != c["accuracy"]["ci95"]


def test_grouped_bootstrap_draws_whole_patients():
    groups = np.repeat([f"p{i}" for i in range(10)], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2])
    rng = np.random.default_rng(0)
    groups = groups[rng.permutation(len(groups))]  # a patient's images are not contiguous
    size = {g: int((groups == g).sum()) for g in set(groups)}
    lengths = set()
    for idx in ev.bootstrap_samples(len(groups), 200, seed=1, groups=groups):
        drawn = groups[idx]
        for g in set(drawn):
            count = int((drawn == g).sum())
            assert count % size[g] == 0  # all images of a drawn patient, as often as drawn
            assert sorted(idx[drawn == g].tolist()) == sorted(
                np.flatnonzero(groups == g).tolist() * (count // size[g]))
        lengths.add(len(idx))
    assert len(lengths) > 1  # the number of images varies with the patients drawn


def test_grouped_intervals_are_wider_when_images_of_a_patient_agree():
    # 40 patients x 10 images each; all images of a patient share one outcome, so there are
    # really 40 independent observations and the patient bootstrap must say so.
    rng = np.random.default_rng(5)
    patient_correct = rng.random(40) < 0.7
    groups = np.repeat(np.arange(40), 10)
    y = np.zeros(400, dtype=int)
    pred = np.where(np.repeat(patient_correct, 10), 0, 1)
    p = one_hot_probs(list(pred))
    by_image = ev.classification_report(y, p, CLASSES, n_boot=400, seed=0)
    by_patient = ev.classification_report(y, p, CLASSES, n_boot=400, seed=0, groups=groups)
    w_img = np.diff(by_image["accuracy"]["ci95"])[0]
    w_pat = np.diff(by_patient["accuracy"]["ci95"])[0]
    assert by_patient["n_patients"] == 40
    assert w_pat > 2 * w_img
    assert "40 patients" in by_patient["method"]


def test_auc_interval_skips_resamples_without_the_class():
    y = np.array([0] * 30 + [1] * 30 + [2])  # a single Cancer image: often absent from a resample
    p = one_hot_probs(list(y))
    r = ev.classification_report(y, p, CLASSES, n_boot=200, seed=0)
    used = r["per_class"]["Cancer"]["auc"]["n_boot_used"]
    assert 0 < used < 200  # about 1 - 1/e of the resamples hold it
    assert r["per_class"]["Normal"]["auc"]["n_boot_used"] == 200


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="columns"):
        ev.classification_report([0, 1], np.ones((2, 2)) / 2, CLASSES)
    with pytest.raises(ValueError, match="labels"):
        ev.classification_report([0, 3], one_hot_probs([0, 1]), CLASSES)
    with pytest.raises(ValueError, match="groups"):
        ev.classification_report([0, 1], one_hot_probs([0, 1]), CLASSES, groups=["a"])


# -- calibration -----------------------------------------------------------------------------


def test_ece_hand_made():
    # Two bins used: confidence 0.9 (2 right of 2) and 0.6 (1 right of 2).
    p = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 1])
    assert ev.expected_calibration_error(y, p) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    b = ev.reliability_bins(y, p)
    assert b["count"].sum() == 4 and len(b["count"]) == ev.ECE_BINS


def test_temperature_softens_overconfident_predictions_and_lowers_ece():
    y, p = synthetic(3000, seed=2, sharpen=3.0)
    t = ev.fit_temperature(p, y)
    assert 2.5 < t < 3.5  # the sharpening undone
    q = ev.apply_temperature(p, t)
    assert ev.expected_calibration_error(y, q) < 0.5 * ev.expected_calibration_error(y, p)
    np.testing.assert_allclose(q.sum(1), 1.0)
    np.testing.assert_array_equal(q.argmax(1), p.argmax(1))  # ranking unchanged
    # Logits and probabilities give the same temperature.
    assert ev.fit_temperature(np.log(p) + 5.0, y) == pytest.approx(t, rel=1e-3)


def test_temperature_of_calibrated_predictions_is_near_one():
    y, p = synthetic(3000, seed=6, sharpen=1.0)
    assert 0.85 < ev.fit_temperature(p, y) < 1.15
    np.testing.assert_allclose(ev.apply_temperature(p, 1.0), p, atol=1e-9)


# -- segmentation ----------------------------------------------------------------------------


def test_dice_and_iou_exact():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 px
    b[0, 1:] = True  # 3 px, 2 shared
    assert ev.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert ev.iou(a, b) == pytest.approx(2 / 4)
    assert ev.dice(a, a) == 1.0 and ev.iou(a, a) == 1.0
    assert ev.dice(a, ~a) == 0.0 and ev.iou(a, ~a) == 0.0
    empty = np.zeros((4, 4), bool)
    assert ev.dice(empty, empty) == 1.0 and ev.iou(empty, empty) == 1.0
    assert ev.dice(a, empty) == 0.0
    with pytest.raises(ValueError, match="shape"):
        ev.dice(a, np.zeros((3, 3), bool))


def blob(shape, centre, sigma, peak):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return peak * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def test_lesion_candidates_one_per_peak_and_plateau():
    p = blob((40, 40), (10, 10), 3, 0.9) + blob((40, 40), (30, 28), 3, 0.6)
    p[0:3, 30:36] = 0.5  # a flat plateau: one candidate, not 18
    c = ev.lesion_candidates(p)
    assert c.shape == (3, 3)
    np.testing.assert_allclose(c[0], [10, 10, 0.9])
    np.testing.assert_allclose(c[1], [30, 28, 0.6])
    assert c[2, 2] == 0.5 and 0 <= c[2, 0] < 3 and 30 <= c[2, 1] < 36


def test_detection_sensitivity_on_known_lesions_and_false_positives():
    shape = (64, 64)
    maps, masks = [], []
    # Image 1: two lesions, one found strongly (0.9), one weakly (0.3); one FP at 0.8.
    m = np.zeros(shape, bool)
    m[8:16, 8:16] = True
    m[40:50, 40:50] = True
    p = blob(shape, (12, 12), 2, 0.9) + blob(shape, (45, 45), 2, 0.3) + blob(shape, (12, 50), 2, 0.8)
    maps.append(p)
    masks.append(m)
    # Image 2: one lesion found at 0.7; FPs at 0.6 and 0.2.
    m = np.zeros(shape, bool)
    m[20:30, 20:30] = True
    p = blob(shape, (25, 25), 2, 0.7) + blob(shape, (55, 10), 2, 0.6) + blob(shape, (5, 55), 2, 0.2)
    maps.append(p)
    masks.append(m)
    # Image 3: one lesion missed entirely (no peak inside); one FP at 0.5.
    m = np.zeros(shape, bool)
    m[30:36, 5:11] = True
    maps.append(blob(shape, (50, 50), 2, 0.5))
    masks.append(m)

    r = ev.lesion_detection_sensitivity(maps, masks, fp_per_image=(1 / 3, 1, 2))
    assert r["n_images"] == 3 and r["n_lesions"] == 4 and r["n_candidates"] == 7
    by_f = {pt["fp_per_image"]: pt for pt in r["operating_points"]}
    # 1/3 FP per image: at most 1 FP in total -> threshold 0.6 (keeps only the 0.8 FP).
    assert by_f[1 / 3]["threshold"] == pytest.approx(0.6)
    assert by_f[1 / 3]["false_positives"] == 1
    assert by_f[1 / 3]["sensitivity"] == pytest.approx(2 / 4)  # 0.9 and 0.7 found
    # 1 per image: at most 3 FPs -> threshold 0.2 (0.8, 0.6, 0.5 kept): 0.3 lesion found too.
    assert by_f[1]["threshold"] == pytest.approx(0.2)
    assert by_f[1]["sensitivity"] == pytest.approx(3 / 4)
    # 2 per image: every candidate kept; the lesion without a peak stays missed.
    assert by_f[2]["false_positives"] == 4
    assert by_f[2]["sensitivity"] == pytest.approx(3 / 4)


def test_second_candidate_in_a_lesion_is_not_a_false_positive():
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    p = blob((40, 40), (10, 10), 2, 0.9) + blob((40, 40), (30, 30), 2, 0.8)
    r = ev.lesion_detection_sensitivity([p], [m], fp_per_image=(0,))
    assert r["operating_points"][0]["sensitivity"] == 1.0
    assert r["operating_points"][0]["false_positives"] == 0


# -- side by side and plots ------------------------------------------------------------------


def test_compare_table_lists_models_with_intervals():
    y, p = synthetic(200, seed=9)
    a = ev.classification_report(y, p, CLASSES, n_boot=100)
    b = ev.classification_report(y, ev.apply_temperature(p, 2.0), CLASSES, n_boot=100)
    table = ev.compare_table({"baseline": a, "calibrated": b})
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| Model | n | Accuracy") and "AUC Cancer" in lines[0]
    assert lines[2].startswith("| baseline | 200 | ")
    lo, hi = a["accuracy"]["ci95"]
    assert f"{a['accuracy']['value']:.3f} ({lo:.3f}–{hi:.3f})" in lines[2]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_plots_write_png_files(tmp_path):
    plots = pytest.importorskip("models.plots")
    y, p = synthetic(150, seed=10)
    r = ev.classification_report(y, p, CLASSES, n_boot=20)
    history = {"loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.8, 0.7],
               "accuracy": [0.4, 0.6, 0.7], "val_accuracy": [0.35, 0.55, 0.6], "lr": [1e-3] * 3}
    written = [
        plots.plot_learning_curves(history, tmp_path / "curves.png"),
        plots.plot_confusion_matrix(r["confusion_matrix"], CLASSES, tmp_path / "cm.png"),
        plots.plot_roc_curves(y, p, CLASSES, tmp_path / "roc.png"),
        plots.plot_reliability_diagram(y, p, tmp_path / "sub" / "reliability.png"),
    ]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_a_class_prior_changes_the_call_but_not_the_ranking_figures():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.55, 0.35, 0.1], [0.5, 0.2, 0.3], [0.7, 0.2, 0.1],
                  [0.55, 0.4, 0.05], [0.3, 0.6, 0.1], [0.55, 0.1, 0.35], [0.2, 0.2, 0.6]])
    plain = ev.classification_report(y, p, ["N", "B", "C"], n_boot=20)
    prior = np.array([0.5, 0.25, 0.25])
    called = ev.classification_report(y, p, ["N", "B", "C"], n_boot=20, class_prior=prior)
    # p / prior: rows 1, 2, 4 and 6 move off Normal (0.35 / 0.25 > 0.55 / 0.5, ...).
    want = np.argmax(p / prior, axis=1)
    assert want.tolist() == [0, 1, 2, 0, 1, 1, 2, 2]
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (y, want), 1)
    assert called["confusion_matrix"] == cm.tolist() and called["decision"] == "balanced"
    assert plain["decision"] == "argmax"
    assert called["balanced_accuracy"]["value"] == pytest.approx((2 / 4 + 1 + 1) / 3)
    assert plain["balanced_accuracy"]["value"] == pytest.approx((4 / 4 + 1 / 2 + 1 / 2) / 3)
    assert called["macro_auc"] == plain["macro_auc"] and called["ece"] == plain["ece"]
    assert "relative to its share" in called["method"]
    # One prior per image: each row called with its own.
    rows = np.tile(prior, (8, 1))
    rows[0] = [0.98, 0.01, 0.01]
    per_row = ev.classification_report(y, p, ["N", "B", "C"], n_boot=0, class_prior=rows)
    assert np.array(per_row["confusion_matrix"])[0].tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="finite numbers > 0"):
        ev.classification_report(y, p, ["N", "B", "C"], n_boot=0, class_prior=[0.5, 0.5, 0.0])


def test_fold_priors_are_the_class_shares_outside_each_fold():
    y = np.array([0, 0, 1, 2, 0, 1, 1, 2])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    got = ev.fold_class_priors(y, folds, 3)
    np.testing.assert_allclose(got[:4], np.tile([1 / 4, 2 / 4, 1 / 4], (4, 1)))  # fold 1's films
    np.testing.assert_allclose(got[4:], np.tile([2 / 4, 1 / 4, 1 / 4], (4, 1)))  # fold 0's films
    with pytest.raises(ValueError, match="every class"):
        ev.fold_class_priors(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]), 3)
