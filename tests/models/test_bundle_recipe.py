"""The shipped model's recipe end to end at a tiny size: cross-validation, export, LiteRT inference.

Real MIAS films, a small canvas and one epoch: it proves the pieces fit (training inputs come
from core's pipeline, the bundle loads in core and gives the Keras model's answer), not that the
model is good; the figures of the real run are in models/bundled/model.json.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from core.bundle import BundleError  # noqa: E402
from core.inference import Analyzer, breast_cells, pipeline_inputs  # noqa: E402
from core.io import read_image  # noqa: E402
from core.preprocess import PreprocessConfig  # noqa: E402
from models.bundle_recipe import RecipeConfig, run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("run")
    bundle = tmp_path_factory.mktemp("b") / "bundle"
    cfg = RecipeConfig(canvas=(256, 192), global_px=64, patch_px=64, top_k=2, folds=2,
                       scan_epochs=1, scan_lesion_patches=8, scan_normal_patches=16,
                       cls_epochs=1, baseline_px=64,
                       preprocessing=PreprocessConfig(fallback_height_px=256, target_spacing_mm=0.8))
    summary = run(shared_data, out, bundle, cfg, every=16, keep_folds=True)
    return out, bundle, summary


def test_cross_validation_reports_out_of_fold_figures(tiny_run, mias_dir):
    out, _, summary = tiny_run
    oof = json.loads((out / "oof_predictions.json").read_text())
    n = len(oof["labels"])
    assert summary["n_films"] == n
    for name in ("lesion_multibranch", "seed_multibranch", "patch_scan"):
        p = np.asarray(oof[name])
        assert p.shape == (n, 3) and np.allclose(p.sum(axis=1), 1, atol=1e-4)
    # Every film was predicted by a fold that did not train on its patient.
    folds = np.asarray(oof["folds"])
    patients = np.asarray(oof["patients"])
    for pid in set(patients):
        assert len(set(folds[patients == pid])) == 1
    for f in ("confusion_matrix.png", "roc_curves.png", "reliability.png", "comparison.md"):
        assert (out / f).stat().st_size > 0
    table = (out / "comparison.md").read_text()
    assert "patch scan" in table and "seed-style" in table and "beside the other breast" in table
    saved = np.load(out / "oof_cells.npz")
    cells = saved["cells"]
    assert cells.shape == (n, 256 // 32, 192 // 32, 3) and np.allclose(cells.sum(axis=-1), 1, atol=1e-4)
    # The breast cells are saved beside the maps (for models.bilateral's probes), as core finds them.
    breast = saved["breast"]
    assert breast.shape == cells.shape[:3] and breast.dtype == bool
    # --keep-folds: each fold's scanners and raw maps; its held-out films are the out-of-fold rows.
    for k in range(2):
        kept = np.load(out / "folds" / str(k) / "raw_cells.npz")
        assert set(kept["test"]) == set(np.flatnonzero(folds == k))
        assert kept["cells"].shape == cells.shape and not set(kept["train"]) & set(kept["test"])
        assert (out / "folds" / str(k) / "scanner0.keras").stat().st_size > 0
    cfg = RecipeConfig(canvas=(256, 192), global_px=64,
                       preprocessing=PreprocessConfig(fallback_height_px=256, target_spacing_mm=0.8))
    x = pipeline_inputs(read_image(mias_dir / str(saved["names"][0])), cfg.preprocessing, cfg.canvas,
                        cfg.global_px)
    np.testing.assert_array_equal(breast[0], breast_cells(x["canvas_breast"], cfg.cell_px))


def test_exported_bundle_runs_in_core(tiny_run, mias_dir):
    _, bundle, summary = tiny_run
    card = json.loads((bundle / "model.json").read_text())
    assert card["evaluation"]["classifier"]["accuracy"]["ci95"] is not None
    assert card["temperature"] == pytest.approx(summary["temperature"])
    assert card["pipeline"]["canvas"] == [256, 192]
    a = Analyzer.from_bundle(bundle)
    m = read_image(mias_dir / "mdb001.png")
    result = a.analyze(m)
    assert result.lesion_mask.shape == m.pixels.shape
    assert abs(float(result.probabilities.sum()) - 1) < 1e-5
    # The verifier ships with the bundle and re-reads exactly the top cells of the segmenter.
    assert (bundle / "verifier.tflite").is_file() and card["pipeline"]["verify_top"] == 16
    x = a.inputs_for(m)
    raw = a.segment(x["canvas"])
    cells = result.cache["cells"]
    changed = np.abs(cells - raw).sum(axis=-1) > 1e-6
    assert 0 < changed.sum() <= a.verify_top
    # The bilateral stage was fitted on the run's out-of-fold readings (every 16th woman, both
    # films) and ships in the bundle: core reads mdb001 beside mdb002 with exactly that model.
    assert summary["bilateral"]["paired_films"] == summary["n_films"]
    assert card["pipeline"]["bilateral"]["coef"] == summary["bilateral"]["params"]["coef"]
    # A pair is called with the training films' class shares, as the figures were computed.
    labels = json.loads((tiny_run[0] / "oof_predictions.json").read_text())["labels"]
    shares = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(card["pipeline"]["bilateral"]["class_prior"], shares)
    np.testing.assert_allclose(a.pair_prior, shares)
    assert card["evaluation"]["classifier"]["decision"] == "balanced"
    # A film alone: the single-film stage ships only if it lowered the cross-fitted log loss.
    stage = summary["calibration"]["single_film"]
    assert ("single_film" in card["pipeline"]) == stage["shipped"] == (a.single_film is not None)
    if not stage["shipped"]:
        assert card["evaluation"]["classifier_single_film"]["decision"] == "argmax"
    assert a.reads_pairs
    other = a.analyze(read_image(mias_dir / "mdb002.png"))
    pair = a.compare(result, other)
    assert pair.shape == (3,) and abs(float(pair.sum()) - 1) < 1e-5
    # A bundle whose verifier was removed is refused, not silently run without it.
    (bundle / "verifier.tflite").rename(bundle / "verifier.off")
    try:
        with pytest.raises(BundleError, match="verifier.tflite"):
            Analyzer.from_bundle(bundle)
    finally:
        (bundle / "verifier.off").rename(bundle / "verifier.tflite")


def test_a_run_evaluated_before_the_balanced_call_exports_an_arg_max_bundle(tiny_run):
    from models.bundle_export import bundle_metadata

    out, _, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    called = bundle_metadata(config, evaluation)
    assert "class_prior" in called["pipeline"]["bilateral"]
    assert any("stands highest against its share" in x for x in called["limitations"])
    # A run whose single-film stage ships: a film alone is read and called by it as well.
    staged = json.loads(json.dumps(evaluation))
    params = {"coef": [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "intercept": [0.0, -1.0, -1.0]}
    staged["calibration"]["single_film"] = {"params": params, "shipped": True, "log_loss": 0.7,
                                            "log_loss_before": 0.8, "method": "cross-fitted"}
    staged["reports"]["lesion_multibranch_single_film"] = {"decision": "balanced", "marker": 1}
    meta = bundle_metadata(config, staged)
    assert meta["pipeline"]["single_film"]["coef"] == params["coef"]
    assert meta["pipeline"]["single_film"]["class_prior"] == evaluation["decision"]["class_prior"]
    assert meta["evaluation"]["classifier_single_film"]["marker"] == 1
    assert "Single-film stage" in meta["description"]
    assert any("read beside the other breast or alone" in x for x in meta["limitations"])
    assert "single_film" not in called["pipeline"] or evaluation["calibration"]["single_film"]["shipped"]
    staged["calibration"]["single_film"]["shipped"] = False
    assert "single_film" not in bundle_metadata(config, staged)["pipeline"]
    evaluation.pop("decision")
    old = bundle_metadata(config, evaluation)
    assert "class_prior" not in old["pipeline"]["bilateral"] and "call" not in old["pipeline"]["bilateral"]
    assert not any("stands highest against its share" in x for x in old["limitations"])


def test_segmenter_reads_the_scanner_window_centred_on_each_cell():
    """The exported segmenter is the patch scanner run convolutionally: each cell's logits are
    the scanner head on Lite0 cell features averaged over a patch-sized window, the four
    windows touching the cell averaged so the reading is centred on it (edges repeated)."""
    import keras

    from models.bundle_recipe import build_scanner, build_segmenter

    cfg = RecipeConfig(canvas=(256, 192), patch_px=128, cell_px=32, scan_scales=(1,))
    scanner = build_scanner(cfg)
    rng = np.random.default_rng(0)
    scanner.get_layer("scan_probs").set_weights([rng.normal(0, 0.05, (1280, 3)).astype(np.float32),
                                                 np.array([0.1, -0.2, 0.3], np.float32)])
    seg = build_segmenter(cfg, scanner)
    x = rng.random((1, 256, 192, 1), dtype=np.float32)
    probs = seg.predict_on_batch(x)[0]
    assert probs.shape == (8, 6, 3)
    logits = keras.Model(seg.input, seg.get_layer("cell_logits").output).predict_on_batch(x)[0]
    rows, cols, _ = logits.shape

    def window(r, c):  # the 4x4 cells r-1 .. r+2, c-1 .. c+2 that exist
        return logits[max(r - 1, 0) : r + 3, max(c - 1, 0) : c + 3].mean(axis=(0, 1))

    for r in range(rows):
        for c in range(cols):
            z = np.mean([window(max(r - dr, 0), max(c - dc, 0)) for dr in (0, 1) for dc in (0, 1)], axis=0)
            expected = np.exp(z) / np.exp(z).sum()
            np.testing.assert_allclose(probs[r, c], expected, atol=1e-5)
    # The canvas network carries the scanner's (fine-tuned) weights, not a fresh copy.
    for a, b in zip(seg.get_layer("lite0_canvas").get_weights(), scanner.get_layer("lite0_scan").get_weights(),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def _random_head_scanners(cfg, rng, n):
    """``n`` scanners of ImageNet Lite0 with different random heads."""
    from models.bundle_recipe import build_scanner

    scanners = []
    for _ in range(n):
        sc = build_scanner(cfg)
        sc.get_layer("scan_probs").set_weights([rng.normal(0, 0.05, (1280, 3)).astype(np.float32),
                                                rng.normal(0, 0.2, 3).astype(np.float32)])
        scanners.append(sc)
    return scanners


def test_two_scale_segmenter_averages_each_scanner_on_its_own_canvas():
    """A scale-2 scanner reads the canvas mean-pooled 2x2 and its cells cover 2x2 canvas cells;
    the segmenter is the mean of the scanners' cell probabilities."""
    import dataclasses

    from models.bundle_recipe import build_segmenter

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, scan_scales=(1, 2), verify_top=0)
    rng = np.random.default_rng(0)
    scanners = _random_head_scanners(cfg, rng, 2)
    x = rng.random((1, 256, 192, 1), dtype=np.float32)
    both = build_segmenter(cfg, scanners).predict_on_batch(x)[0]
    assert both.shape == (8, 6, 3)
    full = build_segmenter(cfg, [scanners[0]], [1]).predict_on_batch(x)[0]
    half_cfg = dataclasses.replace(cfg, canvas=(128, 96), scan_scales=(1,))
    pooled = x.reshape(1, 128, 2, 96, 2, 1).mean(axis=(2, 4))
    half = build_segmenter(half_cfg, scanners[1]).predict_on_batch(pooled)[0]
    assert half.shape == (4, 3, 3)
    expected = 0.5 * (full + np.repeat(np.repeat(half, 2, axis=0), 2, axis=1))
    np.testing.assert_allclose(both, expected, atol=1e-5)
    assert not np.allclose(full, expected, atol=1e-3)  # the second scanner does count


def test_verifier_is_the_mean_of_the_scanners_on_each_patch():
    from models.bundle_recipe import build_verifier

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, verify_top=3, verify_jitter_px=8,
                       verify_crops="diag5")
    assert cfg.verify_shifts() == [[0, 0], [-8, -8], [8, -8], [-8, 8], [8, 8]]
    rng = np.random.default_rng(1)
    scanners = _random_head_scanners(cfg, rng, 2)
    x = rng.random((2, 15, 64, 64, 1), dtype=np.float32)  # two films' 3 cells x 5 crops
    got = build_verifier(cfg, scanners).predict_on_batch(x)
    assert got.shape == (2, 15, 3)
    for film in range(2):  # each film's patches read in place, never mixed with the other's
        each = [sc.predict_on_batch(x[film]) for sc in scanners]
        np.testing.assert_allclose(got[film], 0.5 * (each[0] + each[1]), atol=1e-5)
        assert not np.allclose(each[0], each[1], atol=1e-3)


def test_recipe_reads_films_through_litert_as_keras_does():
    """cell_probs and verified_probs run the segmenter and verifier through LiteRT; their
    readings are Keras's, film by film (and the verifier's reach the cells it re-reads)."""
    from models.bundle_recipe import build_segmenter, build_verifier, cell_probs, verified_probs

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, verify_top=3, verify_jitter_px=8)
    rng = np.random.default_rng(3)
    scanners = _random_head_scanners(cfg, rng, 2)
    canvases = rng.random((3, 256, 192), dtype=np.float32)
    segmenter = build_segmenter(cfg, scanners)
    got = cell_probs(segmenter, canvases)
    assert got.shape == (3, 8, 6, 3)
    np.testing.assert_allclose(got, segmenter.predict_on_batch(canvases[..., None]), atol=1e-4)

    class Films:  # the two fields verified_probs reads
        pass

    films = Films()
    films.canvases, films.cell_breast = canvases, np.ones((3, 8, 6), bool)
    verifier = build_verifier(cfg, scanners)
    verified = verified_probs(films, got, verifier, cfg)
    from core.inference import verify_cells

    def keras_read(patches):
        return verifier.predict_on_batch(patches[None, ..., None])[0]

    for i in range(3):
        expected = verify_cells(got[i], canvases[i], films.cell_breast[i], cfg.verify_top, cfg.cell_px,
                                cfg.patch_px, keras_read, cfg.verify_shifts())
        np.testing.assert_allclose(verified[i], expected, atol=1e-4)
    assert not np.allclose(verified, got, atol=1e-3)  # the verifier did re-read some cells


def test_flip_reading_averages_the_film_and_its_mirror_cell_by_cell():
    """With ``tta_flip`` the segmenter's map is the mean of the plain map and the mirrored film's
    map mirrored back, and the verifier's reading the mean over each patch and its mirror."""
    import dataclasses

    from models.bundle_recipe import build_segmenter, build_verifier

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, verify_top=3, verify_jitter_px=0)
    flip_cfg = dataclasses.replace(cfg, tta_flip=True)
    rng = np.random.default_rng(2)
    scanners = _random_head_scanners(cfg, rng, 2)
    x = rng.random((1, 256, 192, 1), dtype=np.float32)
    plain = build_segmenter(cfg, scanners)
    direct = plain.predict_on_batch(x)[0]
    mirrored = plain.predict_on_batch(x[:, :, ::-1].copy())[0, :, ::-1]
    got = build_segmenter(flip_cfg, scanners).predict_on_batch(x)[0]
    np.testing.assert_allclose(got, 0.5 * (direct + mirrored), atol=1e-5)
    assert not np.allclose(direct, mirrored, atol=1e-3)  # the mirror reads differently

    patches = rng.random((1, 3, 64, 64, 1), dtype=np.float32)
    verifier = build_verifier(cfg, scanners)
    both = 0.5 * (verifier.predict_on_batch(patches)[0]
                  + verifier.predict_on_batch(patches[:, :, :, ::-1].copy())[0])
    np.testing.assert_allclose(build_verifier(flip_cfg, scanners).predict_on_batch(patches)[0], both,
                               atol=1e-5)


def test_recipe_config_rejects_scales_that_do_not_tile_the_canvas():
    with pytest.raises(ValueError, match="multiple"):
        RecipeConfig(canvas=(256, 200), cell_px=32, scan_scales=(1,))
    with pytest.raises(ValueError, match="multiple"):
        RecipeConfig(canvas=(256, 160), cell_px=32, scan_scales=(1, 2), verify_top=0)
    with pytest.raises(ValueError, match="positive"):
        RecipeConfig(scan_scales=(0,))
    assert RecipeConfig(scan_scales=[1, 2], verify_top=0).scan_scales == (1, 2)
    with pytest.raises(ValueError, match="scale-1"):
        RecipeConfig(scan_scales=(1, 2))
    with pytest.raises(ValueError, match="verify_top"):
        RecipeConfig(verify_top=-1)
    for bad in (-1, 64):  # a shift of half the 128 px patch or more is refused
        with pytest.raises(ValueError, match="verify_jitter_px"):
            RecipeConfig(patch_px=128, verify_jitter_px=bad)
    assert RecipeConfig(verify_jitter_px=0).verify_shifts() == [[0, 0]]
    with pytest.raises(ValueError, match="diag5, diag2"):
        RecipeConfig(verify_jitter_px=12, verify_crops="diag3")
    with pytest.raises(ValueError, match="head_bag"):
        RecipeConfig(head_bag=0)


def test_a_bag_of_heads_reads_the_mean_of_its_differently_seeded_heads():
    from models.bundle_recipe import FEATURES, bag_heads, build_classifier, fit_heads, head_seed

    cfg = RecipeConfig(global_px=32, patch_px=32, top_k=2, cls_epochs=1, head_bag=3)
    rng = np.random.default_rng(0)
    n = 12
    inputs = [rng.random((n, 32, 32, 1), np.float32), rng.random((n, 2, FEATURES), np.float32),
              rng.random((n, 2, 3), np.float32), np.log(rng.dirichlet(np.ones(3), n)).astype(np.float32)]
    y = np.arange(n) % 3
    heads, history = fit_heads(cfg, inputs, y, seed=5)
    assert len(heads) == 3 and len(history["loss"]) == 1
    each = np.stack([h.predict(inputs, verbose=0) for h in heads])
    assert np.abs(each[0] - each[1]).max() > 1e-4  # their own seeds: not three copies of one head
    bag = bag_heads(heads)
    np.testing.assert_allclose(bag.predict(inputs, verbose=0), each.mean(axis=0), atol=1e-6)
    # The first head is trained as the single head is, from the same seed.
    assert head_seed(5, 0) == 5 and len({head_seed(5, j) for j in range(3)}) == 3
    single, _ = fit_heads(RecipeConfig(global_px=32, patch_px=32, top_k=2, cls_epochs=1), inputs, y, seed=5)
    assert len(single) == 1 and bag_heads(single) is single[0]
    # The exported classifier carries the bag: its patches go through Lite0 to the same mean.
    classifier = build_classifier(cfg, bag)
    patches = rng.random((2, 2, 32, 32, 1), np.float32)
    feats = np.asarray(classifier.get_layer("per_patch")(patches))
    want = np.mean([h.predict([inputs[0][:2], feats, inputs[2][:2], inputs[3][:2]], verbose=0) for h in heads],
                   axis=0)
    got = classifier.predict([inputs[0][:2], patches, inputs[2][:2], inputs[3][:2]], verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_verify_crop_sets_are_symmetric_about_the_cell_centre():
    five = RecipeConfig(verify_jitter_px=12, verify_crops="diag5").verify_shifts()
    two = RecipeConfig(verify_jitter_px=12, verify_crops="diag2").verify_shifts()
    assert two == [[-12, -12], [12, 12]] and [0, 0] not in two
    assert len(five) == 5 and five[0] == [0, 0] and all(s in five for s in two)
    for shifts in (five, two):  # the mean crop centre is the cell centre
        assert np.asarray(shifts).sum(axis=0).tolist() == [0, 0]
    # without a jitter the crop set does not matter: the centred crop only
    assert RecipeConfig(verify_jitter_px=0, verify_crops="diag2").verify_shifts() == [[0, 0]]


def test_bundle_metadata_and_card_follow_the_verifier_crop_set(tiny_run):
    from models.bundle_export import _description, bundle_metadata

    out, _, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    base = {"patch_px": 128, "cell_px": 32, "scan_scales": [1, 1], "verify_top": 16}
    for crops, shifts, words in (("diag5", 5, "5 crops (centred and moved 12 px along each diagonal)"),
                                 ("diag2", 2, "2 crops (with its centre moved 12 px along the main "
                                              "diagonal, both ways)")):
        cfg = {**config, "verify_jitter_px": 12, "verify_crops": crops}
        assert len(bundle_metadata(cfg, evaluation)["pipeline"]["verify_shifts"]) == shifts
        assert words in _description({**base, "verify_jitter_px": 12, "verify_crops": crops})
    # a run from before verify_crops existed read the five crops
    old = {k: v for k, v in config.items() if k != "verify_crops"}
    assert len(bundle_metadata({**old, "verify_jitter_px": 12}, evaluation)["pipeline"]["verify_shifts"]) == 5


def _replicate_of(tiny_run, root, seed=7, **config_changes):
    """A copy of the tiny run's config and evaluation as a cross-validation-only run of another
    seed, its pair figures lowered so that they cannot be mistaken for the run's own."""
    out, _, _ = tiny_run
    config = {**json.loads((out / "config.json").read_text()), "seed": seed, **config_changes}
    evaluation = json.loads((out / "evaluation.json").read_text())
    for report in evaluation["reports"].values():
        report["per_class"]["Cancer"]["auc"]["value"] = 0.25
        report["macro_auc"]["value"] = 0.5
        report["balanced_accuracy"]["value"] = 0.125
    rep = root / f"seed{seed}"
    rep.mkdir()
    (rep / "config.json").write_text(json.dumps(config))
    (rep / "evaluation.json").write_text(json.dumps(evaluation))
    return rep


def test_replicate_figures_go_into_the_card_beside_the_run_own(tiny_run, tmp_path):
    from models.bundle_export import bundle_metadata, read_replicates
    from models.export import render_model_card, validate_metadata

    out, _, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    reps = read_replicates(config, evaluation, [_replicate_of(tiny_run, tmp_path, 7),
                                                _replicate_of(tiny_run, tmp_path, 8)])
    assert [seed for seed, _ in reps] == [7, 8]
    meta = bundle_metadata(config, evaluation, reps)
    validate_metadata(meta)
    splits = meta["evaluation"]["other_fold_splits"]
    assert splits["fold split seed 7: film beside the other breast"]["macro_auc"]["value"] == 0.5
    assert {"fold split seed 8: patch scan (top cells)", "fold split seed 8: film alone",
            "fold split seed 8: seed-style whole-image multi-branch"} <= set(splits)
    # The limitation compares the pair's figures split by split, with their mean.
    own = evaluation["reports"]["lesion_multibranch_bilateral"]["per_class"]["Cancer"]["auc"]["value"]
    text, = [x for x in meta["limitations"] if "other splits" in x]
    assert f"cancer AUC {own:.3f} (seed 0), 0.250 (seed 7), 0.250 (seed 8), mean {(own + 0.5) / 3:.3f}" in text
    card = render_model_card(meta)
    assert "### other_fold_splits" in card and "| fold split seed 7: film beside the other breast | " in card
    # Without replicates nothing of the kind is claimed.
    plain = bundle_metadata(config, evaluation)
    assert "other_fold_splits" not in plain["evaluation"]
    assert not any("fold split" in x for x in plain["limitations"])


@pytest.mark.parametrize(
    ("make", "expected"),
    [(lambda r, t: _replicate_of(r, t, 0), "seed 0 gives the same fold split as the exported run"),
     (lambda r, t: _replicate_of(r, t, 3, verify_crops="diag5", folds=3),
      "not a replicate of the exported run's recipe (it differs in folds, verify_crops)"),
     (lambda r, t: t / "nowhere", "no such run folder"),
     (lambda r, t: (t / "empty").mkdir() or t / "empty", "missing config.json, evaluation.json")],
    ids=["same-seed", "other-recipe", "missing", "empty"],
)
def test_export_refuses_a_replicate_that_is_not_one_before_writing(tiny_run, tmp_path, capsys, make,
                                                                   expected):
    from core.cli import main

    out, _, _ = tiny_run
    rep = make(tiny_run, tmp_path)
    rc = main(["export", str(out), str(tmp_path / "bundle"), "--replicate", str(rep)])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "bundle").exists()


def test_a_run_exports_from_a_fresh_process(tiny_run, tmp_path):
    """`mammolab export` on its own: the run's models load with nothing else imported first
    (their patch layers are MammoLab's, which Keras must find registered)."""
    import subprocess
    import sys

    out, _, _ = tiny_run
    target = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-c", "import sys; from core.cli import main; sys.exit(main(sys.argv[1:]))",
                           "export", str(out), str(target)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads((target / "model.json").read_text())
    assert {"classifier.tflite", "segmenter.tflite", "verifier.tflite"} <= set(card["files"])


def test_export_refuses_a_replicate_on_other_films_or_another_reading(tiny_run, tmp_path):
    from models.bundle_export import RunError, read_replicates

    out, _, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    rep = _replicate_of(tiny_run, tmp_path, 5)
    (rep / "evaluation.json").write_text(json.dumps({**evaluation, "n_films": evaluation["n_films"] + 2}))
    with pytest.raises(RunError, match=f"evaluated on {evaluation['n_films'] + 2} films"):
        read_replicates(config, evaluation, [rep])
    (rep / "evaluation.json").write_text(json.dumps({**evaluation, "bilateral": None}))
    with pytest.raises(RunError, match="it has no bilateral stage and the exported run has one"):
        read_replicates(config, evaluation, [rep])
    (rep / "evaluation.json").write_text("{")
    with pytest.raises(RunError, match="unreadable run files"):
        read_replicates(config, evaluation, [rep])


def _synthetic_films(n=4, h=256, w=192, cell=32):
    """Films with one bright disk lesion on film 0 (benign) and film 1 (malignant)."""
    from models.bundle_recipe import Films

    yy, xx = np.mgrid[:h, :w]
    canvases = np.full((n, h, w), 0.2, np.float16)
    lesion = np.zeros((n, h, w), bool)
    lesions = [(0, 60.0, 100.0, 20.0, 1), (1, 130.0, 180.0, 20.0, 2)]
    for i, x, y, r, _ in lesions:
        lesion[i] = (xx - x) ** 2 + (yy - y) ** 2 <= r**2
        canvases[i][lesion[i]] = 1.0
    breast = np.ones((n, h, w), bool)
    return Films([f"f{i}" for i in range(n)], np.arange(n).astype(str), np.array([1, 2, 0, 0]), canvases,
                 np.zeros((n, 8, 8), np.float32), np.zeros((n, 8, 8), np.float32),
                 np.ones((n, h // cell, w // cell), bool),
                 breast, lesion, np.array(lesions, np.float64), np.zeros(n, bool), [], [])


@pytest.mark.parametrize("scale", [1, 2])
def test_patch_sampler_centres_lesion_patches_on_lesions_and_normal_ones_away(scale):
    from models.bundle_recipe import PatchSampler

    films = _synthetic_films()
    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, scan_lesion_patches=20, scan_normal_patches=60)
    sampler = PatchSampler(films, np.arange(4), cfg, scale)
    assert sampler.canvases.shape == (4, 256 // scale, 192 // scale)
    x, y = sampler.epoch(np.random.default_rng(0))
    assert x.shape == (100, 64, 64, 1) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [60, 20, 20]
    centre = x[:, 31:33, 31:33, 0].min(axis=(1, 2))
    assert (centre[y > 0] > 0.8).all()  # on the disk, whatever the flips and turns
    assert (x[y == 0, 31:33, 31:33, 0].max(axis=(1, 2)) < 0.4).all()  # never on a lesion


def test_scan_zoom_cuts_wider_and_narrower_windows_and_is_a_no_op_when_off():
    from models.bundle_recipe import PatchSampler

    films = _synthetic_films()
    base = dict(canvas=(256, 192), patch_px=64, cell_px=32, scan_lesion_patches=200, scan_normal_patches=10)
    off = PatchSampler(films, np.arange(4), RecipeConfig(**base))
    # A window twice the patch, resized to the patch: the radius-20 disk of film 0 reads radius 10.
    patch = off._crop(0, 60.0, 100.0, zoom=2.0)
    assert patch.shape == (64, 64)
    assert abs((patch > 0.6).sum() / (np.pi * 10**2) - 1) < 0.1
    assert abs((off._crop(0, 60.0, 100.0) > 0.6).sum() / (np.pi * 20**2) - 1) < 0.05
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    assert off._zoom(rng) == 1.0 and rng.bit_generator.state == state  # off draws nothing

    def disk_areas(sampler):
        x, y = sampler.epoch(np.random.default_rng(0))
        return (x[y > 0, ..., 0] > 0.6).sum(axis=(1, 2))

    # Off, every lesion patch holds the whole disk (jitter <= 10 px): one area. On (windows 32 to
    # 128 px), the disk reads from about a quarter to four times that area.
    plain = disk_areas(off)
    assert plain.max() - plain.min() <= 0.05 * plain.mean()
    zoomed = disk_areas(PatchSampler(films, np.arange(4), RecipeConfig(**base, scan_zoom=2.0)))
    assert zoomed.min() < 0.5 * plain.mean() and zoomed.max() > 2 * plain.mean()
    with pytest.raises(ValueError, match="scan_zoom"):
        RecipeConfig(scan_zoom=0.8)


def test_scan_average_leaves_the_mean_of_the_last_epochs_weights(monkeypatch):
    import keras

    from models.bundle_recipe import train_scanner

    films = _synthetic_films()
    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, scan_lesion_patches=8,
                       scan_normal_patches=16, scan_epochs=3, scan_average=2, scan_blocks=1)
    ends = []  # the fitted weights at the end of every fit: the head-only epoch, then the 3 fine-tuning ones
    fit = keras.Model.fit

    def recording_fit(self, *args, **kwargs):
        out = fit(self, *args, **kwargs)
        ends.append({id(v): np.array(v) for v in self.weights})  # the scanner's own variables
        return out

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    scanner, history = train_scanner(films, np.arange(4), cfg, seed=5)
    assert len(ends) == 4 and len(history["loss"]) == 4
    got = {id(v): np.array(v) for v in scanner.weights}
    assert ends[3].keys() <= got.keys()
    moved = [k for k in ends[3] if not np.allclose(ends[2][k], ends[3][k])]
    assert moved  # the last two epochs differ, so the mean is neither of them
    for k in ends[3]:
        np.testing.assert_allclose(got[k], (ends[2][k].astype(np.float64) + ends[3][k]) / 2, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got[moved[0]], ends[3][moved[0]])
    with pytest.raises(ValueError, match="scan_average"):
        RecipeConfig(scan_average=0)


def test_scan_average_is_capped_at_the_fine_tuning_epochs():
    from models.bundle_export import _description
    from models.bundle_recipe import scan_average_epochs

    assert RecipeConfig().scan_average == 3  # the recipe averages the last 3 of its 5 epochs
    assert RecipeConfig(scan_epochs=1).scan_epochs == 1  # the default does not refuse fewer epochs
    assert [scan_average_epochs(3, e) for e in (1, 2, 3, 5)] == [1, 2, 3, 3]
    short = _description({"patch_px": 128, "cell_px": 32, "scan_scales": [1, 1], "scan_average": 3,
                          "scan_epochs": 2})
    assert "last 2 fine-tuning epochs" in short
    off = _description({"patch_px": 128, "cell_px": 32, "scan_scales": [1, 1], "scan_average": 3,
                        "scan_epochs": 1})
    assert "fine-tuning epochs" not in off


def test_mini_ddsm_mask_lesions_become_scanner_circles_inside_their_masks(miniddsm_dir):
    from models.bundle_recipe import prepare_films
    from models.data import load_mini_ddsm

    records = load_mini_ddsm(miniddsm_dir)
    films = prepare_films(records, RecipeConfig())
    with_masks = [i for i, r in enumerate(records) if r.mask_paths]
    assert set(films.lesions[:, 0].astype(int)) == set(with_masks)
    assert len(films.lesions) == sum(len(records[i].mask_paths) for i in with_masks)
    assert (films.lesions[:, 4] == 1).all()  # the sample's cases are all benign
    for i, x, y, r, _ in films.lesions:
        assert films.canvas_lesion[int(i), int(round(y)), int(round(x))]  # centre on its mask
        area = films.canvas_lesion[int(i)].sum()
        assert np.pi * r * r <= area * 1.05  # a disc no larger than the film's lesion pixels
    assert not films.unknown.any()  # every abnormal view's lesion is located


def test_extra_films_join_the_sampler_with_their_lesions():
    from models.bundle_recipe import PatchSampler, join_films

    a, b = _synthetic_films(), _synthetic_films()
    b.canvases[~b.canvas_lesion] = 0.5  # b's tissue is brighter than a's (0.2): tells them apart
    joined = join_films(a, b)
    assert len(joined.names) == 8 and joined.canvases.shape[0] == 8
    assert joined.lesions[2:, 0].tolist() == [4.0, 5.0] and joined.lesions[:2, 0].tolist() == [0.0, 1.0]
    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, scan_lesion_patches=200,
                       scan_normal_patches=200)
    x, y = PatchSampler(joined, np.arange(8), cfg).epoch(np.random.default_rng(0))
    centre = x[:, 31:33, 31:33, 0].min(axis=(1, 2))
    assert (centre[y > 0] > 0.8).all()
    # After any gamma and gain a's tissue reads below 0.31 and b's above 0.37: a lesion patch's
    # corner and a normal patch's centre are tissue, so they say which set a patch came from.
    lesion_from_b = x[y > 0, 0, 0, 0] > 0.34
    normal_from_b = centre[y == 0] > 0.34
    assert 0.35 < lesion_from_b.mean() < 0.65 and 0.35 < normal_from_b.mean() < 0.65


def test_hard_negatives_are_high_scoring_cells_clear_of_lesions():
    from models.bundle_recipe import PatchSampler

    films = _synthetic_films()
    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32)
    sampler = PatchSampler(films, np.arange(4), cfg)
    cells = np.zeros((len(sampler.normal_films), 8, 6, 3), np.float32)
    cells[..., 0] = 1.0
    cells[:, 3, 1] = [0.1, 0.9, 0.0]  # on film 0's lesion (x 60, y 100): excluded there
    cells[:, 7, 5] = [0.2, 0.0, 0.8]  # far from every lesion: kept everywhere
    hard = sampler.hard_negatives(cells, per_film=2)
    assert {(int(i), x, y) for i, x, y in hard} >= {(i, 176.0, 240.0) for i in range(4)}
    assert (0, 48.0, 112.0) not in {(int(i), x, y) for i, x, y in hard}
    assert (2, 48.0, 112.0) in {(int(i), x, y) for i, x, y in hard}


def _write_oof(out, probs, labels, seed=0):
    n = len(labels)
    rng = np.random.default_rng(seed)
    patients = np.arange(n).astype(str)
    folds = np.arange(n) % 3
    other = rng.dirichlet(np.ones(3), size=n)
    (out / "oof_predictions.json").write_text(json.dumps({
        "names": [f"f{i}" for i in range(n)], "patients": patients.tolist(), "labels": labels.tolist(),
        "folds": folds.tolist(), "lesion_multibranch": probs.tolist(), "seed_multibranch": other.tolist(),
        "patch_scan": other.tolist()}))


def test_temperature_is_shipped_only_when_it_lowers_the_cross_fitted_ece(tmp_path, monkeypatch):
    from models import bundle_recipe
    from models import evaluation as ev

    rng = np.random.default_rng(1)
    labels = np.tile([0, 1, 2], 60)
    # Overconfident: the right class gets 0.95 but is right only 60 % of the time.
    right = rng.random(len(labels)) < 0.6
    top = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((len(labels), 3), 0.025)
    probs[np.arange(len(labels)), top] = 0.95
    _write_oof(tmp_path, probs, labels)
    reports, temperature, calibration, _ = bundle_recipe.evaluate_oof(tmp_path)
    assert temperature > 1.5 and calibration["shipped_temperature"] == temperature
    assert calibration["ece_with_cross_fitted_temperature"] < calibration["ece_without_temperature"]
    assert reports["lesion_multibranch_calibrated"]["ece"]["value"] < reports["lesion_multibranch"]["ece"]["value"]

    # A temperature that makes things worse on held-out folds is not shipped.
    monkeypatch.setattr(ev, "fit_temperature", lambda p, y: 0.2)
    reports, temperature, calibration, _ = bundle_recipe.evaluate_oof(tmp_path)
    assert temperature == 1.0 and calibration["fitted_temperature"] == 0.2
    assert reports["lesion_multibranch_calibrated"] == reports["lesion_multibranch"]


def test_films_read_by_the_logistic_stages_are_called_balanced_with_their_folds_shares(tmp_path):
    from models import bundle_recipe
    from models.bilateral import contralateral

    rng = np.random.default_rng(3)
    labels = rng.choice(3, size=240, p=[0.64, 0.2, 0.16])
    labels = labels[np.argsort(np.arange(240) // 2, kind="stable")]
    probs = rng.dirichlet(np.ones(3), size=240)
    probs[np.arange(240), labels] += 0.6  # informative, so the logistic stage is not flat
    probs /= probs.sum(axis=1, keepdims=True)
    _write_oof(tmp_path, probs, labels)
    oof = json.loads((tmp_path / "oof_predictions.json").read_text())
    oof["patients"] = [f"w{i // 2}" for i in range(240)]  # pairs: films 2k and 2k + 1
    oof["folds"] = [(i // 2) % 3 for i in range(240)]
    (tmp_path / "oof_predictions.json").write_text(json.dumps(oof))
    assert (contralateral(np.array(oof["patients"])) >= 0).all()
    reports, _, calibration, bilateral = bundle_recipe.evaluate_oof(tmp_path)
    assert bilateral is not None
    pair, plain = reports["lesion_multibranch_bilateral"], reports["lesion_multibranch_bilateral_argmax"]
    assert pair["decision"] == "balanced" and plain["decision"] == "argmax"
    assert pair["macro_auc"] == plain["macro_auc"] and pair["ece"] == plain["ece"]  # same probabilities
    assert pair["confusion_matrix"] != plain["confusion_matrix"]  # fewer films called Normal
    assert np.array(pair["confusion_matrix"])[:, 0].sum() < np.array(plain["confusion_matrix"])[:, 0].sum()
    assert reports["lesion_multibranch_calibrated"]["decision"] == "argmax"
    assert reports["patch_scan"]["decision"] == "argmax"
    assert "arg-max call" in (tmp_path / "comparison.md").read_text()
    # A film alone read by the single-film stage is called the balanced way too, and the table
    # shows the classifier's own probabilities beside it.
    assert calibration["single_film"]["shipped"]
    assert reports["lesion_multibranch_single_film"]["decision"] == "balanced"
    assert "before the single-film stage" in (tmp_path / "comparison.md").read_text()
    decision = bundle_recipe.shipped_decision(np.asarray(labels))
    np.testing.assert_allclose(decision["class_prior"], np.bincount(labels) / 240)
    assert "without the single-film stage is called its most probable class" in decision["call"]


def test_bundle_description_follows_the_scanners_of_the_run():
    from models.bundle_export import _description

    one = _description({"patch_px": 128, "cell_px": 32})
    two = _description({"patch_px": 128, "cell_px": 32, "scan_scales": [1, 1]})
    mixed = _description({"patch_px": 128, "cell_px": 32, "scan_scales": [1, 2]})
    assert one.startswith("Tiled segmenter: a patch scanner") and "averages" not in one
    assert "2 patch scanners" in two and "different seeds" in two and "averages" in two
    assert "downsampled by 1, 2" in mixed and "256 px" in mixed
    assert "Verifier" not in two
    verified = _description({"patch_px": 128, "cell_px": 32, "scan_scales": [1, 1], "verify_top": 16})
    assert "16 most lesion-like cells" in verified and "128 px patch" in verified
    assert "heads" not in verified
    bagged = _description({"patch_px": 128, "cell_px": 32, "scan_scales": [1, 1], "head_bag": 8})
    assert "carries 8 such heads" in bagged and bagged.startswith(two)
    assert "windows" not in two and "fine-tuning epochs" not in two
    trained = _description({"patch_px": 128, "cell_px": 32, "scan_scales": [1, 1], "scan_zoom": 1.25,
                            "scan_average": 3})
    assert "windows 102-160 px wide" in trained and "last 3 fine-tuning epochs" in trained


def test_the_card_states_the_window_the_run_read():
    from models.bundle_export import _resolution_limitation

    default = _resolution_limitation({"patch_px": 128, "cell_px": 32})
    assert "cells are 6.4 mm" in default and "a 25.6 mm window" in default
    finer = _resolution_limitation({"patch_px": 160, "cell_px": 32,
                                    "preprocessing": {"target_spacing_mm": 0.1}})
    assert "cells are 3.2 mm" in finer and "a 16.0 mm window" in finer


@pytest.mark.parametrize(
    ("extra_args", "expected"),
    [(["--cv-only", "--bundle", "b"], "no bundle to export"),
     (["--scanner-extra", "MIAS"], "not a Mini-DDSM folder"),
     (["--scanner-extra", "nowhere"], "not a Mini-DDSM folder"),
     (["--verify-crops", "diag3"], "invalid choice"),
     (["--verify-jitter", "64"], "verify_jitter_px must be in"),
     (["--seed", "-1"], "seed must be in [0, 1000000]"),
     (["--scan-average", "0"], "scan_average must be at least 1"),
     (["--scan-blocks", "18"], "scan_blocks must be in [0, 17]")],
)
def test_recipe_cli_rejects_bad_options_before_training(extra_args, expected, mias_dir, tmp_path,
                                                        monkeypatch, capsys):
    from models import bundle_recipe

    monkeypatch.setattr(bundle_recipe, "run", lambda *a: pytest.fail("training started"))
    args = [str(mias_dir) if a == "MIAS" else str(tmp_path / a) if a in ("b", "nowhere") else a
            for a in extra_args]
    with pytest.raises(SystemExit) as exit_info:
        bundle_recipe.main(["--data", str(mias_dir.parent), "--out", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_cli_hands_the_extra_films_and_cv_only_to_the_run(miniddsm_dir, mias_dir, tmp_path,
                                                                monkeypatch):
    from models import bundle_recipe

    calls = []
    monkeypatch.setattr(bundle_recipe, "run", lambda *a: calls.append(a) or {})
    assert bundle_recipe.main(["--data", str(mias_dir.parent), "--out", str(tmp_path / "run"),
                               "--scanner-extra", str(miniddsm_dir), "--cv-only", "--scan-blocks", "4"]) == 0
    (_, out, bundle, cfg, every, keep, extra, cv_only), = calls
    assert extra == miniddsm_dir and cv_only and bundle is None and not keep and every == 1
    assert cfg.scan_blocks == 4
    assert cfg.seed == 0
    calls.clear()
    assert bundle_recipe.main(["--data", str(mias_dir.parent), "--out", str(tmp_path / "run"),
                               "--seed", "3", "--cv-only"]) == 0
    assert calls[0][3].seed == 3


def test_fits_run_without_tfdata_autotune_and_train_exactly_as_before():
    """tfdata_autotune_off patches this Keras (so the scanners' epochs do not idle at teardown),
    turns autotuning off in fit's pipeline, changes no batch or loss, and is undone on exit."""
    import contextlib

    import keras
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from models.bundle_recipe import tfdata_autotune_off

    rng = np.random.default_rng(4)
    x, y = rng.random((100, 8), dtype=np.float32), rng.integers(0, 3, 100)

    def losses(off: bool) -> list[float]:
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
        out = []
        for _ in range(3):  # the batch order (shuffled) matters with a large step
            with tfdata_autotune_off() if off else contextlib.nullcontext():
                out.append(model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=True).history["loss"][0])
        return out

    original = ArrayDataAdapter.get_tf_dataset
    with tfdata_autotune_off() as patched:
        assert patched
        adapter = ArrayDataAdapter(x, y, batch_size=16, shuffle=True)
        assert adapter.get_tf_dataset().options().autotune.enabled is False
    assert ArrayDataAdapter.get_tf_dataset is original
    assert ArrayDataAdapter(x, y, batch_size=16).get_tf_dataset().options().autotune.enabled is not False
    assert losses(True) == losses(False)


def test_fitting_above_the_frozen_split_is_fitting_the_whole_scanner(monkeypatch):
    """FrozenSplit: the frozen blocks' LiteRT reading, then the scanner's own top layers, give the
    scanner's output and gradients, and fitting the top trains the scanner in place."""
    import keras
    import tensorflow as tf

    from models.bundle_recipe import FrozenSplit, build_scanner
    from models.efficientnet_lite import unfreeze_lite0_top

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32)
    keras.utils.set_random_seed(3)
    scanner = build_scanner(cfg)
    rng = np.random.default_rng(3)
    x, y = rng.random((8, 64, 64, 1), dtype=np.float32), rng.integers(0, 3, 8)

    head_only = FrozenSplit(scanner, None)  # the first epoch: the whole backbone frozen
    np.testing.assert_allclose(head_only.top(head_only.features(x)), scanner(x), atol=1e-4)
    assert {id(v) for v in head_only.top.trainable_weights} == {id(v) for v in scanner.trainable_weights}

    unfreeze_lite0_top(scanner, 2)
    split = FrozenSplit(scanner, 14)
    feats = split.features(x)
    np.testing.assert_allclose(split.top(feats), scanner(x), atol=1e-4)
    assert {id(v) for v in split.top.trainable_weights} == {id(v) for v in scanner.trainable_weights}

    loss = keras.losses.SparseCategoricalCrossentropy()

    def grads(model, inputs):
        with tf.GradientTape() as tape:
            value = loss(y, model(inputs, training=False))  # dropout off: the same function
        return tape.gradient(value, model.trainable_weights)

    whole, top = grads(scanner, x), grads(split.top, feats)
    assert len(whole) == len(top) > 0
    for a, b in zip(whole, top, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()))

    frozen = [(v, np.array(v)) for v in scanner.non_trainable_weights]
    trained = [(v, np.array(v)) for v in scanner.trainable_weights]
    split.top.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    split.top.fit(feats, y, batch_size=8, epochs=1, verbose=0)
    assert all(np.array_equal(v, before) for v, before in frozen)
    assert all(not np.allclose(v, before) for v, before in trained)
    np.testing.assert_allclose(split.top(split.features(x)), scanner(x), atol=1e-4)

    with pytest.raises(ValueError, match="not frozen"):  # the blocks are trainable now
        FrozenSplit(scanner, None)
    unfreeze_lite0_top(scanner, 17)  # the stem trainable too: nothing below it is frozen
    with pytest.raises(ValueError, match="not frozen"):
        FrozenSplit(scanner, 0)

    # Stochastic depth below the split would act in a fit but not in LiteRT's reading.
    from models import efficientnet_lite

    build = efficientnet_lite.build_efficientnet_lite0
    monkeypatch.setattr(efficientnet_lite, "build_efficientnet_lite0",
                        lambda *a, **k: build(*a, **{**k, "drop_connect_rate": 0.2}))
    dropping = build_scanner(cfg)
    unfreeze_lite0_top(dropping, 2)
    with pytest.raises(ValueError, match="dropout below the split"):
        FrozenSplit(dropping, 14)


def test_a_fit_above_the_split_trains_the_scanner_as_a_whole_fit_does():
    """Two scanners alike (weights and dropout seeds), one fitted whole, one above its split, in
    training mode (dropout on), same batches: the same weights after, to LiteRT's rounding."""
    import keras

    from models.bundle_recipe import FrozenSplit, build_scanner
    from models.efficientnet_lite import unfreeze_lite0_top

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32)

    def twin():
        keras.utils.set_random_seed(11)
        scanner = build_scanner(cfg)
        unfreeze_lite0_top(scanner, 2)
        return scanner

    whole, other = twin(), twin()
    start = [np.array(v) for v in whole.weights]
    split = FrozenSplit(other, 14)
    rng = np.random.default_rng(11)
    x, y = rng.random((8, 64, 64, 1), dtype=np.float32), rng.integers(0, 3, 8)
    for model in (whole, split.top):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    whole.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    split.top.fit(split.features(x), y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    moved = 0
    for a, b, s0 in zip(whole.weights, other.weights, start, strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6)
        moved += not np.allclose(np.array(a), s0, rtol=0, atol=1e-6)
    assert moved == len(whole.trainable_weights)


@pytest.mark.parametrize(("scan_blocks", "trained", "kept"),
                         [(0, "top_conv", "block15_project_conv"), (17, "stem_conv", None)])
def test_scanners_train_above_any_split_and_whole_with_the_stem(scan_blocks, trained, kept):
    from models.bundle_recipe import build_scanner, train_scanner
    from models.efficientnet_lite import find_lite0

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32, scan_lesion_patches=8,
                       scan_normal_patches=16, scan_epochs=1, scan_blocks=scan_blocks)
    imagenet = find_lite0(build_scanner(cfg))[0]
    scanner, history = train_scanner(_synthetic_films(), np.arange(4), cfg, seed=2)
    net = find_lite0(scanner)[0]
    assert len(history["loss"]) == 2
    assert not np.allclose(net.get_layer(trained).get_weights()[0], imagenet.get_layer(trained).get_weights()[0])
    if kept:
        np.testing.assert_array_equal(net.get_layer(kept).get_weights()[0], imagenet.get_layer(kept).get_weights()[0])


def test_a_frozen_part_with_the_same_weights_is_converted_once(monkeypatch):
    """Every scanner of a run has the same ImageNet frozen part: converted for the first, reused after."""
    import keras

    import models.bundle_recipe as recipe
    from models.efficientnet_lite import unfreeze_lite0_top

    cfg = RecipeConfig(canvas=(256, 192), patch_px=64, cell_px=32)
    converted = []
    convert = recipe.litert_content
    monkeypatch.setattr(recipe, "litert_content", lambda model: converted.append(model.name) or convert(model))
    monkeypatch.setattr(recipe, "_FROZEN_CONVERTED", {})
    x = np.random.default_rng(5).random((3, 64, 64, 1), dtype=np.float32)

    def scanner(seed):
        keras.utils.set_random_seed(seed)  # another head, the same ImageNet blocks
        sc = recipe.build_scanner(cfg)
        unfreeze_lite0_top(sc, 2)
        return sc

    first, second = scanner(1), scanner(2)
    a, b = recipe.FrozenSplit(first, 14), recipe.FrozenSplit(second, 14)
    assert len(converted) == 1
    np.testing.assert_array_equal(b.features(x), a.features(x))
    np.testing.assert_allclose(b.top(b.features(x)), second(x), atol=1e-4)
    changed = scanner(3)
    w = changed.get_layer("lite0_scan").get_layer("lite0_scan_net").get_layer("block3_dwconv")
    w.set_weights([v * 1.5 for v in w.get_weights()])
    recipe.FrozenSplit(changed, 14)  # other frozen weights: converted anew
    assert len(converted) == 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_overwrites_what_is_not_a_bundle(tiny_run, tmp_path, capsys, overwrite):
    """The run itself, a folder holding runs, a project folder, a file: refused before any work
    and left as they were, with or without --overwrite."""
    from core.cli import main

    out, _, _ = tiny_run
    parent = tmp_path / "parent"
    (parent / "other_run").mkdir(parents=True)
    (parent / "other_run" / "best.keras").write_bytes(b"weights")
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    flag = ["--overwrite"] if overwrite else []

    def snapshot(root):
        return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    before, run_before = snapshot(tmp_path), snapshot(out)
    for target, said in [(out, "not a model bundle" if overwrite else "exists and is not empty"),
                         (parent, "not a model bundle (it holds folders (other_run))" if overwrite
                          else "pass --overwrite"),
                         (project, "it has no model.json" if overwrite else "choose another folder"),
                         (afile, "is a file; give a folder")]:
        rc = main(["export", str(out), str(target), *flag])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and "Traceback" not in err, (target, err)
    assert snapshot(tmp_path) == before and snapshot(out) == run_before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda run: (run / "evaluation.json").write_text("{}"), "is incomplete or altered (KeyError: 'reports')"),
    (lambda run: (run / "classifier.keras").write_text("garbage"),
     "classifier.keras is not a Keras model file (not a .keras archive)"),
], ids=["empty-evaluation", "damaged-model"])
def test_export_of_a_damaged_run_says_what_is_wrong(tiny_run, tmp_path, capsys, damage, expected):
    from core.cli import main

    out, _, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    damage(run)
    rc = main(["export", str(run), str(tmp_path / "bundle")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
