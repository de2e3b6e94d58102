"""Dataset records, ground-truth masks and patient splits, on the real MIAS and Mini-DDSM files
and on small folders made here."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.io import read_image
from models.data import (
    CLASSES,
    DatasetError,
    Lesion,
    Record,
    balanced_sample_indices,
    class_weights,
    fill_outline,
    lesion_mask,
    load_dataset,
    load_folder,
    load_mias,
    load_mini_ddsm,
    load_mini_ddsm_xlsx,
    patient_kfold,
    patient_labels,
    patient_split,
)

# --------------------------------------------------------------------------------------------
# MIAS (real files)


@pytest.fixture(scope="module")
def mias(mias_dir) -> list[Record]:
    return load_mias(mias_dir)


@pytest.fixture(scope="module")
def by_name(mias) -> dict[str, Record]:
    return {r.path.stem: r for r in mias}


def test_mias_counts_match_the_data_readme(mias):
    assert len(mias) == 258
    assert Counter(r.label for r in mias) == {"Normal": 165, "Benign": 51, "Cancer": 42}
    assert all(r.source == "mias" and r.view == "MLO" for r in mias)
    assert all(r.path.is_file() for r in mias)


def test_mdb001_circle_is_flipped_to_top_left_origin(by_name):
    # Info.txt: "mdb001 G CIRC B 535 425 197", origin bottom-left, so the centre is at row
    # 1024 - 425 = 599. The unflipped reading (row 425) is only 174 px away, inside the 197 px
    # circle either way, so the rows that tell the two readings apart are 150 px beyond each
    # centre: row 749 is in the true circle only, row 275 in the wrong one only.
    record = by_name["mdb001"]
    (lesion,) = record.lesions
    assert (lesion.x, lesion.y, lesion.radius) == (535, 599, 197)
    image = read_image(record.path).pixels
    mask = lesion_mask(record, image.shape)
    assert mask.shape == (1024, 1024)
    assert mask[1024 - 425, 535] and mask[749, 535]
    assert not mask[275, 535]
    # The circumscribed mass is the bright blob of the film: the true circle is brighter than
    # the wrongly placed one where they do not overlap.
    rows, cols = np.ogrid[:1024, :1024]
    wrong = (rows - 425) ** 2 + (cols - 535) ** 2 <= 197**2
    assert image[mask & ~wrong].mean() > image[wrong & ~mask].mean() + 0.1


def test_mias_patients_pair_odd_right_and_even_left(by_name):
    a, b = by_name["mdb001"], by_name["mdb002"]
    assert a.patient_id == b.patient_id
    assert (a.laterality, b.laterality) == ("R", "L")
    assert by_name["mdb007"].patient_id == by_name["mdb008"].patient_id != a.patient_id


def test_mias_truth_file_quirks(by_name):
    # Two benign lesions on one film.
    assert [lz.severity for lz in by_name["mdb132"].lesions] == ["Benign", "Benign"]
    # One benign and one malignant line: the film is Cancer and keeps both lesions.
    assert by_name["mdb144"].label == "Cancer"
    assert sorted(lz.severity for lz in by_name["mdb144"].lesions) == ["Benign", "Cancer"]
    # "mdb059 F CIRC B" has no centre; "mdb216 D CALC M *NOTE 3*" is spread calcification.
    for name, label in (("mdb059", "Benign"), ("mdb216", "Cancer"), ("mdb233", "Cancer")):
        assert by_name[name].label == label and by_name[name].lesions == ()
        assert not lesion_mask(by_name[name], (1024, 1024)).any()
    assert by_name["mdb007"].label == "Normal" and by_name["mdb007"].lesions == ()


def _write_png(path: Path, shape=(64, 48), value=100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def test_mias_parser_on_a_small_truth_file(tmp_path, caplog):
    (tmp_path / "Info.txt").write_text(
        "MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY\n"
        "5th,6th columns: x,y image-coordinates of centre of abnormality.\n"
        "=====\n"
        "mdb001 G CIRC B 20 10 5\n"
        "mdb002 G NORM \n"
        "mdb003 F SPIC Q 1 2 3\n"  # no such severity
        "mdb004 F CALC M 1 2\n"  # centre cut short
        "mdb005 D NORM\n",  # no image on disk
        encoding="latin-1",
    )
    for n in (1, 2, 3, 4):
        _write_png(tmp_path / f"mdb{n:03d}.png", shape=(64, 48))
    with caplog.at_level(logging.WARNING, logger="models.data"):
        records = {r.path.stem: r for r in load_mias(tmp_path)}
    assert sorted(records) == ["mdb001", "mdb002", "mdb004"]
    assert "mdb003" in caplog.text and "mdb004" in caplog.text
    # The flip uses the film's own height (64 px here), not 1024.
    (lesion,) = records["mdb001"].lesions
    assert (lesion.x, lesion.y) == (20, 64 - 10)
    assert records["mdb004"].label == "Cancer" and records["mdb004"].lesions == ()
    assert records["mdb001"].patient_id == records["mdb002"].patient_id


def test_missing_mias_truth_file_is_a_clear_error(tmp_path):
    _write_png(tmp_path / "mdb001.png")
    with pytest.raises(DatasetError, match="Info.txt"):
        load_mias(tmp_path)


# --------------------------------------------------------------------------------------------
# Masks


def test_circle_mask_is_clipped_at_the_borders():
    record = Record(
        path=Path("x.png"),
        patient_id="p",
        label="Benign",
        lesions=(Lesion(x=2, y=3, radius=10, severity="Benign"),),
    )
    mask = lesion_mask(record, (40, 30))
    rows, cols = np.ogrid[:40, :30]
    np.testing.assert_array_equal(mask, (rows - 3) ** 2 + (cols - 2) ** 2 <= 100)
    far = Record(
        path=Path("x.png"),
        patient_id="p",
        label="Benign",
        lesions=(Lesion(x=500, y=500, radius=10, severity="Benign"),),
    )
    assert not lesion_mask(far, (40, 30)).any()


def test_fill_outline_fills_rings_and_leaves_regions():
    rows, cols = np.ogrid[:60, :60]
    disc = (rows - 30) ** 2 + (cols - 30) ** 2 <= 15**2
    ring = disc & ((rows - 30) ** 2 + (cols - 30) ** 2 > 14**2)
    np.testing.assert_array_equal(fill_outline(ring), disc)
    np.testing.assert_array_equal(fill_outline(disc), disc)
    # A break of two pixels, as JPEG thresholding can leave, is still filled.
    broken = ring.copy()
    broken[29:31, 40:] = False
    assert ring.sum() - broken.sum() == 2
    assert (fill_outline(broken) ^ disc).sum() <= 2
    # A region with a small noise hole is left alone (the hole is not the point of the mask).
    holed = disc.copy()
    holed[30, 30] = False
    np.testing.assert_array_equal(fill_outline(holed), holed)


def test_mask_of_the_wrong_size_is_refused(tmp_path):
    mask_path = _write_png(tmp_path / "m.png", shape=(20, 10), value=255)
    record = Record(path=Path("x.png"), patient_id="p", label="Benign", mask_paths=(mask_path,))
    assert lesion_mask(record, (20, 10)).all()
    with pytest.raises(ValueError, match="m.png"):
        lesion_mask(record, (10, 20))


# --------------------------------------------------------------------------------------------
# Mini-DDSM (real files)


@pytest.fixture(scope="module")
def ddsm(miniddsm_dir) -> list[Record]:
    return load_mini_ddsm(miniddsm_dir)


def test_mini_ddsm_sample_records(ddsm):
    assert len(ddsm) == 40
    assert sum(len(r.mask_paths) for r in ddsm) == 22
    assert all(r.source == "mini-ddsm" and r.extra["case_status"] == "Benign" for r in ddsm)
    assert not any("mask" in r.path.name.lower() for r in ddsm)
    assert Counter((r.laterality, r.view) for r in ddsm) == {
        ("L", "CC"): 10,
        ("L", "MLO"): 10,
        ("R", "CC"): 10,
        ("R", "MLO"): 10,
    }
    ids = {r.patient_id for r in ddsm}
    assert len(ids) == 10 and "C_0029" in ids
    # Per-view labels: the breast with the outlined lesion is Benign, the other one Normal.
    assert Counter(r.label for r in ddsm) == {"Benign": 20, "Normal": 20}
    assert all((r.label == "Benign") == bool(r.mask_paths) for r in ddsm)
    two = next(r for r in ddsm if r.path.name == "C_0236_1.RIGHT_CC.jpg")
    assert [p.name for p in two.mask_paths] == [
        "C_0236_1.RIGHT_CC_Mask.jpg",
        "C_0236_1.RIGHT_CC_MASK2.jpg",
    ]


def test_mini_ddsm_case_labels_on_request(miniddsm_dir):
    assert {r.label for r in load_mini_ddsm(miniddsm_dir, label_by="case")} == {"Benign"}


def test_mini_ddsm_masks_fit_their_images_and_outlines_are_filled(ddsm):
    for record in (r for r in ddsm if r.mask_paths):
        shape = read_image(record.path).pixels.shape
        mask = lesion_mask(record, shape)
        assert mask.shape == shape
        for mask_path in record.mask_paths:
            drawn = read_image(mask_path).raw >= 128
            assert drawn.shape == shape
            one = lesion_mask(
                Record(path=record.path, patient_id="", label="Benign", mask_paths=(mask_path,)),
                shape,
            )
            # Every sample mask is a 1-2 px outline: filled, it covers many times the drawn area
            # and is one solid region (its centroid is inside, which a ring's is not).
            assert one.sum() > 20 * drawn.sum(), mask_path.name
            n_regions, _ = cv2.connectedComponents(one.astype(np.uint8))
            assert n_regions == 2, mask_path.name  # background + the lesion
            rows, cols = np.nonzero(one)
            assert one[int(rows.mean()), int(cols.mean())], mask_path.name
            assert (drawn & ~one).sum() < 0.01 * drawn.sum()


def test_xlsx_loader_agrees_with_the_folder_scan(miniddsm_dir, ddsm):
    from_sheet = load_mini_ddsm_xlsx(miniddsm_dir)
    assert len(from_sheet) == 40
    fields = ("path", "patient_id", "label", "laterality", "view", "mask_paths", "lesions")
    for a, b in zip(ddsm, from_sheet, strict=True):
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    first = next(r for r in from_sheet if r.path.name == "C_0029_1.LEFT_CC.jpg")
    assert first.extra["age"] == 66 and first.extra["density"] == 3


def test_mini_ddsm_case_numbers_repeat_across_volumes(tmp_path):
    _write_png(tmp_path / "Normal" / "0236" / "A_0236_1.LEFT_CC.jpg")
    _write_png(tmp_path / "Benign" / "0236" / "C_0236_1.LEFT_CC.jpg")
    _write_png(tmp_path / "Benign" / "0236" / "C_0236_1.LEFT_CC_Mask.jpg", value=0)
    (tmp_path / "Benign" / "0236" / "C-0236-1.ics").write_text("ics_version 1.0\n")
    (tmp_path / "Benign" / "0236" / "C_0236_1.LEFT_CC.OVERLAY").write_text(
        "TOTAL_ABNORMALITIES 1\n"
    )
    records = load_dataset(tmp_path)
    assert [(r.patient_id, r.label, r.source) for r in records] == [
        ("C_0236", "Benign", "mini-ddsm"),
        ("A_0236", "Normal", "mini-ddsm"),
    ]


# --------------------------------------------------------------------------------------------
# Class folders and layout detection


def test_class_folders(tmp_path):
    _write_png(tmp_path / "Normal" / "n1_L_CC.png")
    _write_png(tmp_path / "benign" / "b1.png")
    _write_png(tmp_path / "CANCER" / "site_a" / "c1.png")
    _write_png(tmp_path / "CANCER" / "c2.png")
    (tmp_path / "CANCER" / "notes.txt").write_text("not an image")
    (tmp_path / "Other").mkdir()
    _write_png(tmp_path / "Other" / "x.png")
    records = load_dataset(tmp_path)
    assert sorted((r.path.name, r.label, r.patient_id) for r in records) == [
        ("b1.png", "Benign", "b1"),
        ("c1.png", "Cancer", "c1"),
        ("c2.png", "Cancer", "c2"),
        ("n1_L_CC.png", "Normal", "n1_L_CC"),
    ]
    assert {r.source for r in records} == {"folder"}

    (tmp_path / "patients.csv").write_text(
        "path,patient_id\nCANCER/site_a/c1.png,p7\nCANCER/c2.png,p7\nNormal/n1_L_CC.png,p1\n"
    )
    ids = {r.path.name: r.patient_id for r in load_folder(tmp_path)}
    assert ids == {"b1.png": "b1", "c1.png": "p7", "c2.png": "p7", "n1_L_CC.png": "p1"}


def test_layout_detection(mias_dir, miniddsm_dir, tmp_path):
    assert {r.source for r in load_dataset(mias_dir)} == {"mias"}
    assert {r.source for r in load_dataset(miniddsm_dir)} == {"mini-ddsm"}
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="MIAS"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Splits and balancing


def _patients(records, idx) -> set[str]:
    return {records[i].patient_id for i in idx}


def _proportions(records, idx) -> np.ndarray:
    labels = [records[i].label_index for i in idx]
    return np.bincount(labels, minlength=len(CLASSES)) / len(labels)


def test_patient_split_is_grouped_stratified_and_seeded(mias):
    train, test = patient_split(mias, test_fraction=0.2, seed=0)
    assert len(set(train) | set(test)) == len(mias) and not set(train) & set(test)
    assert not _patients(mias, train) & _patients(mias, test)
    assert 0.15 < len(test) / len(mias) < 0.25
    overall = _proportions(mias, range(len(mias)))
    assert np.abs(_proportions(mias, test) - overall).max() < 0.08
    again = patient_split(mias, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(patient_split(mias, test_fraction=0.2, seed=1)[1], test)


def test_patient_kfold_covers_every_record_once(mias):
    folds = patient_kfold(mias, k=5, seed=3)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(len(mias)))
    overall = _proportions(mias, range(len(mias)))
    for train, test in folds:
        assert len(train) + len(test) == len(mias)
        assert not _patients(mias, train) & _patients(mias, test)
        assert np.abs(_proportions(mias, test) - overall).max() < 0.1
    again = patient_kfold(mias, k=5, seed=3)
    for (_, a), (_, b) in zip(folds, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_patient_label_is_the_most_severe_film():
    records = [
        Record(path=Path("a"), patient_id="1", label="Normal"),
        Record(path=Path("b"), patient_id="1", label="Cancer"),
        Record(path=Path("c"), patient_id="2", label="Benign"),
    ]
    assert patient_labels(records).tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="Malignant"):
        Record(path=Path("d"), patient_id="3", label="Malignant")
    with pytest.raises(DatasetError):
        patient_kfold(records, k=3)


def test_class_weights_balance_the_classes():
    labels = ["Normal"] * 6 + ["Benign"] * 3 + ["Cancer"] * 1
    weights = class_weights(labels)
    assert weights == pytest.approx({0: 10 / 18, 1: 10 / 9, 2: 10 / 3})
    totals = Counter()
    for label in labels:
        totals[CLASSES.index(label)] += weights[CLASSES.index(label)]
    assert len(set(np.round(list(totals.values()), 9))) == 1
    assert class_weights([0, 0, 2]) == pytest.approx({0: 0.75, 2: 1.5})


def test_balanced_sampling_draws_classes_equally_and_reproducibly():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    idx = balanced_sample_indices(labels, 3000, np.random.default_rng(0))
    shares = np.bincount(labels[idx], minlength=3) / len(idx)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.04)
    again = balanced_sample_indices(labels, 3000, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)


def test_data_and_augment_load_without_tensorflow():
    code = (
        "import sys, models.data, models.augment; "
        "assert not {'tensorflow', 'keras'} & set(sys.modules), 'TensorFlow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
