"""``mammolab train``, ``mammolab evaluate`` and ``mammolab export`` (dispatched by core.cli).

    mammolab train --arch NAME --data PATH [--config FILE.json] [options]
    mammolab evaluate RUN [--data PATH]
    mammolab export RUN... OUT_DIR [--overwrite] [--replicate RUN]

Exit codes: 0 success; 2 a usage or data error, reported in one line (a missing folder, an
unreadable image, a bad config or setting, a run that cannot be exported); 1 a run that failed
while training, evaluating or exporting (with its traceback, since that is a bug or a resource
problem, not bad input).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

USAGE_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError)  # DatasetError,
# ImageReadError and the export's RunError are ValueErrors


class _QuietRetracing(logging.Filter):
    """Drop TensorFlow's retracing notice: each fold's fresh model traces its own functions."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def _echo(line: str) -> None:
    print(line, flush=True)


def _fail(cmd: str, exc: BaseException, code: int) -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"mammolab {cmd}: {message}", file=sys.stderr)
    return code


def _crash(cmd: str, what: str) -> int:
    traceback.print_exc()
    print(f"mammolab {cmd}: {what} failed (traceback above)", file=sys.stderr)
    return 1


def _took(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


# -- train --------------------------------------------------------------------------------------


def _train_parser() -> argparse.ArgumentParser:
    # SUPPRESS: only the flags actually given reach the namespace, so they can override the
    # config file's keys without the flags' defaults masking them.
    p = argparse.ArgumentParser(
        prog="mammolab train",
        argument_default=argparse.SUPPRESS,
        description="Train one model of the study on patient-level splits, then evaluate it on "
        "the held-out patients. Every flag is also a key of --config (with underscores); flags "
        "override the file.",
    )
    p.add_argument("--config", metavar="FILE.json", help="settings as a JSON object")
    p.add_argument("--arch", metavar="NAME",
                   help="architecture (a name of models.architectures.ARCHITECTURES, e.g. "
                   "narrower_cnn, transfer_efficientnet, hybrid_multibranch, unet_segmenter, "
                   "lesion_multibranch)")
    p.add_argument("--data", metavar="PATH",
                   help="a MIAS folder, a Mini-DDSM folder, or a folder with Normal/, Benign/ "
                   "and Cancer/ subfolders")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<arch>-<timestamp>)")
    p.add_argument("--input-size", type=int, metavar="PX", help="model input side (default 224)")
    p.add_argument("--epochs", type=int, metavar="N",
                   help="epochs (of phase 1 for EfficientNet models; default 30)")
    p.add_argument("--batch-size", type=int, metavar="N", help="default 8")
    p.add_argument("--learning-rate", type=float, metavar="LR", help="default 1e-3")
    p.add_argument("--balance", choices=("class_weight", "sampling", "none"),
                   help="class-weighted loss (default), balanced sampling, or neither")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no augmentation of the training images")
    p.add_argument("--seed", type=int, metavar="N", help="default 0")
    p.add_argument("--test-fraction", type=float, metavar="F",
                   help="share of patients held out for testing (default 0.2)")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help="share of the remaining patients for validation (default 0.2)")
    p.add_argument("--folds", type=int, metavar="K",
                   help="K-fold cross-validation by patient, evaluated on out-of-fold predictions")
    p.add_argument("--patience", type=int, metavar="N",
                   help="early stopping: epochs without a lower validation loss (default 8)")
    p.add_argument("--max-steps", type=int, metavar="N", help="at most N steps per epoch")
    p.add_argument("--limit", type=int, metavar="N", help="use N images, stratified by label")
    p.add_argument("--backbone", choices=("lite0", "b0"),
                   help="EfficientNet of transfer_efficientnet / hybrid_multibranch (default lite0)")
    p.add_argument("--imagenet-weights", metavar="PATH",
                   help="EfficientNet weights file (B0: Keras efficientnetb0_notop; Lite0: .pth)")
    p.add_argument("--random-init", action="store_true",
                   help="EfficientNet from random weights (recorded as not pretrained)")
    p.add_argument("--fine-tune-epochs", type=int, metavar="N",
                   help="epochs of phase 2, top blocks unfrozen (default = --epochs; 0: none)")
    p.add_argument("--fine-tune-blocks", type=int, metavar="N",
                   help="EfficientNet blocks unfrozen in phase 2, from the top (default 3)")
    p.add_argument("--fine-tune-lr", type=float, metavar="LR",
                   help="learning rate of phase 2 (default --learning-rate / 10)")
    p.add_argument("--arch-params", metavar="JSON",
                   help='extra builder arguments, e.g. \'{"base_filters": 8}\'')
    p.add_argument("--mask-threshold", type=float, metavar="P",
                   help="segmenters: probability threshold of the mask (default 0.5)")
    p.add_argument("--n-boot", type=int, metavar="N",
                   help="bootstrap resamples of patients (default 1000)")
    return p


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    """The config file's settings overridden by the flags, and the keys given by either."""
    flags = vars(args).copy()
    config_file = flags.pop("config", None)
    settings: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"config file {path} is not valid JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a JSON object of settings")
        settings = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        if "config" in settings:
            raise ValueError(f"config file {path}: 'config' cannot be a setting")
    if "arch_params" in flags:
        try:
            flags["arch_params"] = json.loads(flags["arch_params"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"--arch-params is not valid JSON ({exc})") from None
    settings.update(flags)
    return settings, set(settings)


def _train(argv: list[str]) -> int:
    started = time.perf_counter()
    args = _train_parser().parse_args(argv)
    from models import training

    try:
        settings, given = _settings(args)
        source = f"config file {args.config}" if "config" in args else "settings"
        cfg = training.TrainConfig.from_dict(settings, source)
        if cfg.arch == training.RECIPE_ARCH:
            try:
                training.train_recipe(cfg, given, _echo)
            except USAGE_ERRORS as exc:
                return _fail("train", exc, 2)
            print(f"time taken: {_took(time.perf_counter() - started)}", flush=True)
            return 0
        plan = training.plan_run(cfg, ["mammolab", "train", *argv], _echo)
    except USAGE_ERRORS as exc:
        return _fail("train", exc, 2)
    try:
        training.execute(plan, _echo)
    except KeyboardInterrupt:
        print(f"mammolab train: interrupted; the best model so far is in {plan.out}",
              file=sys.stderr)
        return 1
    except training.TrainingDiverged as exc:
        print(f"mammolab train: {exc}; {plan.out} keeps what was written before, so give another "
              "--out or remove it", file=sys.stderr)
        return 1
    except Exception:
        return _crash("train", "the training run")
    print(f"run folder: {plan.out}", flush=True)
    print(f"time taken: {_took(time.perf_counter() - started)}", flush=True)
    return 0


# -- evaluate -----------------------------------------------------------------------------------


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mammolab evaluate",
        description="Evaluate a training run on its held-out patients (the test split, or the "
        "out-of-fold predictions of a cross-validation run) and rewrite evaluation.json and "
        "the plots in the run folder.",
    )
    p.add_argument("run", metavar="RUN", help="run folder written by mammolab train")
    p.add_argument("--data", metavar="PATH",
                   help="the data folder, if it moved since training (default: the run's)")
    p.add_argument("--n-boot", type=int, metavar="N",
                   help="bootstrap resamples of patients (default: the run's setting)")
    return p


def _evaluate(argv: list[str]) -> int:
    started = time.perf_counter()
    args = _evaluate_parser().parse_args(argv)
    from models import training

    run = Path(args.run)
    try:
        if args.n_boot is not None and args.n_boot < 0:
            raise ValueError(f"--n-boot must be >= 0, not {args.n_boot}")
        if training.is_recipe_run(run):
            from models.bundle_recipe import reevaluate

            reevaluate(run)
            print(f"evaluation: {run / 'evaluation.json'}", flush=True)
            return 0
        inputs = training.load_evaluation_inputs(run, args.data, n_boot=args.n_boot, echo=_echo)
    except USAGE_ERRORS as exc:
        return _fail("evaluate", exc, 2)
    from models.architectures import ModelFileError

    try:
        training.evaluate_loaded(inputs, _echo)
    except ModelFileError as exc:
        return _fail("evaluate", exc, 2)
    except Exception:
        return _crash("evaluate", "the evaluation")
    print(f"evaluation: {run / 'evaluation.json'}", flush=True)
    print(f"time taken: {_took(time.perf_counter() - started)}", flush=True)
    return 0


# -- export -------------------------------------------------------------------------------------


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mammolab export",
        description="Export a run of the lesion_multibranch recipe (classifier.keras + "
        "segmenter.keras) as a LiteRT model bundle the app opens.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--replicate", action="append", default=[], metavar="RUN",
                   help="a run of the same recipe on another fold split (python -m "
                        "models.bundle_recipe --seed N --cv-only); its figures go into the model "
                        "card beside the run's own (repeatable)")
    return p


def _export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    runs = [Path(r) for r in args.runs]
    out_dir = Path(args.out_dir)
    replicates = [Path(r) for r in args.replicate]
    missing = [r for r in (*runs, *replicates) if not r.is_dir()]
    if missing:
        print(f"mammolab export: no such run folder: {missing[0]}", file=sys.stderr)
        return 2
    try:
        from models.export import check_bundle_target

        check_bundle_target(out_dir, args.overwrite, how="pass --overwrite")
    except FileExistsError as exc:
        print(f"mammolab export: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        pass  # the import below says what is missing
    try:
        from models.bundle_export import export_runs
    except ImportError as exc:
        print(f"mammolab export: the exporter is not available ({exc})", file=sys.stderr)
        return 1
    not_exportable: tuple[type[BaseException], ...] = (*USAGE_ERRORS, FileExistsError)
    try:
        from models.export import ExportError

        not_exportable = (*not_exportable, ExportError)
    except ImportError:
        pass
    try:
        bundle = export_runs(runs, out_dir, overwrite=args.overwrite, replicates=replicates)
    except not_exportable as exc:
        return _fail("export", exc, 2)
    except Exception:
        return _crash("export", "the export")
    print(f"bundle: {bundle}", flush=True)
    return 0


# -- dispatch -----------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _train,
    "evaluate": _evaluate,
    "export": _export,
}


def main(cmd: str, argv: list[str]) -> int:
    """Run ``mammolab <cmd> <argv...>``; returns the exit code (argparse's own exits included)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    tf_log = logging.getLogger("tensorflow")
    if not any(isinstance(f, _QuietRetracing) for f in tf_log.filters):
        tf_log.addFilter(_QuietRetracing())
    if cmd not in COMMANDS:
        print(f"mammolab: unknown command {cmd!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](list(argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message printed)
        return exc.code if isinstance(exc.code, int) else 2
