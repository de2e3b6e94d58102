"""core.inference on the bundled model and real mammograms (LiteRT only, no TensorFlow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from core.bundle import BundleError, load_bundle
from core.decision import decide
from core.inference import (
    Analyzer,
    NoBreastError,
    NotAMammogramError,
    candidate_patches,
    check_readable,
    top_cells,
    verify_cells,
)
from core.io import read_image
from tests.conftest import edited_bundle


def test_analysis_on_a_real_dicom(analyzer, cbis_dicoms):
    m = read_image(cbis_dicoms[0])
    a = analyzer.analyze(m)
    assert a.classes == ("Normal", "Benign", "Cancer")
    assert a.probabilities.shape == (3,) and a.probabilities.dtype == np.float32
    assert abs(float(a.probabilities.sum()) - 1.0) < 1e-5
    assert a.predicted == a.classes[decide(a.probabilities, analyzer.single_prior)]
    assert a.most_probable == a.classes[int(np.argmax(a.probabilities))]
    for arr in (a.lesion_probability, a.lesion_mask, a.breast_mask):
        assert arr.shape == m.pixels.shape
    assert 0.0 <= a.lesion_probability.min() and a.lesion_probability.max() <= 1.0
    assert not (a.lesion_mask & ~a.breast_mask).any(), "lesions are only reported inside the breast"
    assert a.lesion_area_frac == pytest.approx(a.lesion_mask.sum() / a.breast_mask.sum())
    assert a.model_version == analyzer.version


def test_same_image_same_answer(analyzer, mias_dir):
    m = read_image(mias_dir / "mdb010.png")
    a, b = analyzer.analyze(m), analyzer.analyze(m)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)


def test_candidates_lie_in_the_breast(analyzer, mias_dir):
    m = read_image(mias_dir / "mdb001.png")
    a = analyzer.analyze(m)
    xy = a.candidates_xy.astype(int)
    assert len(xy) == analyzer.top_k
    assert a.breast_mask[xy[:, 1], xy[:, 0]].all()


def test_a_mask_a_thumbnail_or_a_strip_is_refused_not_read(analyzer, miniddsm_dir, mias_dir, tmp_path):
    """Mini-DDSM's lesion masks sit beside its films; read as films they came out "Normal 100 %".
    A thumbnail or a strip of noise got a confident reading too. All are refused with the reason;
    every real film here passes the same check."""
    from PIL import Image

    masks = sorted(miniddsm_dir.rglob("*_Mask.jpg"))
    assert masks
    with pytest.raises(NotAMammogramError, match=r"_Mask\.jpg: the image is black and white only "
                       r"\(0\.\d\d % of its pixels in between\): a lesion mask or a drawing"):
        analyzer.analyze(read_image(masks[0]))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(NotAMammogramError, match=r"^tiny\.png: the image is 8 x 8 pixels, too small"):
        analyzer.analyze(read_image(tmp_path / "tiny.png"))
    Image.fromarray(rng.integers(0, 256, (1400, 300), dtype=np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(NotAMammogramError, match=r"^strip\.png: the image is 300 x 1400 pixels, a strip"):
        analyzer.analyze(read_image(tmp_path / "strip.png"))
    films = [*sorted(miniddsm_dir.rglob("*.jpg")), *sorted(mias_dir.glob("*.png"))[::10]]
    films = [f for f in films if "mask" not in f.name.lower()]
    for f in films:
        check_readable(read_image(f))


def test_an_image_without_a_breast_is_refused_with_the_reason(analyzer, mias_dir, tmp_path):
    """A blank film, or a real one stored as 12-bit data in a 16-bit PNG (as dark as that reads),
    would read a confident Normal; it is refused instead, and the 16-bit case says what to do."""
    from PIL import Image

    film = np.asarray(Image.open(mias_dir / "mdb028.png"))  # 8-bit, a malignant mass
    assert analyzer.analyze(read_image(mias_dir / "mdb028.png")).breast_mask.mean() > 0.2
    Image.fromarray(film.astype(np.uint16) * 16).save(tmp_path / "twelve_bit.png")
    with pytest.raises(NoBreastError, match=r"^twelve_bit\.png: no breast found: .* brightest pixel "
                       r"is 5\.3 % .* 16-bit file holding 10- to 14-bit data"):
        analyzer.analyze(read_image(tmp_path / "twelve_bit.png"))
    Image.fromarray(np.zeros((400, 300), np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(NoBreastError, match=r"^blank\.png: no breast found: the image is blank or too "
                       r"dark \(its brightest pixel is 0\.0 % of full scale; breast tissue is read from 8 % up\)$"):
        analyzer.analyze(read_image(tmp_path / "blank.png"))


def test_temperature_is_applied(analyzer):
    raw = np.array([0.7, 0.2, 0.1], np.float32)
    cal = analyzer.calibrate(raw)
    t = analyzer.temperature
    expected = np.exp(np.log(raw) / t)
    np.testing.assert_allclose(cal, expected / expected.sum(), rtol=1e-5)


def test_heatmap_full_resolution(analyzer, mias_dir):
    m = read_image(mias_dir / "mdb002.png")
    h = analyzer.heatmap(m)
    assert h.shape == m.pixels.shape and h.dtype == np.float32
    assert 0.0 <= h.min() and h.max() <= 1.0


def test_top_cells_ranks_by_lesion_probability():
    probs = np.zeros((4, 3, 3), np.float32)
    probs[..., 0] = 1.0
    probs[2, 1] = (0.1, 0.2, 0.7)
    probs[0, 0] = (0.5, 0.5, 0.0)
    breast = np.ones((4, 3), bool)
    c = top_cells(probs, breast, 2, 32)
    assert c.cells_rc.tolist() == [[2, 1], [0, 0]]
    np.testing.assert_allclose(c.canvas_xy[0], (1.5 * 32, 2.5 * 32))
    breast[2, 1] = False  # outside the breast: never a candidate
    assert c.cells_rc.tolist() != top_cells(probs, breast, 2, 32).cells_rc.tolist()


def test_candidate_patches_centre_and_pad():
    work = np.arange(100, dtype=np.float32).reshape(10, 10)
    p = candidate_patches(work, np.array([[5.5, 5.5], [0.2, 0.2]]), 4)
    assert p.shape == (2, 4, 4)
    assert p[0, 2, 2] == work[5, 5]
    assert p[1, 0, 0] == 0.0 and p[1, 2, 2] == work[0, 0]


def test_verify_cells_rereads_the_top_cells_from_patches_centred_on_them():
    rng = np.random.default_rng(0)
    rows, cols, cell, patch = 6, 5, 32, 64
    cells = rng.dirichlet((8, 1, 1), size=(rows, cols)).astype(np.float32)
    breast = np.ones((rows, cols), bool)
    breast[0] = False
    canvas = rng.random((rows * cell, cols * cell)).astype(np.float32)
    seen = []

    def read(patches):  # a reading that depends on the patch's centre pixel only
        seen.append(patches.copy())
        centre = patches[:, patch // 2, patch // 2]
        return np.stack([1 - centre, centre / 2, centre / 2], axis=1)

    out = verify_cells(cells, canvas, breast, 3, cell, patch, read)
    top = top_cells(cells, breast, 3, cell).cells_rc
    changed = np.argwhere(np.abs(out - cells).sum(axis=-1) > 0)
    assert sorted(map(tuple, changed)) == sorted(map(tuple, top))
    for r, c in top:
        v = canvas[r * cell + cell // 2, c * cell + cell // 2]
        np.testing.assert_allclose(out[r, c], 0.5 * (cells[r, c] + [1 - v, v / 2, v / 2]), rtol=1e-6)
    assert seen[0].shape == (3, patch, patch)
    assert np.allclose(out.sum(axis=-1), 1, atol=1e-5)
    np.testing.assert_array_equal(verify_cells(cells, canvas, breast, 0, cell, patch, read), cells)
    with pytest.raises(ValueError, match="shape"):
        verify_cells(cells, canvas, breast, 3, cell, patch, lambda p: np.zeros((2, 3)))


def test_verify_cells_averages_the_shifted_crops_of_each_cell():
    rng = np.random.default_rng(3)
    rows, cols, cell, patch = 6, 5, 32, 64
    cells = rng.dirichlet((8, 1, 1), size=(rows, cols)).astype(np.float32)
    breast = np.ones((rows, cols), bool)
    canvas = rng.random((rows * cell, cols * cell)).astype(np.float32)
    shifts = [[0, 0], [-8, -8], [8, -8], [-8, 8], [8, 8]]
    seen = []

    def read(patches):  # depends on the patch's centre pixel only
        seen.append(len(patches))
        centre = patches[:, patch // 2, patch // 2]
        return np.stack([1 - centre, centre / 2, centre / 2], axis=1)

    out = verify_cells(cells, canvas, breast, 3, cell, patch, read, shifts)
    assert seen == [15]  # one call: 3 cells x 5 crops
    for r, c in top_cells(cells, breast, 3, cell).cells_rc:
        cy, cx = r * cell + cell // 2, c * cell + cell // 2
        v = np.mean([canvas[cy + dy, cx + dx] for dx, dy in shifts])
        np.testing.assert_allclose(out[r, c], 0.5 * (cells[r, c] + [1 - v, v / 2, v / 2]), rtol=1e-5)
    centred = verify_cells(cells, canvas, breast, 3, cell, patch, read)
    assert not np.allclose(out, centred)  # the shifted crops change the reading
    with pytest.raises(ValueError, match=r"shape \(3, 3\), expected \(15, 3\)"):
        verify_cells(cells, canvas, breast, 3, cell, patch, lambda p: np.zeros((3, 3)), shifts)


def test_a_bundle_whose_verifier_does_not_match_its_crops_is_refused(bundle_dir, tmp_path):
    card = json.loads((bundle_dir / "model.json").read_text())
    shifts = card["pipeline"].get("verify_shifts", [[0, 0]])
    ok = Analyzer.from_bundle(bundle_dir)
    assert len(ok.verify_shifts) == len(shifts)
    one_more = [*shifts, [4, 4]]
    with pytest.raises(BundleError, match="verifier.tflite takes"):
        Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / "more",
                                           lambda c: c["pipeline"].update(verify_shifts=one_more)))
    for i, bad in enumerate(([], [[1, 2, 3]], "left", [[0, float("nan")]])):
        with pytest.raises(BundleError, match="verify_shifts must be"):
            Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / f"bad{i}",
                                               lambda c, b=bad: c["pipeline"].update(verify_shifts=b)))


def _copy_bundle(src, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def test_bad_bundles_are_refused(bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="not a model bundle folder"):
        load_bundle(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="no model.json"):
        load_bundle(empty)
    damaged = _copy_bundle(bundle_dir, tmp_path)
    with open(damaged / "classifier.tflite", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="checksum"):
        Analyzer.from_bundle(damaged)
    card = json.loads((damaged / "model.json").read_text())
    (damaged / "model.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(damaged)
    card["version"] = "one"
    (damaged / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="semantic version"):
        load_bundle(damaged)


def test_a_bundle_with_a_broken_bilateral_model_is_refused(bundle_dir, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in bundle_dir.iterdir():
        if f.suffix == ".tflite":
            (bundle / f.name).symlink_to(f)
    card = json.loads((bundle_dir / "model.json").read_text())
    assert card["pipeline"]["bilateral"]["intercept"]  # the shipped bundle reads pairs
    card["pipeline"]["bilateral"]["coef"] = [[1.0, 2.0]]
    (bundle / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match=r"model.json pipeline.bilateral needs a \(3, 4\) coef"):
        Analyzer.from_bundle(bundle)
    del card["pipeline"]["bilateral"]  # no bilateral model: a bundle that reads one film at a time
    (bundle / "model.json").write_text(json.dumps(card))
    single = Analyzer.from_bundle(bundle)
    assert not single.reads_pairs
    with pytest.raises(ValueError, match="no bilateral model"):
        single.compare(None, None)


def test_a_pair_is_called_with_the_bundles_class_prior(bundle_dir, tmp_path):
    def prior(value):
        return lambda card: card["pipeline"]["bilateral"].update(class_prior=value)

    def no_prior(card):
        card["pipeline"]["bilateral"].pop("class_prior", None)

    p = np.array([0.5, 0.3, 0.2], np.float32)
    plain = Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / "plain", no_prior))
    assert plain.pair_prior is None and plain.call_pair(p) == "Normal"  # arg-max
    balanced = Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / "mias", prior([165, 51, 42])))
    np.testing.assert_allclose(balanced.pair_prior, np.array([165, 51, 42]) / 258)
    assert balanced.call_pair(p) == "Benign"  # 0.3 / 0.198 beats 0.5 / 0.640 and 0.2 / 0.163
    assert balanced.call_pair(np.array([0.9, 0.06, 0.04])) == "Normal"
    assert balanced.bilateral.keys() == {"coef", "intercept"}  # the reading itself is unchanged
    with pytest.raises(BundleError, match="pipeline.bilateral class_prior needs one number per class"):
        Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / "bad", prior([0.5, 0.5])))


def test_a_film_alone_is_read_by_the_bundles_single_film_stage(bundle_dir, tmp_path, mias_dir):
    """``pipeline.single_film`` replaces the temperature for a film read alone, and its class
    prior makes the film's call balanced; without it the classifier's probabilities are shown."""
    from core.pairing import single_film_probs

    coef = [[0.0, 0.0], [1.0, -0.5], [0.2, 1.5]]
    intercept = [0.0, 0.4, -0.3]

    def no_stage(card):
        card["pipeline"].pop("single_film", None)

    def stage(prior):
        def edit(card):
            card["pipeline"]["single_film"] = {"coef": coef, "intercept": intercept, "class_prior": prior}
        return edit

    m = read_image(mias_dir / "mdb028.png")
    plain = Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / "plain", no_stage))
    a = plain.analyze(m)
    assert plain.single_film is None and a.call_prior is None
    np.testing.assert_allclose(a.probabilities, plain.calibrate(a.raw_probabilities), rtol=1e-6)
    assert a.predicted == a.most_probable
    want = single_film_probs(a.raw_probabilities.astype(np.float64), np.array(coef), np.array(intercept))
    # A prior proportional to the square of the stage's probabilities calls the least probable class.
    staged = Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / "staged", stage((want ** 2).tolist())))
    b = staged.analyze(m)
    np.testing.assert_allclose(b.raw_probabilities, a.raw_probabilities, rtol=1e-6)
    np.testing.assert_allclose(b.probabilities, want, rtol=1e-5)
    assert not np.allclose(b.probabilities, a.probabilities, atol=1e-3)
    assert b.predicted == b.classes[int(np.argmin(want))] != b.most_probable
    with pytest.raises(BundleError, match=r"pipeline.single_film needs a \(3, 2\) coef"):
        Analyzer.from_bundle(edited_bundle(bundle_dir, tmp_path / "bad", lambda c: c["pipeline"].update(
            single_film={"coef": [[1.0]], "intercept": intercept})))


def test_inference_does_not_import_tensorflow(bundle_dir, mias_dir):
    code = (
        "import sys\n"
        "from core.inference import Analyzer\n"
        "from core.io import read_image\n"
        f"a = Analyzer.from_bundle({str(bundle_dir)!r})\n"
        f"a.analyze(read_image({str(mias_dir / 'mdb001.png')!r}))\n"
        "bad = [m for m in ('tensorflow', 'keras', 'PySide6') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_litert_threads_default_to_the_cores_and_do_not_change_the_answer(monkeypatch, mias_dir):
    import os

    import ai_edge_litert.interpreter as litert

    from core import inference

    asked = []
    real = litert.Interpreter

    def recording(*args, **kwargs):
        asked.append(kwargs.get("num_threads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(litert, "Interpreter", recording)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert inference.default_threads() == max(1, min(cores, 8))
    default = Analyzer.from_bundle()
    assert default.threads == inference.default_threads()
    assert asked == [default.threads] * 3  # segmenter, classifier, verifier
    one = Analyzer.from_bundle(threads=1)
    assert asked[3:] == [1, 1, 1]
    film = read_image(mias_dir / "mdb028.png")
    a, b = default.analyze(film), one.analyze(film)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    np.testing.assert_allclose(a.lesion_probability, b.lesion_probability, atol=1e-5)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        Analyzer.from_bundle(threads=0)
