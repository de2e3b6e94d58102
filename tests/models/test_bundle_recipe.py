"""The shipped model's recipe end to end at a tiny size: cross-validation, export, LiteRT inference.

Real MIAS films, a small canvas and one epoch: it proves the pieces fit (training inputs come
from core's pipeline, the bundle loads in core and gives the Keras model's answer), not that the
model is good; the figures of the real run are in models/bundled/model.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from core.inference import Analyzer  # noqa: E402
from core.io import read_image  # noqa: E402
from core.preprocess import PreprocessConfig  # noqa: E402
from models.bundle_recipe import RecipeConfig, run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("run")
    bundle = tmp_path_factory.mktemp("b") / "bundle"
    cfg = RecipeConfig(canvas=(256, 192), global_px=64, patch_px=64, top_k=2, folds=2,
                       seg_epochs=1, cls_epochs=1, baseline_px=64,
                       preprocessing=PreprocessConfig(fallback_height_px=256, target_spacing_mm=0.8))
    summary = run(shared_data, out, bundle, cfg, every=16)
    return out, bundle, summary


def test_cross_validation_reports_out_of_fold_figures(tiny_run):
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
    assert "patch scan" in (out / "comparison.md").read_text()


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
