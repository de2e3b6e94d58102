"""Train, cross-validate and export the bundled model (``make train``).

The shipped model is lesion-aware and works at native resolution (about 0.2 mm/px):

- **Tiled segmenter**: ImageNet EfficientNet-Lite0 (frozen) over the whole breast canvas gives a
  1280-d feature per 32 px cell (6.4 mm); a small 1x1-convolution head, trained on the MIAS lesion
  circles, gives each cell P(normal tissue), P(benign lesion), P(malignant lesion).
- **Multi-branch classifier**: a narrow CNN on the whole breast at low resolution (global context:
  density, asymmetry) beside the same Lite0 on the top-K candidate patches at native resolution,
  plus the candidates' cell probabilities, concatenated into Dense(128, ReLU, L2) -> Dropout(0.5)
  -> Dense(3, softmax). The classifier never sees a ground-truth mask: its candidates come from the
  segmenter, identically at training and inference.

Evaluation is 5-fold cross-validation grouped by patient (stratified by label); every figure is
computed on out-of-fold predictions, i.e. on patients the fold's models never saw. Two
references run on the same folds: the seed-style whole-image multi-branch model (narrow CNN ||
ImageNet Lite0 on the whole film at 224 px) and the plain patch scan (top cells of the segmenter,
no classifier). The temperature is fitted on the out-of-fold probabilities. The shipped models are
then trained on all films with the same recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.inference import (
    Candidates,
    breast_cells,
    canvas_lesion_map,
    pipeline_inputs,
    scan_prior,
    top_cells,
)
from core.io import read_image
from core.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

CELL_CLASSES = ("normal", "benign", "malignant")
CLASSES = ("Normal", "Benign", "Cancer")
FEATURES = 1280  # Lite0 head width


@dataclass(frozen=True)
class RecipeConfig:
    """Everything that defines a run of the recipe (stored in the run folder and the bundle)."""

    canvas: tuple[int, int] = (1024, 768)  # px (rows, cols) at working resolution
    cell_px: int = 32  # Lite0's output stride
    top_k: int = 4
    patch_px: int = 128
    global_px: int = 128
    folds: int = 5
    seed: int = 0
    seg_epochs: int = 12
    seg_weight_power: float = 0.5  # class weights ** power: 1 balances fully, 0.5 softens
    cls_epochs: int = 5
    use_prior: bool = True  # the head corrects the patch-scan reading instead of replacing it
    baseline_px: int = 224
    mask_threshold: float = 0.5
    batch_size: int = 16
    preprocessing: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d


@dataclass
class Films:
    """The prepared training set, one row per film, all produced by ``core`` preprocessing."""

    names: list[str]
    patients: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int, index into CLASSES
    canvases: np.ndarray  # (N, rows, cols) float16
    globals_: np.ndarray  # (N, g, g) float32
    baseline: np.ndarray  # (N, b, b) float32, the whole film for the seed-style reference
    cell_labels: np.ndarray  # (N, cr, cc) int8: 0/1/2 cell class, -1 ignored
    cell_breast: np.ndarray  # (N, cr, cc) bool
    canvas_breast: np.ndarray  # (N, rows, cols) bool, the breast on the canvas
    canvas_lesion: np.ndarray  # (N, rows, cols) bool ground-truth lesions on the canvas (evaluation)
    inputs: list[dict[str, Any]]  # pipeline_inputs per film (transforms)
    mammograms: list[Any]


def _severity_masks(record, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution benign and malignant lesion masks from a record's lesion circles."""
    import cv2

    out = {"Benign": np.zeros(shape, np.uint8), "Cancer": np.zeros(shape, np.uint8)}
    for les in record.lesions:
        if les.radius is None or les.x is None:
            continue
        cv2.circle(out[les.severity], (int(round(les.x)), int(round(les.y))), int(round(les.radius)), 1, -1)
    return out["Benign"].astype(bool), out["Cancer"].astype(bool)


def prepare_films(records, cfg: RecipeConfig) -> Films:
    """Read every film through ``core.io`` and ``core.inference.pipeline_inputs``."""
    import cv2

    names, patients, labels, canvases, globals_, base = [], [], [], [], [], []
    cell_labels, cell_breast, canvas_breast, canvas_lesion, inputs, mammos = [], [], [], [], [], []
    c = cfg.cell_px
    for i, r in enumerate(records):
        m = read_image(r.path)
        x = pipeline_inputs(m, cfg.preprocessing, cfg.canvas, cfg.global_px)
        benign, malignant = _severity_masks(r, m.pixels.shape)
        cb = x["canvas_t"].apply(benign, nearest=True).astype(bool)
        cm = x["canvas_t"].apply(malignant, nearest=True).astype(bool)
        rows, cols = cfg.canvas[0] // c, cfg.canvas[1] // c
        frac_b = cb.reshape(rows, c, cols, c).mean(axis=(1, 3))
        frac_m = cm.reshape(rows, c, cols, c).mean(axis=(1, 3))
        lab = np.zeros((rows, cols), np.int8)
        lab[frac_b > 0.1] = 1
        lab[frac_m > 0.1] = 2
        bc = breast_cells(x["canvas_breast"], c)
        lab[~bc] = -1
        # Abnormal films without a lesion centre (spread calcifications): their cells are unknown.
        if r.label != "Normal" and not any(les.radius for les in r.lesions):
            lab[:] = -1
        names.append(r.path.name)
        patients.append(str(r.patient_id))
        labels.append(CLASSES.index(r.label))
        canvases.append(x["canvas"].astype(np.float16))
        globals_.append(x["global"])
        whole = cv2.resize(m.pixels, (cfg.baseline_px, cfg.baseline_px), interpolation=cv2.INTER_AREA)
        base.append(whole)
        cell_labels.append(lab)
        cell_breast.append(bc)
        canvas_breast.append(x["canvas_breast"])
        canvas_lesion.append(cb | cm)
        inputs.append({k: v for k, v in x.items() if k.endswith("_t")})
        mammos.append(m)
        if (i + 1) % 50 == 0:
            log.info("prepared %d/%d films", i + 1, len(records))
    return Films(names, np.array(patients), np.array(labels), np.stack(canvases), np.stack(globals_),
                 np.stack(base), np.stack(cell_labels), np.stack(cell_breast), np.stack(canvas_breast),
                 np.stack(canvas_lesion),
                 inputs, mammos)


# -- Keras parts ------------------------------------------------------------------------------


def _lite0_features(input_shape: tuple[int, int, int], name: str, pooled: bool):
    """ImageNet Lite0 on a [0, 1] greyscale input; (h/32, w/32, 1280) map, or 1280 if pooled.

    Frozen: the bundled recipe trains only the heads (measured to fit the hour on 2 cores).
    """
    import keras

    from models.efficientnet_lite import (
        LITE0_INPUT_MEAN,
        LITE0_INPUT_SCALE,
        build_efficientnet_lite0,
        load_lite0_imagenet,
    )

    inp = keras.Input(input_shape, name=f"{name}_input")
    x = keras.layers.Concatenate(axis=-1, name=f"{name}_grey_to_rgb")([inp, inp, inp])
    x = keras.layers.Rescaling(255.0 / LITE0_INPUT_SCALE, offset=-LITE0_INPUT_MEAN / LITE0_INPUT_SCALE,
                               name=f"{name}_normalise")(x)
    net = build_efficientnet_lite0((*input_shape[:2], 3), include_top=False,
                                   pooling="avg" if pooled else None, drop_connect_rate=0.0,
                                   name=f"{name}_net")
    model = keras.Model(inp, net(x), name=name)
    load_lite0_imagenet(model)
    model.trainable = False
    return model


def build_segmenter_head(name: str = "cell_head"):
    """1x1 convolutions over Lite0 cell features -> P(normal, benign, malignant) per cell."""
    import keras
    from keras import layers

    inp = keras.Input((None, None, FEATURES), name="features")
    x = layers.Conv2D(64, 1, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4),
                      name=f"{name}_conv1")(inp)
    x = layers.Dropout(0.3, name=f"{name}_drop")(x)
    out = layers.Conv2D(len(CELL_CLASSES), 1, activation="softmax", name=f"{name}_probs")(x)
    return keras.Model(inp, out, name=name)


def build_segmenter(cfg: RecipeConfig, head):
    """The exported tiled segmenter: canvas (rows, cols, 1) [0, 1] -> cell probabilities."""
    import keras

    inp = keras.Input((*cfg.canvas, 1), name="image")
    feats = _lite0_features((*cfg.canvas, 1), "lite0_canvas", pooled=False)(inp)
    return keras.Model(inp, head(feats), name="tiled_segmenter")


def apply_narrow_branch(x, l2):
    """The study's narrower CNN as a branch: four conv/pool stages, global average pooled."""
    from keras import layers

    for i, filters in enumerate((16, 32, 48, 64)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_regularizer=l2,
                          name=f"narrow_conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"narrow_pool{i}")(x)
    return layers.GlobalAveragePooling2D(name="narrow_gap")(x)


def build_classifier_head(cfg: RecipeConfig, name: str = "multibranch_head"):
    """The class head on (whole breast, pooled patch features, candidate cell scores)."""
    import keras
    from keras import layers

    l2 = keras.regularizers.L2(1e-2 if cfg.use_prior else 1e-3)
    g_in = keras.Input((cfg.global_px, cfg.global_px, 1), name="global")
    f_in = keras.Input((cfg.top_k, FEATURES), name="patch_features")
    s_in = keras.Input((cfg.top_k, len(CELL_CLASSES)), name="scores")
    # Narrow CNN branch: whole breast, low resolution.
    g = apply_narrow_branch(g_in, l2)
    g = layers.Dropout(0.3, name="narrow_drop")(g)
    # Lite0 patch branch: pooled over the K candidates.
    f = layers.Concatenate(name="patch_pool")([layers.GlobalMaxPooling1D(name="patch_max")(f_in),
                                               layers.GlobalAveragePooling1D(name="patch_mean")(f_in)])
    f = layers.Dropout(0.5, name="patch_drop")(f)
    f = layers.Dense(64, activation="relu", kernel_regularizer=l2, name="patch_dense")(f)
    s = layers.Flatten(name="scores_flat")(s_in)
    x = layers.Concatenate(name="branches")([g, f, s])
    x = layers.Dense(128, activation="relu", kernel_regularizer=l2, name="fc128")(x)
    x = layers.Dropout(0.5, name="fc_drop")(x)
    if not cfg.use_prior:
        out = layers.Dense(len(CLASSES), activation="softmax", name="probs")(x)
        return keras.Model([g_in, f_in, s_in], out, name=name)
    # The branches give a correction (zero at the start) to the log of the patch-scan reading:
    # with 200 training films a learned head alone did worse than the fixed reading.
    prior_in = keras.Input((len(CLASSES),), name="prior_log")
    z = layers.Dense(len(CLASSES), kernel_initializer="zeros", kernel_regularizer=l2, name="correction")(x)
    out = layers.Softmax(name="probs")(layers.Add(name="prior_plus_correction")([prior_in, z]))
    return keras.Model([g_in, f_in, s_in, prior_in], out, name=name)


def build_classifier(cfg: RecipeConfig, head):
    """The exported classifier: global image, K patches and K cell scores -> class probabilities."""
    import keras
    from keras import layers

    g_in = keras.Input((cfg.global_px, cfg.global_px, 1), name="global")
    p_in = keras.Input((cfg.top_k, cfg.patch_px, cfg.patch_px, 1), name="patches")
    s_in = keras.Input((cfg.top_k, len(CELL_CLASSES)), name="scores")
    backbone = _lite0_features((cfg.patch_px, cfg.patch_px, 1), "lite0_patch", pooled=True)
    feats = layers.TimeDistributed(backbone, name="per_patch")(p_in)
    if not cfg.use_prior:
        return keras.Model([g_in, p_in, s_in], head([g_in, feats, s_in]), name="lesion_multibranch")
    prior_in = keras.Input((len(CLASSES),), name="prior_log")
    return keras.Model([g_in, p_in, s_in, prior_in], head([g_in, feats, s_in, prior_in]),
                       name="lesion_multibranch")


def build_baseline_head(cfg: RecipeConfig):
    """Seed-style whole-image multi-branch: narrow CNN || Lite0 (whole film) -> Dense(128) -> 3."""
    import keras
    from keras import layers

    l2 = keras.regularizers.L2(1e-3)
    g_in = keras.Input((cfg.global_px, cfg.global_px, 1), name="global")
    e_in = keras.Input((FEATURES,), name="lite0_whole")
    g = apply_narrow_branch(g_in, l2)
    e = layers.Dropout(0.5, name="lite0_drop")(e_in)
    x = layers.Concatenate(name="branches")([g, e])
    x = layers.Dense(128, activation="relu", kernel_regularizer=l2, name="fc128")(x)
    x = layers.Dropout(0.5, name="fc_drop")(x)
    out = layers.Dense(len(CLASSES), activation="softmax", name="probs")(x)
    return keras.Model([g_in, e_in], out, name="seed_multibranch")


# -- training steps ---------------------------------------------------------------------------


def _predict_batches(model, x: np.ndarray, batch: int = 8) -> np.ndarray:
    out = [model.predict_on_batch(x[i : i + batch].astype(np.float32)) for i in range(0, len(x), batch)]
    return np.concatenate(out)


def canvas_features(films: Films, cfg: RecipeConfig) -> np.ndarray:
    """Lite0 cell features of every canvas, (N, cr, cc, 1280) float16."""
    import keras

    backbone = _lite0_features((*cfg.canvas, 1), "lite0_canvas", pooled=False)
    inp = keras.Input((*cfg.canvas, 1))
    model = keras.Model(inp, backbone(inp))
    feats = []
    for i in range(0, len(films.canvases), 4):
        feats.append(model.predict_on_batch(films.canvases[i : i + 4, ..., None].astype(np.float32))
                     .astype(np.float16))
    return np.concatenate(feats)


def train_segmenter_head(feats: np.ndarray, labels: np.ndarray, cfg: RecipeConfig, seed: int):
    """Fit the cell head on labelled breast cells (class-weighted)."""
    import keras

    keras.utils.set_random_seed(seed)
    sel = labels >= 0
    x = feats[sel].astype(np.float32)[:, None, None, :]
    y = labels[sel].astype(np.int64)
    counts = np.bincount(y, minlength=len(CELL_CLASSES)).astype(np.float64)
    per_class = (len(y) / (len(CELL_CLASSES) * np.maximum(counts, 1.0))) ** cfg.seg_weight_power
    head = build_segmenter_head()
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    head.fit(x, y[:, None, None], sample_weight=per_class[y][:, None, None].astype(np.float32),
             epochs=cfg.seg_epochs, batch_size=256, verbose=0)
    return head


def cell_probs(head, feats: np.ndarray) -> np.ndarray:
    return np.concatenate([head.predict_on_batch(feats[i : i + 16].astype(np.float32))
                           for i in range(0, len(feats), 16)])


def candidates_for(films: Films, probs: np.ndarray, cfg: RecipeConfig) -> list[Candidates]:
    return [top_cells(probs[i], films.cell_breast[i], cfg.top_k, cfg.cell_px) for i in range(len(probs))]


def patch_stack(films: Films, cands: list[Candidates], cfg: RecipeConfig) -> np.ndarray:
    """(N, K, P, P) native-resolution patches, cut exactly as core.inference does."""
    from core.inference import patches_at

    out = np.empty((len(cands), cfg.top_k, cfg.patch_px, cfg.patch_px), np.float32)
    for i, cand in enumerate(cands):
        out[i], _ = patches_at(films.mammograms[i], films.inputs[i], cand, cfg.patch_px)
    return out


def patch_features(patches: np.ndarray, backbone) -> np.ndarray:
    n, k = patches.shape[:2]
    flat = patches.reshape(n * k, *patches.shape[2:], 1)
    return _predict_batches(backbone, flat, 64).reshape(n, k, FEATURES)


def _augment_globals(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training-fold augmentation of the whole-breast input: vertical flip, gamma, contrast."""
    out = g.copy()
    flip = rng.random(len(g)) < 0.5
    out[flip] = out[flip, ::-1]
    shape = (len(g),) + (1,) * (g.ndim - 1)
    gamma = rng.uniform(0.8, 1.25, size=shape)
    gain = rng.uniform(0.9, 1.1, size=shape)
    return np.clip((out**gamma) * gain, 0.0, 1.0).astype(np.float32)


def fit_head(head, inputs: list[np.ndarray], y: np.ndarray, cfg: RecipeConfig, seed: int,
             augment_first: bool = True) -> dict[str, list[float]]:
    """Class-weighted training with a fresh augmentation of the whole-breast input each epoch."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
    weights = {k: float(len(y) / (len(CLASSES) * max(c, 1.0))) for k, c in enumerate(counts)}
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    for _ in range(cfg.cls_epochs):
        xs = list(inputs)
        if augment_first:
            xs[0] = _augment_globals(inputs[0], rng)
        h = head.fit([x for x in xs], y, epochs=1, batch_size=cfg.batch_size, class_weight=weights,
                     verbose=0, shuffle=True)
        for key in history:
            history[key].append(float(h.history[key][0]))
    return history


def patch_scan_probs(probs: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """The patch-scan reading of every film (:func:`core.inference.scan_prior`), (N, 3)."""
    return np.stack([scan_prior(probs[i], breast[i]) for i in range(len(probs))]).astype(np.float64)


def _classifier_inputs(films: Films, pf: np.ndarray, scores: np.ndarray, prior: np.ndarray,
                       idx, cfg: RecipeConfig) -> list[np.ndarray]:
    xs = [films.globals_[idx, ..., None], pf[idx], scores[idx]]
    if cfg.use_prior:
        xs.append(np.log(np.clip(prior[idx], 1e-6, 1.0)).astype(np.float32))
    return xs


def segmentation_maps(films: Films, probs: np.ndarray, cfg: RecipeConfig, idx: np.ndarray) -> np.ndarray:
    """The lesion maps the app would show, on the canvas (:func:`core.inference.canvas_lesion_map`)."""
    return np.stack([canvas_lesion_map(probs[i], cfg.cell_px, films.canvas_breast[i]) for i in idx])


# -- the whole run ----------------------------------------------------------------------------


def evaluate_oof(out: Path, seed: int = 0) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """Reports, plots and the comparison table from a run's out-of-fold predictions.

    The calibrated figures use a cross-fitted temperature: each fold's predictions are scaled
    by the temperature fitted on the other folds' out-of-fold predictions, so no figure is
    calibrated on the patients it is measured on. The shipped temperature is fitted on all
    out-of-fold predictions.
    """
    from models import evaluation as ev
    from models import plots

    oof = json.loads((out / "oof_predictions.json").read_text())
    y = np.asarray(oof["labels"])
    groups = np.asarray(oof["patients"])
    folds = np.asarray(oof["folds"])
    probs = {k: np.asarray(oof[k]) for k in ("lesion_multibranch", "seed_multibranch", "patch_scan")}
    reports = {name: ev.classification_report(y, p, CLASSES, groups=groups, seed=seed)
               for name, p in probs.items()}
    ours = probs["lesion_multibranch"]
    calibrated = np.zeros_like(ours)
    fold_t = []
    for k in np.unique(folds):
        t = ev.fit_temperature(ours[folds != k], y[folds != k])
        fold_t.append(float(t))
        calibrated[folds == k] = ev.apply_temperature(ours[folds == k], t)
    temperature = float(ev.fit_temperature(ours, y))
    reports["lesion_multibranch_calibrated"] = ev.classification_report(
        y, calibrated, CLASSES, groups=groups, seed=seed)
    calibration = {
        "shipped_temperature": temperature, "cross_fitted_per_fold": fold_t,
        "method": "each fold scaled by the temperature fitted on the other folds' out-of-fold "
                  "predictions; the shipped temperature is fitted on all of them"}
    plots.plot_confusion_matrix(reports["lesion_multibranch_calibrated"]["confusion_matrix"], CLASSES,
                                out / "confusion_matrix.png")
    plots.plot_roc_curves(y, calibrated, CLASSES, out / "roc_curves.png")
    plots.plot_reliability(y, calibrated, out / "reliability.png")
    hist_path = out / "histories.json"
    if hist_path.exists():
        plots.plot_learning_curves(json.loads(hist_path.read_text())[0], out / "learning_curves.png")
    table = ev.compare_table({"lesion-aware multi-branch (ours)": reports["lesion_multibranch_calibrated"],
                              "seed-style whole-image multi-branch": reports["seed_multibranch"],
                              "patch scan (top cells)": reports["patch_scan"]})
    (out / "comparison.md").write_text(table)
    print(table, flush=True)
    return reports, temperature, calibration


def reevaluate(out: Path, seed: int = 0) -> dict[str, Any]:
    """``mammolab evaluate`` on a recipe run: recompute the figures from its out-of-fold predictions
    and rewrite ``evaluation.json`` (the segmenter's figures are kept as the run measured them)."""
    path = out / "evaluation.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    reports, temperature, calibration = evaluate_oof(out, seed)
    summary.update(reports=reports, temperature=temperature, calibration=calibration)
    path.write_text(json.dumps(summary, indent=2, default=float))
    return summary


def run(data_root: Path, out: Path, bundle: Path | None, cfg: RecipeConfig,
        every: int = 1) -> dict[str, Any]:
    import keras

    from models import evaluation as ev
    from models.data import load_mias, patient_kfold

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    records = load_mias(data_root / "mias")[::every]  # every > 1: a quick smoke run only
    log.info("MIAS: %d films", len(records))
    films = prepare_films(records, cfg)
    t_prep = time.perf_counter()
    cache = out / f"canvas_features_{len(records)}.npy"
    if cache.exists():
        feats = np.load(cache)
    else:
        feats = canvas_features(films, cfg)
        np.save(cache, feats)
    t_feat = time.perf_counter()
    log.info("prepared in %.0fs, canvas features in %.0fs", t_prep - t_start, t_feat - t_prep)

    patch_backbone = _lite0_features((cfg.patch_px, cfg.patch_px, 1), "lite0_patch", pooled=True)
    whole_backbone = _lite0_features((cfg.baseline_px, cfg.baseline_px, 1), "lite0_whole", pooled=True)
    whole_feats = _predict_batches(whole_backbone, films.baseline[..., None], 16)

    n = len(records)
    y = films.labels
    oof = {name: np.zeros((n, 3)) for name in ("lesion_multibranch", "seed_multibranch", "patch_scan")}
    oof_cells = np.zeros((n, *feats.shape[1:3], 3), np.float32)
    histories = []
    splits = patient_kfold(records, cfg.folds, cfg.seed)
    for fold, (tr, te) in enumerate(splits):
        tf0 = time.perf_counter()
        tr, te = np.asarray(tr), np.asarray(te)
        seg_head = train_segmenter_head(feats[tr], films.cell_labels[tr], cfg, cfg.seed + fold)
        probs_all = cell_probs(seg_head, feats)
        oof_cells[te] = probs_all[te]
        cands = candidates_for(films, probs_all, cfg)
        pf = patch_features(patch_stack(films, cands, cfg), patch_backbone)
        scores = np.stack([c.scores for c in cands])
        prior = patch_scan_probs(probs_all, films.cell_breast)
        head = build_classifier_head(cfg)
        hist = fit_head(head, _classifier_inputs(films, pf, scores, prior, tr, cfg), y[tr], cfg, cfg.seed + fold)
        oof["lesion_multibranch"][te] = head.predict(_classifier_inputs(films, pf, scores, prior, te, cfg),
                                                     verbose=0)
        base = build_baseline_head(cfg)
        fit_head(base, [films.globals_[tr, ..., None], whole_feats[tr]], y[tr], cfg, cfg.seed + fold)
        oof["seed_multibranch"][te] = base.predict([films.globals_[te, ..., None], whole_feats[te]], verbose=0)
        oof["patch_scan"][te] = prior[te]
        histories.append(hist)
        log.info("fold %d/%d in %.0fs", fold + 1, cfg.folds, time.perf_counter() - tf0)
        print(f"fold {fold + 1}/{cfg.folds}: {time.perf_counter() - tf0:.0f}s", flush=True)
        keras.backend.clear_session()

    fold_of = np.zeros(n, np.int64)
    for fold, (_, te) in enumerate(splits):
        fold_of[np.asarray(te)] = fold
    # Segmenter on held-out films with drawn lesions.
    lesion_films = np.array([i for i in range(n) if films.canvas_lesion[i].any()])
    maps = segmentation_maps(films, oof_cells, cfg, lesion_films)
    truth = films.canvas_lesion[lesion_films]
    # The display threshold is chosen on out-of-fold maps (mean Dice over films with lesions);
    # the Dice reported at it is therefore slightly optimistic, and says so.
    grid = [round(t, 2) for t in np.arange(0.3, 0.99, 0.05)]
    mean_dice = {t: float(np.mean([ev.dice(m >= t, tr) for m, tr in zip(maps, truth, strict=True)]))
                 for t in grid}
    threshold = max(mean_dice, key=mean_dice.get)
    masks = maps >= threshold
    dice = [ev.dice(m, t) for m, t in zip(masks, truth, strict=True)]
    iou = [ev.iou(m, t) for m, t in zip(masks, truth, strict=True)]
    all_maps = segmentation_maps(films, oof_cells, cfg, np.arange(n))
    det = ev.lesion_detection_sensitivity(list(all_maps), list(films.canvas_lesion))
    seg_report = {"dice_mean": float(np.mean(dice)), "iou_mean": float(np.mean(iou)),
                  "mask_threshold": threshold, "dice_by_threshold": mean_dice,
                  "n_films_with_lesions": int(len(lesion_films)), "detection": det,
                  "method": "out-of-fold cell maps upsampled to the canvas, thresholded at "
                            f"{threshold} (the best mean Dice on these same out-of-fold maps); "
                            "truth: MIAS lesion circles"}
    (out / "oof_predictions.json").write_text(json.dumps(
        {"names": films.names, "patients": films.patients.tolist(), "labels": y.tolist(),
         "folds": fold_of.tolist(), **{k: v.tolist() for k, v in oof.items()}}))
    (out / "histories.json").write_text(json.dumps(histories))
    reports, temperature, calibration = evaluate_oof(out, cfg.seed)

    # Final models on all films.
    seg_head = train_segmenter_head(feats, films.cell_labels, cfg, cfg.seed)
    probs_all = cell_probs(seg_head, feats)
    cands = candidates_for(films, probs_all, cfg)
    pf = patch_features(patch_stack(films, cands, cfg), patch_backbone)
    scores = np.stack([c.scores for c in cands])
    prior = patch_scan_probs(probs_all, films.cell_breast)
    head = build_classifier_head(cfg)
    final_hist = fit_head(head, _classifier_inputs(films, pf, scores, prior, slice(None), cfg), y, cfg, cfg.seed)
    segmenter = build_segmenter(cfg, seg_head)
    classifier = build_classifier(cfg, head)
    classifier.save(out / "classifier.keras")
    segmenter.save(out / "segmenter.keras")
    summary = {"reports": reports, "segmenter": seg_report, "temperature": float(temperature),
               "calibration": calibration,
               "final_history": final_hist, "seconds": time.perf_counter() - t_start,
               "n_films": n, "n_patients": int(len(set(films.patients)))}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=float))
    if bundle is not None:
        from models.bundle_export import export_runs

        export_runs([out], bundle, overwrite=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.bundle_recipe", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("runs/bundled"))
    p.add_argument("--bundle", type=Path, default=None, help="export the bundle here")
    p.add_argument("--folds", type=int, default=RecipeConfig.folds)
    p.add_argument("--cls-epochs", type=int, default=RecipeConfig.cls_epochs)
    p.add_argument("--seg-epochs", type=int, default=RecipeConfig.seg_epochs)
    p.add_argument("--every", type=int, default=1, help="use every N-th film (smoke runs only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = RecipeConfig(folds=args.folds, cls_epochs=args.cls_epochs, seg_epochs=args.seg_epochs)
    run(args.data, args.out, args.bundle, cfg, args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
