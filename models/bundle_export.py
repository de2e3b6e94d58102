"""Turn a run of the bundle recipe into the model bundle the app opens (``mammolab export``).

A run folder written by :func:`models.bundle_recipe.run` holds ``classifier.keras``,
``segmenter.keras``, ``config.json`` and ``evaluation.json``. The bundle gets both models as
.tflite, and a ``model.json`` and ``MODEL_CARD.md`` carrying the cross-validated figures with
their intervals, the data they were measured on, and the training data's provenance and licence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from core.preprocess import PreprocessConfig
from models.bundle_recipe import RecipeConfig, scan_average_epochs, verify_shifts

log = logging.getLogger(__name__)

BUNDLE_NAME = "MammoLab lesion-aware multi-branch (MIAS)"
BUNDLE_VERSION = "1.8.0"
RUN_FILES = ("classifier.keras", "segmenter.keras", "config.json", "evaluation.json")


class RunError(ValueError):
    """A run folder that cannot be exported; the message says which and why."""


def _read_run(run: Path, files: tuple[str, ...] = RUN_FILES) -> tuple[dict[str, Any], dict[str, Any]]:
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    missing = [f for f in files if not (run / f).is_file()]
    if missing:
        raise RunError(f"{run}: not a finished run of the bundle recipe (missing {', '.join(missing)})")
    try:
        config = json.loads((run / "config.json").read_text())
        evaluation = json.loads((run / "evaluation.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{run}: unreadable run files ({exc})") from None
    return config, evaluation


def _resolution_limitation(config: dict[str, Any]) -> str:
    """How coarse the outlines are, from the run's cell and window sizes at the working resolution."""
    mm = PreprocessConfig.from_dict(config.get("preprocessing", {})).target_spacing_mm
    cell, window = config["cell_px"] * mm, config["patch_px"] * mm
    return (f"The segmenter's cells are {cell:.1f} mm and each reads a {window:.1f} mm window: "
            "outlines are coarse and fine calcifications are not delineated.")


def _description(config: dict[str, Any]) -> str:
    scales = [int(s) for s in config.get("scan_scales", [1])]
    patch, cell = config["patch_px"], config["cell_px"]
    if scales == [1]:
        scan = (f"Tiled segmenter: a patch scanner (ImageNet EfficientNet-Lite0, top blocks fine-tuned "
                f"on {patch} px patches at native resolution around the MIAS lesion circles and on "
                f"normal tissue) run convolutionally over the whole breast, giving each {cell} px cell "
                f"P(normal tissue, benign lesion, malignant lesion) for the {patch} px window around it.")
    elif set(scales) == {1}:
        scan = (f"Tiled segmenter: {len(scales)} patch scanners (ImageNet EfficientNet-Lite0, top "
                f"blocks fine-tuned with different seeds on {patch} px patches at native resolution "
                "around the MIAS lesion circles and on normal tissue) run convolutionally over the "
                f"whole breast; each gives every {cell} px cell P(normal tissue, benign lesion, "
                f"malignant lesion) for the {patch} px window around it, and the segmenter averages "
                "them.")
    else:
        windows = ", ".join(f"{patch * s} px" for s in scales)
        scan = (f"Tiled segmenter: {len(scales)} patch scanners (ImageNet EfficientNet-Lite0, top "
                f"blocks fine-tuned on {patch} px patches around the MIAS lesion circles and on "
                f"normal tissue, cut from the canvas downsampled by {', '.join(map(str, scales))}) "
                "run convolutionally over the whole breast; each gives every "
                f"{cell} px cell P(normal tissue, benign lesion, malignant lesion) for the window "
                f"around it ({windows} of canvas), and the segmenter averages them.")
    zoom = float(config.get("scan_zoom", 1.0))
    average = scan_average_epochs(config.get("scan_average", 1),
                                  config.get("scan_epochs", RecipeConfig.scan_epochs))
    if zoom > 1:
        scan += (f" Scanner training patches were cut from windows {patch / zoom:.0f}-{patch * zoom:.0f} px "
                 f"wide and resized to {patch} px (scale augmentation).")
    if average > 1:
        scan += (f" Each scanner's weights are the mean of its last {average} fine-tuning epochs' "
                 "weights.")
    verify = int(config.get("verify_top", 0))
    if verify:
        scan += (f" Verifier: the segmenter's {verify} most lesion-like cells are re-read by the same "
                 f"scanners from their own {patch} px patch, as in training, and each gets the mean "
                 "of both readings.")
    jitter = int(config.get("verify_jitter_px", 0))
    if verify and jitter:
        crops = config.get("verify_crops", "diag5")  # runs from before the key read five crops
        how = {"diag5": f"centred and moved {jitter} px along each diagonal",
               "diag2": f"with its centre moved {jitter} px along the main diagonal, both ways"}[crops]
        scan += (f" The verifier reads each cell from {len(verify_shifts(jitter, crops))} crops ({how}) "
                 "and averages them.")
    if config.get("tta_flip"):
        scan += (" Segmenter and verifier also read the film mirrored left-right and average the "
                 "mirrored reading with the direct one.")
    scan += (" Multi-branch classifier: a narrow CNN on the whole breast at low resolution "
             "beside Lite0 on the top candidate patches at native resolution and the "
             "candidates' cell probabilities -> Dense(128) -> Dropout(0.5) -> a correction "
             "added to the log of the patch-scan reading of the cell map -> softmax.")
    bag = int(config.get("head_bag", 1))
    if bag > 1:
        scan += (f" The classifier carries {bag} such heads, fitted with different seeds on the same "
                 "inputs, and averages their probabilities.")
    return scan


def _call_limitation(decision: dict[str, Any], single_film: bool) -> str:
    shares = ", ".join(f"{100 * p:.0f} % {c}" for c, p in
                       zip(("Normal", "Benign", "Cancer"), decision["class_prior"], strict=True))
    who = ("A film, read beside the other breast or alone," if single_film
           else "A film read beside the other breast")
    return (f"{who} is called the class that stands highest against its share of the training "
            f"films ({shares}), not the most probable one: it says Benign or Cancer more often "
            "than the bars' largest value would, trading some accuracy for balanced accuracy, and "
            "on a population with other class shares the call is off accordingly."
            + ("" if single_film else " Films read alone are called their most probable class: "
               "the classifier's own probabilities are not calibrated class by class."))


def _single_film_stage(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The run's single-film stage if it ships (it lowered the cross-fitted log loss), else None."""
    stage = (evaluation.get("calibration") or {}).get("single_film")
    return stage if stage and stage.get("shipped") and stage.get("params") else None


def _shipped_reports(evaluation: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The reports of what a run's bundle shows: a film beside the other breast (None without
    the bilateral stage) and a film alone."""
    reports = evaluation["reports"]
    alone = (reports["lesion_multibranch_single_film"] if _single_film_stage(evaluation)
             else reports["lesion_multibranch_calibrated"])
    pair = reports["lesion_multibranch_bilateral"] if evaluation.get("bilateral") else None
    return pair, alone


def read_replicates(config: dict[str, Any], evaluation: dict[str, Any],
                    runs: list[Path]) -> list[tuple[int, dict[str, Any]]]:
    """``(seed, evaluation)`` of each replicate run: the exported run's recipe on another fold
    split (``python -m models.bundle_recipe --seed N --cv-only``). Anything else is refused:
    a run of another recipe, of the same seed (the same folds, so the same figures), or on other
    films."""
    seeds = {int(config.get("seed", 0)): "the exported run"}
    out = []
    for run in runs:
        run = Path(run)
        rconfig, revaluation = _read_run(run, ("config.json", "evaluation.json"))
        differs = sorted(k for k in set(config) | set(rconfig)
                         if k != "seed" and config.get(k) != rconfig.get(k))
        if differs:
            raise RunError(f"{run}: not a replicate of the exported run's recipe (it differs in "
                           f"{', '.join(differs)})")
        seed = int(rconfig.get("seed", 0))
        if seed in seeds:
            raise RunError(f"{run}: seed {seed} gives the same fold split as {seeds[seed]}; a "
                           "replicate needs another --seed")
        if (revaluation.get("n_films"), revaluation.get("n_patients")) != (
                evaluation.get("n_films"), evaluation.get("n_patients")):
            raise RunError(f"{run}: evaluated on {revaluation.get('n_films')} films of "
                           f"{revaluation.get('n_patients')} women, the exported run on "
                           f"{evaluation.get('n_films')} of {evaluation.get('n_patients')}")
        try:  # every report the card will show
            _shipped_reports(revaluation)
            revaluation["reports"]["patch_scan"], revaluation["reports"]["seed_multibranch"]
        except (KeyError, TypeError):
            raise RunError(f"{run}: its evaluation.json has no figures of the recipe") from None
        if bool(revaluation.get("bilateral")) != bool(evaluation.get("bilateral")):
            raise RunError(f"{run}: " + ("it has no bilateral stage and the exported run has one"
                                         if evaluation.get("bilateral") else
                                         "it has a bilateral stage and the exported run has none")
                           + ", so their figures are not of the same reading")
        seeds[seed] = str(run)
        out.append((seed, revaluation))
    return out


def _replicate_section(config: dict[str, Any], evaluation: dict[str, Any],
                       replicates: list[tuple[int, dict[str, Any]]]) -> tuple[dict[str, Any], str]:
    """``evaluation.other_fold_splits`` (the replicates' reports, by split) and the limitation
    that compares them with the exported run's figures."""
    pair, alone = _shipped_reports(evaluation)
    what = "a film read beside the other breast" if pair is not None else "a film"
    runs = [(int(config.get("seed", 0)), alone if pair is None else pair)]
    section: dict[str, Any] = {}
    for seed, rev in replicates:
        p, a = _shipped_reports(rev)  # read_replicates made sure both runs read pairs alike
        if p is not None:
            section[f"fold split seed {seed}: film beside the other breast"] = p
        section[f"fold split seed {seed}: film alone"] = a
        section[f"fold split seed {seed}: patch scan (top cells)"] = rev["reports"]["patch_scan"]
        section[f"fold split seed {seed}: seed-style whole-image multi-branch"] = rev["reports"]["seed_multibranch"]
        runs.append((seed, a if p is None else p))
    keys = (("cancer AUC", lambda r: r["per_class"]["Cancer"]["auc"]["value"]),
            ("macro AUC", lambda r: r["macro_auc"]["value"]),
            ("balanced accuracy", lambda r: r["balanced_accuracy"]["value"]))
    by_split = "; ".join(
        f"{name} " + ", ".join(f"{get(r):.3f} (seed {s})" for s, r in runs)
        + f", mean {sum(get(r) for _, r in runs) / len(runs):.3f}" for name, get in keys)
    others = "another split" if len(replicates) == 1 else f"{len(replicates)} other splits"
    text = (f"The figures above are of one fold split (seed {runs[0][0]}). The same recipe cross-"
            f"validated on {others} of the same films (evaluation.other_fold_splits), for {what}: "
            f"{by_split}. The split, and the training seeds that go with it, move the figures this "
            "much; the mean over splits is the better estimate.")
    return section, text


def bundle_metadata(config: dict[str, Any], evaluation: dict[str, Any],
                    replicates: list[tuple[int, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """``model.json``'s content that the export does not compute itself; ``replicates`` are
    :func:`read_replicates`' runs of the same recipe on other fold splits."""
    from models.export import MIAS

    reports = evaluation["reports"]
    seg = evaluation["segmenter"]
    n, patients = evaluation["n_films"], evaluation["n_patients"]
    data = (f"{n} MIAS films of {patients} women in ../shared/data/mias; {config['folds']}-fold "
            "cross-validation grouped by patient and stratified by label; every figure from "
            "out-of-fold predictions (patients the fold's models never saw); 95 % intervals from "
            "1000 bootstrap resamples of patients")
    bilateral = evaluation.get("bilateral") or None
    pipeline = {
        "kind": "tiled-lesion-multibranch",
        "canvas": list(config["canvas"]),
        "cell_px": config["cell_px"],
        "top_k": config["top_k"],
        "patch_px": config["patch_px"],
        "global_px": config["global_px"],
        "mask_threshold": float(seg.get("mask_threshold", config["mask_threshold"])),
        "cell_classes": ["normal", "benign", "malignant"],
        "verify_top": int(config.get("verify_top", 0)),
        # a run from before verify_jitter_px read the centred crop only
        "verify_shifts": verify_shifts(config.get("verify_jitter_px", 0), config.get("verify_crops", "diag5")),
    }
    figures = {"data": data}
    decision = evaluation.get("decision")
    single = _single_film_stage(evaluation)
    _, alone = _shipped_reports(evaluation)
    if single is not None:
        pipeline["single_film"] = {
            **single["params"],
            "features": "log(P(Benign)/P(Normal)) and log(P(Cancer)/P(Normal)) of the film, from "
                        "the classifier's raw probabilities (clipped at 1e-6); softmax(coef @ "
                        "features + intercept), in place of the temperature",
        }
        if decision is not None:
            pipeline["single_film"].update(class_prior=decision["class_prior"], call=decision["call"])
        figures["single_film_stage"] = {k: single[k] for k in ("method", "log_loss", "log_loss_before")}
    if bilateral is not None:
        pipeline["bilateral"] = {
            **bilateral["params"],
            "features": "log(P(Benign)/P(Normal)) and log(P(Cancer)/P(Normal)) of the film, then "
                        "of the other breast's film of the same view, from the classifier's raw "
                        "probabilities (clipped at 1e-6); softmax(coef @ features + intercept)",
            "pairing": "same patient and view, opposite side, exactly one film each "
                       "(core.pairing)",
        }
        if decision is not None:  # runs evaluated before the balanced call keep the arg-max
            pipeline["bilateral"].update(class_prior=decision["class_prior"], call=decision["call"])
        figures["data"] = data + ("; the classifier figures are of films read beside the other "
                                  f"breast ({bilateral['paired_films']} of {n} films have it)")
        figures["classifier"] = reports["lesion_multibranch_bilateral"]
        figures["classifier_single_film"] = alone
        figures["bilateral"] = {"method": bilateral["method"],
                                "paired_films": bilateral["paired_films"]}
    else:
        figures["classifier"] = alone
    figures["classifier_before_temperature"] = reports["lesion_multibranch"]
    split_limits = []
    other_splits = {}
    if replicates:
        other_splits, split_text = _replicate_section(config, evaluation, replicates)
        split_limits.append(split_text)
    return {
        "name": BUNDLE_NAME,
        "version": BUNDLE_VERSION,
        "description": _description(config) + (
            " Bilateral reading: when the other breast's film of the same view is at hand, both "
            "films' classifier log-odds go into a multinomial logistic model (pipeline.bilateral) "
            "whose probabilities replace the film's own" + (
                "; the pair is called the class whose probability is largest relative to its "
                "share of the training films (pipeline.bilateral.class_prior)." if decision else ".")
            if bilateral is not None else "") + (
            " Single-film stage: a film read alone gets the same form of logistic model on its "
            "own log-odds only (pipeline.single_film, in place of the temperature)" + (
                ", and is called the same balanced way." if decision else ".")
            if single is not None else ""),
        "classes": ["Normal", "Benign", "Cancer"],
        "temperature": float(evaluation["temperature"]),
        "preprocessing": PreprocessConfig.from_dict(config["preprocessing"]).to_dict(),
        "pipeline": pipeline,
        "evaluation": {
            **figures,
            "references": {
                "seed-style whole-image multi-branch": reports["seed_multibranch"],
                "patch scan (top cells of the segmenter)": reports["patch_scan"],
            },
            **({"other_fold_splits": other_splits} if other_splits else {}),
            "segmenter": seg,
            "calibration": evaluation.get("calibration", {
                "method": "temperature fitted on the out-of-fold probabilities"}),
        },
        "training_data": [MIAS],
        # Log-probabilities of the patch-scan reading (clipped at 1e-6 before the log).
        "input_ranges": {"prior_log": [-13.82, 0.0]},
        "limitations": [
            "Trained and evaluated on 258 digitised film MLO mammograms (MIAS) only; expect lower "
            "performance on digital mammograms, CC views and other populations.",
            "The figures come from a small data set: the intervals are wide.",
            *split_limits,
            "Design choices were made on these same folds (the head's prior + correction among "
            "four heads in 1.1.0; the scanner without hard-negative mining, which gave macro AUC "
            "0.657 against 0.673 in a separate run; two scale-1 scanners averaged, which read "
            "0.695 from the scan in separate runs where a scale-2 scanner read 0.528; whether to "
            "ship the temperature, by its cross-fitted ECE; re-reading the top 16 cells, chosen "
            "among 4, 8, 16 and 32 on exploratory out-of-fold maps; averaging each scanner's last 3 "
            "epochs' weights, measured on three cross-validations with other seeds), so the figures carry some "
            "selection optimism. Single scanners of the same recipe read macro AUC 0.628 to 0.673 from the "
            "scan alone in different runs: the spread between runs is of that order.",
            "The bilateral reading (the classifier figures) needs the other breast's film of the "
            "same view, found by patient, side and view (DICOM tags, MIAS numbering, or side "
            "words in file names); a film read alone gets the single-film figures "
            "(classifier_single_film), which are lower. Its form was chosen on these same "
            "out-of-fold predictions among fixed log-odds subtractions and logistic models with "
            "other features, regularisation and class weights (cross-fitted cancer AUC 0.852 to "
            "0.865, macro AUC 0.795 to 0.810 for the logistic variants): some selection optimism. "
            "A comparison discounts what both breasts show: a woman with lesions in both breasts "
            "can read lower beside the other breast than either film alone (seen on the CBIS-DDSM "
            "sample, whose malignant case reads Cancer alone and Normal as a pair); the app shows "
            "both readings.",
            *([_call_limitation(decision, single is not None)] if decision else []),
            _resolution_limitation(config),
            "The shipped models were retrained on all films after cross-validation; the figures "
            "describe the recipe, estimated on held-out patients.",
            "Not a medical device. Not for diagnosis, screening or any clinical decision.",
        ],
        "changelog": [
            "1.8.0: each scanner's weights are the mean of its last 3 fine-tuning epochs' weights "
            "(--scan-average 3); retrained by make train (61 min on a 2-core AMD EPYC). On the three "
            "fold splits of the card the pair's balanced accuracy read 0.582, 0.562, 0.576 against "
            "1.7's 0.596, 0.495, 0.535 (mean 0.573 against 0.542), macro AUC 0.799, 0.778, 0.794 "
            "against 0.794, 0.766, 0.786, cancer AUC 0.845, 0.802, 0.812 against 0.875, 0.805, "
            "0.840 (mean 0.820 against 0.840; two seed-0 runs of 1.7's recipe on the 2-core EPYC "
            "read 0.867 and 0.845). The pair now beats its own patch scan on every figure on "
            "every split; 1.7's balanced accuracy did not on seed 1 (0.495 against 0.504).",
            "1.7.1: the same models as 1.7.0; the card adds the recipe's cross-validated figures on "
            "two other fold splits of the same films (seeds 1 and 2, evaluation.other_fold_splits; "
            "make replicate). There the pair read cancer AUC 0.805 and 0.840, macro AUC 0.766 and "
            "0.786, balanced accuracy 0.495 and 0.535, against 0.875, 0.794 and 0.596 on the split "
            "of the main figures. On the seed-1 split "
            "1.6.0's centred verifier crop read pair cancer AUC 0.787, macro AUC 0.761: the "
            "diagonal crops' gain (+0.018 cancer AUC; +0.019 on the first split) held on a split "
            "they were not chosen on.",
            "1.7.0: the verifier reads each of its 16 cells from two crops moved 12 px along the "
            "main diagonal, both ways, and averages them (pipeline.verify_shifts); retrained by "
            "make train (52 min). Pair cancer AUC 0.856 -> 0.875, macro AUC 0.792 -> 0.794, "
            "balanced accuracy 0.585 -> 0.596; film alone cancer AUC 0.791 -> 0.807. The crop set "
            "was chosen on 1.6.0's out-of-fold maps, so these figures carry selection optimism.",
            "1.6.0: retrained by make train (the same recipe; its cross-validation reproduced the "
            "earlier reproduction run's figures exactly); a film read alone goes through the "
            "single-film stage (pipeline.single_film, a logistic model on its own log-odds, in "
            "place of the temperature) and is called the balanced way like a pair: cross-fitted "
            "film-alone cancer AUC 0.749 -> 0.791, macro AUC 0.719 -> 0.734, balanced accuracy "
            "0.509 -> 0.513, log loss 0.870 -> 0.779 (ECE 0.049 -> 0.059); pairs unchanged.",
            "1.5.1: a film read beside the other breast is called the class whose probability is "
            "largest relative to its share of the training films (pipeline.bilateral.class_prior); "
            "same models and probabilities as 1.5.0. On the out-of-fold predictions of a "
            "reproduction run of the recipe (1.5.0's own were not kept) it raised the pair's "
            "balanced accuracy 0.490 -> 0.585 (accuracy 0.690 -> 0.647).",
            "1.5.0: films are read beside the other breast when it is found (a logistic model on "
            "both films' classifier log-odds, pipeline.bilateral); same tflite models as 1.4.0; "
            "cross-fitted macro AUC 0.716 -> 0.809, cancer AUC 0.741 -> 0.858, balanced "
            "accuracy 0.499 -> 0.522 on the same folds.",
            "1.4.0: the segmenter's 16 most lesion-like cells are re-read by the scanners from "
            "their own patch (verifier.tflite) and the readings averaged; same scanners as 1.3.0 "
            "(same seeds); macro AUC 0.696 -> 0.716, cancer AUC 0.728 -> 0.741, balanced "
            "accuracy 0.471 -> 0.499, segmenter Dice 0.24 -> 0.32 and lesion sensitivity at 1 "
            "false positive per image 0.43 -> 0.53 on the same folds.",
            "1.3.0: the segmenter averages two patch scanners fine-tuned with different seeds "
            "(one in 1.2.0); macro AUC 0.659 -> 0.696 and cancer AUC 0.659 -> 0.728 on the "
            "same folds.",
            "1.2.0: the segmenter is a patch scanner: Lite0's top 6 blocks fine-tuned on 128 px "
            "native-resolution lesion and normal-tissue patches, run convolutionally over the "
            "breast (1.1.0 used frozen ImageNet features and a 1x1 head); macro AUC 0.616 -> "
            "0.659 on the same folds; the temperature is shipped only if it lowers the "
            "cross-fitted ECE.",
            "1.1.0: the classifier head corrects the patch-scan reading (log prior + learned "
            "correction); segmenter class weights softened (power 0.5); 5 head epochs.",
            "1.0.0: first trained bundle (learned head alone; macro AUC 0.57, below the scan).",
        ],
        "training": {k: v for k, v in config.items() if k != "preprocessing"},
        "training_seconds": evaluation.get("seconds"),
    }


def export_runs(runs: list[Path], out_dir: Path, overwrite: bool = False,
                replicates: list[Path] | None = None) -> Path:
    """Export one recipe run as a bundle folder (checksummed, LiteRT parity checked), with the
    figures of its ``replicates`` (the same recipe on other fold splits, cross-validation only)."""
    from models.architectures import load
    from models.export import write_bundle

    if len(runs) != 1:
        raise RunError("give exactly one run of the bundle recipe (it holds both models)")
    run = Path(runs[0])
    config, evaluation = _read_run(run)
    try:  # refused before any work
        other = read_replicates(config, evaluation, list(replicates or []))
        meta = bundle_metadata(config, evaluation, other)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise RunError(f"{run}: its config.json or evaluation.json (or a replicate's) is incomplete "
                       f"or altered ({type(exc).__name__}: {exc}); export needs them as the "
                       "recipe wrote them") from exc
    classifier = load(run / "classifier.keras")
    segmenter = load(run / "segmenter.keras")
    verifier = None
    if config.get("verify_top"):
        if not (run / "verifier.keras").is_file():
            raise RunError(f"{run}: the run re-reads its top cells but has no verifier.keras")
        verifier = load(run / "verifier.keras")
    return write_bundle(out_dir, classifier, segmenter, meta, overwrite=overwrite, verifier_model=verifier)
