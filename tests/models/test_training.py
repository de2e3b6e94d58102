"""``mammolab train / evaluate / export`` on real MIAS films: tiny runs of a few steps that write
the whole run folder, evaluate on held-out patients only, fine-tune EfficientNet in two phases,
train the U-Net on the truth masks, and answer bad input with one line and exit code 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from core.cli import main  # noqa: E402
from models import training  # noqa: E402
from models.architectures import build  # noqa: E402
from models.data import Record  # noqa: E402
from models.efficientnet_lite import find_lite0, freeze_lite0  # noqa: E402

PROGRESS = re.compile(
    r"^(?:\S+ \S+ )?epoch (\d+)/(\d+) phase ([12]) loss [\d.]+ (acc|dice) [\d.]+ "
    r"val_loss [\d.]+ val_(acc|dice) [\d.]+ [\d.]+s( \*)?$"
)
SMALL = ["--input-size", "64", "--n-boot", "20"]


def _json(path: Path):
    return json.loads(path.read_text())


def _sides(split: dict) -> dict[str, set[str]]:
    return {side: set(split[side]["patients"]) for side in ("train", "val", "test")}


@pytest.fixture(scope="module")
def narrow_run(tmp_path_factory, mias_dir):
    """One smoke run of the narrower CNN through the CLI; epochs come from a config file that
    the --epochs flag overrides."""
    root = tmp_path_factory.mktemp("narrow")
    config = root / "train.json"
    config.write_text(json.dumps({"arch": "narrower_cnn", "epochs": 5, "batch-size": 4,
                                  "balance": "sampling"}))
    out = root / "run"
    capture = {}

    def run(capsys):
        if not capture:
            rc = main(["train", "--config", str(config), "--data", str(mias_dir), "--epochs", "1",
                       "--max-steps", "2", "--limit", "12", "--out", str(out), *SMALL])
            capture.update(rc=rc, out=capsys.readouterr().out)
        return out, capture

    return run


def test_train_smoke_writes_the_run_folder(narrow_run, capsys):
    out, run = narrow_run(capsys)
    assert run["rc"] == 0, run["out"]
    for name in ("config.json", "split.json", "history.json", "best.keras", "evaluation.json",
                 "predictions.json", "learning_curves.png", "confusion_matrix.png",
                 "roc_curves.png", "reliability.png"):
        assert (out / name).is_file(), name
    lines = [line for line in run["out"].splitlines() if PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1 phase 1 ")  # one line per epoch
    assert "time taken:" in run["out"]

    config = _json(out / "config.json")
    settings = config["settings"]
    assert settings["epochs"] == 1  # the flag beats the config file's 5
    assert settings["batch_size"] == 4 and settings["balance"] == "sampling"  # from the file
    assert settings["input_size"] == config["preprocessing"]["input_size"] == 64
    assert config["pretrained"] is False and config["pretrained_weights"] == {}
    assert config["seed"] == 0 and config["versions"]["keras"] == keras.__version__
    assert config["dataset"]["n_images"] == 12

    history = _json(out / "history.json")["trainings"][0]
    assert history["phase"] == [1] and history["steps"] == [2]  # --max-steps caps the epoch
    assert history["best_epoch"] == 1

    loaded = keras.models.load_model(out / "best.keras", compile=False)
    assert loaded.output.shape[-1] == 3


def test_evaluation_uses_held_out_patients_only(narrow_run, capsys):
    out, run = narrow_run(capsys)
    split = _json(out / "split.json")
    sides = _sides(split)
    assert sides["train"] and sides["val"] and sides["test"]
    assert not sides["train"] & sides["test"]
    assert not sides["val"] & sides["test"]
    assert not sides["train"] & sides["val"]

    evaluation = _json(out / "evaluation.json")
    assert evaluation["kind"] == "classifier"
    assert evaluation["report"]["n"] == len(split["test"]["images"])
    assert evaluation["report"]["n_patients"] == len(sides["test"])
    assert evaluation["report_after_temperature"]["n"] == len(split["test"]["images"])
    assert evaluation["temperature"] > 0
    assert "validation" in evaluation["temperature_fitted_on"]
    predictions = _json(out / "predictions.json")
    assert predictions["held_out"]["images"] == split["test"]["images"]
    assert predictions["validation"]["images"] == split["val"]["images"]
    # The compare_table rows are printed.
    assert "| narrower_cnn |" in run["out"]


def test_evaluate_rewrites_evaluation_json(narrow_run, capsys, mias_dir):
    out, run = narrow_run(capsys)
    assert run["rc"] == 0
    (out / "evaluation.json").unlink()
    (out / "roc_curves.png").unlink()
    rc = main(["evaluate", str(out), "--data", str(mias_dir), "--n-boot", "20"])
    printed = capsys.readouterr().out
    assert rc == 0
    evaluation = _json(out / "evaluation.json")
    assert evaluation["n_boot"] == 20
    assert (out / "roc_curves.png").is_file()
    assert "| narrower_cnn |" in printed
    # Same model, same held-out images: the same point figures as at the end of training.
    first = _json(out / "predictions.json")["held_out"]
    assert evaluation["report"]["n"] == len(first["images"])


def test_evaluate_a_damaged_model_file_says_so_in_one_line(narrow_run, capsys, mias_dir, tmp_path):
    """Keras calls a damaged .keras file "File not found"; evaluate says what it is, exit 2."""
    out, run = narrow_run(capsys)
    assert run["rc"] == 0
    damaged = tmp_path / "run"
    shutil.copytree(out, damaged)
    (damaged / "best.keras").write_bytes((out / "best.keras").read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in damaged.iterdir() if p.is_file()}
    rc = main(["evaluate", str(damaged), "--data", str(mias_dir), "--n-boot", "20"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "best.keras is not a Keras model file (not a .keras archive)" in err, err
    assert {p.name: p.read_bytes() for p in damaged.iterdir() if p.is_file()} == before


def test_a_diverging_run_stops_with_one_line_not_a_traceback(mias_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--arch", "narrower_cnn", "--data", str(mias_dir), "--epochs", "3",
               "--max-steps", "2", "--limit", "12", "--learning-rate", "1e30", "--out", str(out), *SMALL])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "training diverged: the training loss is nan at epoch " in err, err
    assert "lower the learning rate" in err and str(out) in err
    assert not (out / "evaluation.json").exists()


def test_two_phase_fine_tuning_unfreezes_top_blocks_at_a_lower_rate(tmp_path, mias_dir, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--arch", "transfer_efficientnet", "--random-init", "--data", str(mias_dir),
               "--input-size", "32", "--epochs", "1", "--fine-tune-epochs", "1",
               "--fine-tune-blocks", "2", "--max-steps", "1", "--limit", "12", "--n-boot", "20",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "RANDOM weights (not pretrained)" in printed
    config = _json(out / "config.json")
    assert config["pretrained"] is False and config["pretrained_weights"] == {}
    assert config["two_phase"]["phase2"]["unfrozen_blocks"] == 2

    history = _json(out / "history.json")["trainings"][0]
    assert history["phase"] == [1, 2]
    first, second = history["phases"]
    assert first["backbone"] == "frozen" and second["backbone"] == "top 2 blocks trainable"
    assert second["trainable_params"] > 10 * first["trainable_params"]
    assert second["learning_rate"] == pytest.approx(first["learning_rate"] / 10, rel=1e-5)
    phases = [int(m.group(3)) for m in map(PROGRESS.match, printed.splitlines()) if m]
    assert phases == [1, 2]


def test_unfreeze_top_of_keras_b0_trains_only_the_top_blocks():
    model = build("transfer_efficientnet", input_shape=(32, 32, 1), backbone="b0", weights=None)
    (net,) = find_lite0(model)
    freeze_lite0(model)
    assert training.trainable_params(model) == 1280 * 3 + 3  # the softmax layer only
    training.unfreeze_top(model, 2)
    trainable = {layer.name for layer in net.layers if layer.trainable and layer.weights}
    assert any(name.startswith("block7a_") for name in trainable)
    assert any(name.startswith("block6d_") for name in trainable)
    assert not any(name.startswith(("block6c_", "block1a_", "stem_")) for name in trainable)
    assert "top_conv" in trainable
    assert not any(isinstance(net.get_layer(n), keras.layers.BatchNormalization) for n in trainable)


def test_unet_trains_on_truth_masks_and_reports_dice(tmp_path, mias_dir, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--arch", "unet_segmenter", "--arch-params",
               '{"base_filters": 4, "depth": 2}', "--data", str(mias_dir), "--epochs", "1",
               "--max-steps", "2", "--limit", "16", "--out", str(out), *SMALL])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    evaluation = _json(out / "evaluation.json")
    assert evaluation["kind"] == "segmenter"
    assert evaluation["n_images_with_lesions"] >= 1
    assert 0.0 <= evaluation["dice"]["value"] <= 1.0
    assert 0.0 <= evaluation["iou"]["value"] <= evaluation["dice"]["value"] + 1e-9
    points = evaluation["detection"]["operating_points"]
    assert [p["fp_per_image"] for p in points] == [1.0, 2.0]
    assert evaluation["detection"]["n_lesions"] >= 1
    assert "Dice" in printed and "dice" in printed.split("epoch 1/1", 1)[1]
    split = _json(out / "split.json")
    assert set(_json(out / "predictions.json")["held_out"]["images"]) == set(split["test"]["images"])


def test_prepared_masks_only_for_segmenters(mias_dir):
    from models.data import load_mias

    records = [r for r in load_mias(mias_dir) if r.lesions and r.lesions[0].has_centre][:1]
    images = training.prepare_images(records, mias_dir, 64, with_masks=False)
    assert images.masks is None
    images = training.prepare_images(records, mias_dir, 64, with_masks=True)
    assert images.masks.shape == (1, 64, 64) and images.masks[0].any()
    assert images.images.dtype == np.float32 and 0.0 <= images.images.min() <= images.images.max() <= 1.0


def test_select_stratified_keeps_every_class_and_is_seeded():
    records = [Record(path=Path(f"{label}{i}.png"), patient_id=f"{label}{i}", label=label)
               for label, n in (("Normal", 60), ("Benign", 25), ("Cancer", 15)) for i in range(n)]
    picked = training.select_stratified(records, 20, seed=3)
    counts = {c: sum(r.label == c for r in picked) for c in ("Normal", "Benign", "Cancer")}
    assert counts == {"Normal": 12, "Benign": 5, "Cancer": 3}
    assert picked == training.select_stratified(records, 20, seed=3)
    assert picked != training.select_stratified(records, 20, seed=4)
    assert {r.label for r in training.select_stratified(records, 3, seed=0)} == {
        "Normal", "Benign", "Cancer"}


def test_cross_validation_splits_hold_each_patient_out_once(mias_dir):
    from models.data import load_mias

    records = load_mias(mias_dir)
    cfg = training.TrainConfig(arch="narrower_cnn", data=str(mias_dir), folds=3, seed=1)
    splits = training.make_splits(records, cfg)
    assert splits["kind"] == "cross-validation" and len(splits["folds"]) == 3
    pid = np.array([r.patient_id for r in records])
    tested = np.concatenate([f["test"] for f in splits["folds"]])
    assert sorted(tested.tolist()) == list(range(len(records)))  # every image held out once
    for fold in splits["folds"]:
        held_out = set(pid[fold["test"]])
        assert held_out and not held_out & set(pid[fold["train"]])
        assert not held_out & set(pid[fold["val"]])
        assert not set(pid[fold["train"]]) & set(pid[fold["val"]])
        assert len(fold["train"]) + len(fold["val"]) + len(fold["test"]) == len(records)
    final = splits["final"]
    assert len(final["train"]) + len(final["val"]) == len(records)
    assert not set(pid[final["train"]]) & set(pid[final["val"]])


def test_lesion_multibranch_hands_over_to_its_recipe(tmp_path, mias_dir, monkeypatch, capsys):
    from models import bundle_recipe

    calls = []
    monkeypatch.setattr(bundle_recipe, "run", lambda *a: calls.append(a) or {})
    rc = main(["train", "--arch", "lesion_multibranch", "--data", str(mias_dir), "--folds", "3",
               "--epochs", "2", "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    (data_root, out, bundle, cfg, every), = calls
    assert (data_root / "mias").resolve() == mias_dir.resolve()
    assert out == tmp_path / "run" and bundle is None and every == 1
    assert cfg.folds == 3 and cfg.cls_epochs == 2
    assert cfg.scan_epochs == bundle_recipe.RecipeConfig().scan_epochs  # not given: the recipe's


def _folder_with_a_file(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


def _bad_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.json"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(t / "nowhere")],
         "not a folder"),
        (lambda d, t: ["train", "--arch", "resnet_9000", "--data", str(d)],
         "unknown architecture 'resnet_9000'"),
        (lambda d, t: ["train", "--data", str(d)], "arch must be given"),
        (lambda d, t: ["train", "--config", _bad_config(t, "{not json"), "--data", str(d)],
         "is not valid JSON"),
        (lambda d, t: ["train", "--config", _bad_config(t, '{"arch": "narrower_cnn", "epoch": 3}'),
                       "--data", str(d)], "unknown setting 'epoch'"),
        (lambda d, t: ["train", "--config", _bad_config(t, '{"arch": "narrower_cnn", "epochs": "3"}'),
                       "--data", str(d)], "epochs must be int"),
        (lambda d, t: ["train", "--config", str(t / "missing.json"), "--data", str(d)],
         "config file not found"),
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(d), "--limit", "0"],
         "limit must be at least 1"),
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(d), "--imagenet-weights",
                       str(t / "w.h5")], "imagenet_weights is for the EfficientNet"),
        (lambda d, t: ["train", "--arch", "unet_segmenter", "--data", str(d), "--input-size", "60",
                       "--limit", "12"], "divisible by 16"),
        (lambda d, t: ["evaluate", str(t / "no-run")], "no such run folder"),
        (lambda d, t: ["export", str(t / "no-run"), str(t / "bundle")], "no such run folder"),
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(d), "--learning-rate", "inf"],
         "learning_rate must be a finite number > 0, not inf"),
        (lambda d, t: ["train", "--arch", "transfer_efficientnet", "--backbone", "b0", "--data", str(d),
                       "--input-size", "64", "--imagenet-weights",
                       str(shutil.copy(d / "mdb001.png", t / "notop.h5"))],
         "notop.h5 is not a weights file of Keras' EfficientNetB0 without its top"),
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(d), "--test-fraction", "0.95"],
         "test_fraction must be at most 0.5, not 0.95"),
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(d), "--arch-params", '{"x": 1}'],
         "architecture narrower_cnn does not take 'x'; its arch_params are: filters, name"),
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(d), "--input-size", "22400"],
         "input_size must be at most 2048, not 22400"),
        (lambda d, t: ["train", "--arch", "narrower_cnn", "--data", str(d), "--out", str(_folder_with_a_file(t))],
         "mine is not empty; give a new or empty folder as --out"),
    ],
    ids=["missing-data", "unknown-arch", "no-arch", "config-syntax", "config-unknown-key",
         "config-type", "config-missing", "limit-zero", "weights-not-efficientnet",
         "unet-size", "evaluate-missing-run", "export-missing-run", "learning-rate-inf",
         "b0-weights-not-h5", "test-fraction-over-half", "arch-params-unknown", "input-size-huge",
         "out-not-empty"],
)
def test_bad_input_exits_2_with_one_line(argv, expected, mias_dir, tmp_path, capsys):
    rc = main(argv(mias_dir, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mammolab ")]
    assert len(lines) == 1


def test_export_refuses_a_run_that_is_not_the_recipe(narrow_run, capsys, tmp_path):
    pytest.importorskip("models.bundle_export")
    out, run = narrow_run(capsys)
    rc = main(["export", str(out), str(tmp_path / "bundle")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not a finished run of the bundle recipe" in err and "Traceback" not in err
    assert not (tmp_path / "bundle").exists()


def test_usage_error_returns_2_instead_of_exiting(capsys):
    assert main(["train", "--epochs", "many"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert main(["train", "-h"]) == 0
    assert "--imagenet-weights" in capsys.readouterr().out


def _class_folder(root: Path, mias_dir: Path, counts: dict[str, int]) -> Path:
    films = iter(sorted(mias_dir.glob("mdb*.png")))
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for _ in range(n):
            film = next(films)
            shutil.copy(film, root / name / film.name)
    return root


def test_an_empty_class_is_refused_and_a_thin_one_warned(mias_dir, tmp_path, capsys, caplog):
    data = _class_folder(tmp_path / "d", mias_dir, {"Normal": 6, "Benign": 6, "Cancer": 0})
    rc = main(["train", "--arch", "narrower_cnn", "--data", str(data), "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "no Cancer images (images: Normal 6, Benign 6, Cancer 0)" in err, err
    assert not (tmp_path / "run").exists()

    from models.data import load_dataset
    from models.training import TrainConfig, make_splits

    thin = _class_folder(tmp_path / "t", mias_dir, {"Normal": 8, "Benign": 8, "Cancer": 2})
    with caplog.at_level("WARNING", logger="models.training"):
        splits = make_splits(load_dataset(thin), TrainConfig(arch="narrower_cnn", data=str(thin)))
    assert splits["kind"] == "holdout"
    assert "few patients of Cancer (patients: Normal 8, Benign 8, Cancer 2) for 5 patient folds" in caplog.text


def test_normal_films_of_lesion_patients_count_as_normal_images(mias_dir):
    """MIAS women with a lesion in one breast have a normal film of the other: kept alone, they
    still give the classifier normal images, though no patient's worst class is Normal."""
    from models.data import load_dataset, patient_labels
    from models.training import TrainConfig, make_splits

    records = load_dataset(mias_dir)
    worst = patient_labels(records)
    lesion_women = [r for r, w in zip(records, worst, strict=True) if w > 0]
    assert any(r.label_index == 0 for r in lesion_women)
    splits = make_splits(lesion_women, TrainConfig(arch="narrower_cnn", data=str(mias_dir)))
    assert splits["kind"] == "holdout" and len(splits["test"]) > 0
