"""Export to a LiteRT bundle: checksums, Keras/LiteRT parity on real MIAS films, metadata checks,
and no half bundles."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")
Image = pytest.importorskip("PIL.Image")

from core.bundle import load_bundle  # noqa: E402
from models import export  # noqa: E402

K = 4  # patches per image
GLOBAL_PX = 64
PATCH_PX = 32
SEG_PX = 64
CLASSES = ["Normal", "Benign", "Cancer"]
FILMS = ("mdb001.png", "mdb002.png", "mdb010.png")


def conv_block(x, filters: int, name: str):
    x = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def tiny_classifier() -> keras.Model:
    """Two inputs like the shipped classifier: the whole breast and a stack of K patches."""
    g_in = keras.Input((GLOBAL_PX, GLOBAL_PX, 1), name="global")
    p_in = keras.Input((K, PATCH_PX, PATCH_PX, 1), name="patches")
    g = conv_block(g_in, 8, "g1")
    g = keras.layers.MaxPooling2D(name="g_pool")(g)
    g = conv_block(g, 16, "g2")
    g = keras.layers.GlobalAveragePooling2D(name="g_gap")(g)
    p = keras.layers.TimeDistributed(keras.layers.Conv2D(8, 3, activation="relu"), name="p_conv")(p_in)
    p = keras.layers.TimeDistributed(keras.layers.GlobalMaxPooling2D(), name="p_gmp")(p)
    p = keras.layers.GlobalAveragePooling1D(name="p_mean")(p)
    x = keras.layers.Concatenate(name="merge")([g, p])
    out = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model([g_in, p_in], out, name="tiny_classifier")


def tiny_unet() -> keras.Model:
    inp = keras.Input((SEG_PX, SEG_PX, 1), name="image")
    e1 = conv_block(inp, 8, "e1")
    e2 = conv_block(keras.layers.MaxPooling2D(name="down1")(e1), 16, "e2")
    b = conv_block(keras.layers.MaxPooling2D(name="down2")(e2), 32, "mid")
    u2 = keras.layers.Conv2DTranspose(16, 2, strides=2, name="up2")(b)
    d2 = conv_block(keras.layers.Concatenate(name="skip2")([u2, e2]), 16, "d2")
    u1 = keras.layers.Conv2DTranspose(8, 2, strides=2, name="up1")(d2)
    d1 = conv_block(keras.layers.Concatenate(name="skip1")([u1, e1]), 8, "d1")
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="lesion")(d1)
    return keras.Model(inp, out, name="tiny_unet")


def metadata(**changes) -> dict:
    report = {"accuracy": {"value": 0.7, "ci95": [0.6, 0.8], "n_boot_used": 1000},
              "per_class": {c: {"auc": {"value": 0.8, "ci95": [0.7, 0.9]}} for c in CLASSES},
              "classes": CLASSES, "n": 322, "method": "out-of-fold, patient bootstrap"}
    meta = {
        "name": "MammoLab test model",
        "version": "0.1.0",
        "classes": CLASSES,
        "preprocessing": {"input_size": GLOBAL_PX, "target_spacing_mm": 0.2, "pad_value": 0.0},
        "pipeline": {"canvas": [SEG_PX, SEG_PX], "cell_px": 16, "top_k": K, "patch_px": PATCH_PX,
                     "global_px": GLOBAL_PX},
        "temperature": 1.3,
        "evaluation": {"data": "MIAS, 5-fold out-of-fold by patient", "classifier": report,
                       "segmenter": {"dice_mean": 0.41, "detection": {"operating_points": [
                           {"fp_per_image": 1.0, "sensitivity": 0.6}]}}},
        "training_data": [dict(export.MIAS, images=322)],
        "limitations": ["Film-screen images only."],
        "changelog": ["0.1.0: first export"],
    }
    meta.update(changes)
    return meta


def read_film(path: Path, size: int) -> np.ndarray:
    """A real mammogram as float32 [0, 1], resized to size x size."""
    img = Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def patches_of(path: Path) -> np.ndarray:
    """K patches from a 256 px copy of the film, around its middle (where the breast is)."""
    img = read_film(path, 256)
    centres = [(128, 64), (100, 90), (160, 80), (128, 120)]
    h = PATCH_PX // 2
    return np.stack([img[r - h : r + h, c - h : c + h] for r, c in centres])[..., None]


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    return tiny_classifier(), tiny_unet()


@pytest.fixture(scope="module")
def bundle(models, tmp_path_factory) -> Path:
    classifier, segmenter = models
    out = tmp_path_factory.mktemp("export") / "bundle"
    return export.write_bundle(out, classifier, segmenter, metadata())


def test_bundle_files_match_their_checksums(bundle):
    card = json.loads((bundle / "model.json").read_text())
    on_disk = {p.name for p in bundle.iterdir()}
    assert on_disk == {"classifier.tflite", "segmenter.tflite", "MODEL_CARD.md", "model.json"}
    assert set(card["files"]) == on_disk - {"model.json"}
    for name, f in card["files"].items():
        assert export.sha256_file(bundle / name) == f["sha256"], name
        assert (bundle / name).stat().st_size == f["bytes"]
    load_bundle(bundle)  # the app's loader accepts it and verifies the checksums itself


def test_model_json_records_inputs_versions_and_provenance(bundle):
    card = json.loads((bundle / "model.json").read_text())
    assert card["classes"] == CLASSES and card["version"] == "0.1.0"
    assert card["temperature"] == 1.3
    cls_in = card["inputs"]["classifier"]
    assert [(i["name"], i["shape"], i["dtype"], i["range"]) for i in cls_in] == [
        ("global", [1, GLOBAL_PX, GLOBAL_PX, 1], "float32", [0.0, 1.0]),
        ("patches", [1, K, PATCH_PX, PATCH_PX, 1], "float32", [0.0, 1.0]),
    ]
    assert [i["position"] for i in cls_in] == [0, 1]
    assert card["inputs"]["segmenter"][0]["shape"] == [1, SEG_PX, SEG_PX, 1]
    assert card["outputs"]["classifier"][0]["shape"] == [1, 3]
    assert card["outputs"]["segmenter"][0]["shape"] == [1, SEG_PX, SEG_PX, 1]
    assert set(card["frameworks"]) >= {"tensorflow", "keras", "numpy", "python"}
    assert card["frameworks"]["keras"] == keras.__version__
    created = dt.datetime.fromisoformat(card["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 3600
    mias = card["training_data"][0]
    assert "research" in mias["licence"].lower() and "Suckling" in mias["citation"]
    assert card["evaluation"]["classifier"]["accuracy"]["ci95"] == [0.6, 0.8]
    assert card["export"]["float16"] is False
    assert max(card["export"]["parity_max_abs_diff"].values()) <= 1e-4
    assert card["changelog"] == ["0.1.0: first export"]
    assert "input_ranges" not in card


def test_model_card_states_use_data_figures_and_limits(bundle):
    text = (bundle / "MODEL_CARD.md").read_text()
    assert text.startswith("# MammoLab test model 0.1.0")
    assert "not a medical device" in text and "not be used for diagnosis" in text
    assert "Suckling" in text and "Research use only" in text
    assert "0.700 (0.600–0.800)" in text  # accuracy with its interval
    assert "patient bootstrap" in text  # how the figures were obtained
    assert "Film-screen images only." in text
    assert json.loads((bundle / "model.json").read_text())["files"]["classifier.tflite"]["sha256"] in text


def test_tflite_matches_keras_on_real_films(models, bundle, mias_dir):
    classifier, segmenter = models
    films = [mias_dir / f for f in FILMS]
    seg_outputs = []
    for film in films:
        g = read_film(film, GLOBAL_PX)[None, :, :, None]
        p = patches_of(film)[None]
        expected = keras.ops.convert_to_numpy(classifier([g, p], training=False))
        (got,) = export.run_tflite(bundle / "classifier.tflite", {"global": g, "patches": p})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.sum(), 1.0, atol=1e-5)

        s = read_film(film, SEG_PX)[None, :, :, None]
        expected = keras.ops.convert_to_numpy(segmenter(s, training=False))
        (got,) = export.run_tflite(bundle / "segmenter.tflite", [s])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        seg_outputs.append(got)
    # Different films give different maps, so the comparison above is not between constants.
    assert np.abs(seg_outputs[0] - seg_outputs[1]).max() > 1e-3


def test_run_tflite_checks_its_inputs(bundle):
    path = bundle / "classifier.tflite"
    g = np.zeros((GLOBAL_PX, GLOBAL_PX, 1), np.float32)  # without the batch axis: accepted
    p = np.zeros((K, PATCH_PX, PATCH_PX, 1), np.float32)
    (out,) = export.run_tflite(path, [g, p])
    assert out.shape == (1, 3)
    with pytest.raises(ValueError, match="patches"):
        export.run_tflite(path, {"global": g})
    with pytest.raises(ValueError, match="shape"):
        export.run_tflite(path, {"global": g[:32], "patches": p})


def test_dict_inputs_and_several_outputs_keep_keras_order(tmp_path):
    # A dict-input model whose names sort differently from their order, with three outputs.
    a = keras.Input((8,), name="zeta")
    b = keras.Input((5,), name="alpha")
    h = keras.layers.Concatenate(name="cat")([a, b])
    outs = [keras.layers.Dense(n, name=f"head{n}")(h) for n in (2, 7, 1)]
    model = keras.Model({"zeta": a, "alpha": b}, outs, name="multi")
    path = export.to_tflite(model, tmp_path / "multi.tflite")
    desc = export.describe_tflite(path)
    assert {i["name"] for i in desc["inputs"]} == {"zeta", "alpha"}
    assert [o["shape"] for o in desc["outputs"]] == [[1, 2], [1, 7], [1, 1]]
    x = {"zeta": np.linspace(0, 1, 8, dtype=np.float32)[None],
         "alpha": np.linspace(1, 0, 5, dtype=np.float32)[None]}
    expected = [keras.ops.convert_to_numpy(o) for o in model(x)]
    for got, want in zip(export.run_tflite(path, x), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def weight_dtypes(path: Path) -> set[str]:
    from ai_edge_litert.interpreter import Interpreter

    return {np.dtype(d["dtype"]).name for d in Interpreter(model_path=str(path)).get_tensor_details()}


def test_float16_export_stores_half_weights_and_stays_close(models, tmp_path):
    classifier, _ = models
    f32 = export.to_tflite(classifier, tmp_path / "f32.tflite")
    f16 = export.to_tflite(classifier, tmp_path / "f16.tflite", float16=True)
    assert "float16" not in weight_dtypes(f32)
    assert "float16" in weight_dtypes(f16)
    assert f16.stat().st_size < f32.stat().st_size
    assert [i["dtype"] for i in export.describe_tflite(f16)["inputs"]] == ["float32", "float32"]
    rng = np.random.default_rng(1)
    x = {"global": rng.random((1, GLOBAL_PX, GLOBAL_PX, 1), np.float32),
         "patches": rng.random((1, K, PATCH_PX, PATCH_PX, 1), np.float32)}
    np.testing.assert_allclose(export.run_tflite(f16, x)[0], export.run_tflite(f32, x)[0], atol=1e-2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "1.0"}, "semantic version"),
        ({"classes": ["Normal", "Normal", "Cancer"]}, "classes"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"evaluation": {"classifier": {}}}, "measured on"),
        ({"training_data": [{"name": "MIAS", "licence": "research only"}]}, "citation"),
        ({"files": {}}, "computed by the export"),
        ({"input_ranges": {"global": [1, 0]}}, "input_ranges"),
        ({"extra": np.float32(1.0)}, "plain JSON"),
        ({"pipeline": {"bilateral": {"coef": [[0.0] * 4] * 2, "intercept": [0.0] * 3}}}, "bilateral"),
    ],
)
def test_invalid_metadata_raises_and_writes_nothing(models, tmp_path, change, message):
    classifier, segmenter = models
    with pytest.raises(ValueError, match=message):
        export.write_bundle(tmp_path / "b", classifier, segmenter, metadata(**change))
    assert list(tmp_path.iterdir()) == []


def test_missing_keys_are_all_named():
    meta = metadata()
    del meta["pipeline"], meta["training_data"]
    with pytest.raises(ValueError, match="missing 'pipeline'.*\n.*missing 'training_data'"):
        export.validate_metadata(meta)


def test_classes_must_match_the_classifier_output(models, tmp_path):
    classifier, segmenter = models
    with pytest.raises(ValueError, match="3 outputs but metadata names 2 classes"):
        export.write_bundle(tmp_path / "b", classifier, segmenter, metadata(classes=["Normal", "Abnormal"]))
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_bundle(models, tmp_path):
    classifier, _ = models
    # The classifier converts first; this segmenter then fails (no static input size).
    inp = keras.Input((None, None, 1), name="image")
    dynamic = keras.Model(inp, keras.layers.Conv2D(1, 3, padding="same", name="c")(inp))
    with pytest.raises(ValueError, match="static shapes"):
        export.write_bundle(tmp_path / "b", classifier, dynamic, metadata())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_bundle(models, tmp_path, monkeypatch):
    classifier, segmenter = models
    out = export.write_bundle(tmp_path / "b", classifier, segmenter, metadata())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError):
        export.write_bundle(out, classifier, segmenter, metadata())

    def broken_card(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "render_model_card", broken_card)  # fails after both models
    with pytest.raises(RuntimeError, match="disk full"):
        export.write_bundle(out, classifier, segmenter, metadata(version="0.2.0"), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    (out / "__init__.py").write_text("# package marker\n")
    export.write_bundle(out, classifier, segmenter, metadata(version="0.2.0"), overwrite=True)
    assert json.loads((out / "model.json").read_text())["version"] == "0.2.0"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    assert (out / "__init__.py").read_text() == "# package marker\n"  # kept across the swap
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_card_puts_reference_models_side_by_side():
    from models import evaluation as ev

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    reports = {name: ev.classification_report(y, rng.dirichlet(np.ones(3), 60), CLASSES, n_boot=20)
               for name in ("ours", "baseline")}
    card = {**metadata(), "evaluation": {"data": "held-out patients", "references": reports}}
    text = export.render_model_card(card)
    section = text.split("### references")[1].split("##")[0]
    assert "| ours | 60 |" in section and "| baseline | 60 |" in section
    assert section.count("How obtained:") == 1  # one method for both, said once
    assert "Measured on: held-out patients" in text


def test_verifier_and_verify_top_come_together(models, tmp_path):
    classifier, segmenter = models
    with_top = metadata(pipeline={**metadata()["pipeline"], "verify_top": 4})
    with pytest.raises(ValueError, match="verify_top"):
        export.write_bundle(tmp_path / "b", classifier, segmenter, with_top)
    with pytest.raises(ValueError, match="verify_top"):
        export.write_bundle(tmp_path / "b", classifier, segmenter, metadata(), verifier_model=classifier)
    assert list(tmp_path.iterdir()) == []


def test_model_card_says_which_comparison_the_bundle_makes():
    single = export.render_model_card(metadata())
    assert "no comparison with prior examinations, the other view or the other breast" in single
    pipeline = {**metadata()["pipeline"], "bilateral": {"features": ["benign", "cancer"]}}
    paired = export.render_model_card(metadata(pipeline=pipeline))
    assert "the other breast" in paired and "Each image is analysed on its own" not in paired
    assert "the only comparison is with the other breast's film of the same view" in paired


def test_an_empty_folder_takes_a_bundle_and_a_non_bundle_is_never_replaced(models, tmp_path):
    classifier, segmenter = models
    empty = tmp_path / "empty"
    empty.mkdir()
    export.write_bundle(empty, classifier, segmenter, metadata())
    assert (empty / "model.json").is_file()
    # model.json beside a folder: not a bundle (a bundle has no subfolders), so kept whole
    (empty / "runs").mkdir()
    (empty / "runs" / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"not a model bundle \(it holds folders \(runs\)\)"):
        export.write_bundle(empty, classifier, segmenter, metadata(version="0.2.0"), overwrite=True)
    assert (empty / "runs" / "keep.txt").read_text() == "keep"
    assert json.loads((empty / "model.json").read_text())["version"] == "0.1.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
