"""Export trained Keras models to the LiteRT bundle the app loads.

A bundle is a folder::

    classifier.tflite   float32 (or float16-weight) LiteRT model, batch 1, static shapes
    segmenter.tflite    likewise
    MODEL_CARD.md       intended use, data and licences, figures with intervals, limits
    model.json          everything the app reads (see :func:`write_bundle`), with the sha256 and
                        size of each file above

The export converts each model from a concrete function with a fixed batch of 1, so every
tensor has a static shape, and names the inputs after the Keras inputs (the app finds them by
name). The bundle is assembled in a hidden temporary folder next to the destination and renamed
into place only once every file is written, checked against its Keras model and accepted by
the app's own loader (:func:`core.bundle.load_bundle`), so a failed export never leaves half a
bundle.

TensorFlow is imported only by the functions that convert; reading and running ``.tflite``
files needs only ``ai_edge_litert``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import SEMVER, BundleError, load_bundle
from core.pairing import check_bilateral, check_single_film
from models.evaluation import compare_table, format_figure

log = logging.getLogger(__name__)

__all__ = [
    "CARD_FILE",
    "CLASSIFIER_FILE",
    "INTENDED_USE",
    "MIAS",
    "REQUIRED_METADATA",
    "SEGMENTER_FILE",
    "ExportError",
    "describe_tflite",
    "render_model_card",
    "run_tflite",
    "sha256_file",
    "to_tflite",
    "validate_metadata",
    "write_bundle",
]

FORMAT_VERSION = 1  # of model.json; raise when a key changes meaning
CLASSIFIER_FILE = "classifier.tflite"
SEGMENTER_FILE = "segmenter.tflite"
VERIFIER_FILE = "verifier.tflite"
CARD_FILE = "MODEL_CARD.md"
DEFAULT_RANGE = (0.0, 1.0)  # every image and score input of the app is in [0, 1]
PARITY_TOL = {False: 1e-4, True: 1e-2}  # max |Keras - LiteRT| on random inputs, by float16
PARITY_SEED = 0

INTENDED_USE = (
    "Education and research only. MammoLab and its models are not a medical device: they must "
    "not be used for diagnosis, screening, triage or any decision about a person's care."
)

MIAS: dict[str, str] = {
    "name": "mini-MIAS (Mammographic Image Analysis Society MiniMammographic Database)",
    "licence": "Research use only (MIAS licence agreement); may not be rented, leased or sold; "
               "publications must reference the database.",
    "citation": "Suckling J, Parker J, Dance DR, et al. The Mammographic Image Analysis Society "
                "digital mammogram database. Exerpta Medica, International Congress Series 1069, "
                "1994, pp. 375-378.",
    "description": "322 digitised film-screen mediolateral-oblique mammograms of 161 women, "
                   "200 micron pixels, 1024 x 1024 px, with lesion centres, radii and "
                   "benign/malignant labels.",
}

REQUIRED_METADATA: dict[str, str] = {
    "name": "model name shown in the app (non-empty text)",
    "version": "semantic version, e.g. '1.2.0'",
    "classes": "class names in the classifier's output order (list of unique texts)",
    "preprocessing": "preprocessing parameters used in training (core.preprocess.PreprocessConfig.to_dict())",
    "pipeline": "inference settings read by core.inference (canvas, cell_px, top_k, patch_px, global_px, ...)",
    "temperature": "fitted calibration temperature, a number > 0 (1.0 when not calibrated)",
    "evaluation": "figures with intervals and the data they were measured on: a dict with a 'data' entry",
    "training_data": "list of data sources, each a dict with 'name', 'licence' and 'citation'",
}
OPTIONAL_METADATA = ("description", "input_ranges", "limitations", "changelog")
COMPUTED_KEYS = ("format_version", "intended_use", "inputs", "outputs", "frameworks", "export",
                 "created", "files")


class ExportError(RuntimeError):
    """The models were converted but the result cannot be trusted (parity, bundle check)."""


# -- files ------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- conversion -------------------------------------------------------------------------------


def _flat_inputs(keras_model: Any) -> list[Any]:
    import keras

    return list(keras.tree.flatten(keras_model.input))


def _call_keras(keras_model: Any, values: Sequence[Any]) -> list[Any]:
    """Call the model on inputs given in :func:`_flat_inputs` order; outputs flattened."""
    import keras

    packed = keras.tree.pack_sequence_as(keras_model.input, list(values))
    return list(keras.tree.flatten(keras_model(packed, training=False)))


def to_tflite(keras_model: Any, path: str | Path, float16: bool = False) -> Path:
    """Convert a Keras model to a LiteRT flatbuffer with batch size 1.

    The model is traced as a concrete function whose inputs are the Keras inputs with a batch
    of 1, named after them, in ``keras.tree.flatten(model.input)`` order, and whose outputs are the
    Keras outputs in order. The function is frozen (weights become constants): converting with
    the model as a tracked object instead keeps resource variables that LiteRT leaves
    uninitialised (NaN outputs, or a READ_VARIABLE failure without XNNPACK). Works for models with
    one input, a list of inputs or a dict of inputs. Only built-in LiteRT ops are allowed, so the
    app's interpreter runs the file without TensorFlow. The written file is loaded and run once
    on zeros before returning.

    Parameters
    ----------
    keras_model : keras.Model
        Every input dimension but the batch must be known.
    path : str or Path
        Destination ``.tflite``; parent folders are created.
    float16 : bool
        Store weights as float16 (about half the size; inputs and outputs stay float32, and
        results differ from Keras by up to ~1e-3). Default float32: no quantisation.

    Returns
    -------
    Path
        The written file. :func:`describe_tflite` gives its input names, order and shapes.
    """
    import tensorflow as tf

    flat = _flat_inputs(keras_model)
    names = [t.name for t in flat]
    if len(set(names)) != len(names):
        raise ValueError(f"model '{keras_model.name}' has duplicate input names {names}")
    specs = []
    for t in flat:
        shape = tuple(t.shape)
        if any(d is None for d in shape[1:]):
            raise ValueError(
                f"model '{keras_model.name}': input '{t.name}' has shape {shape} with an unknown "
                "dimension; the app needs static shapes, so build the model with fixed input sizes"
            )
        specs.append(tf.TensorSpec((1, *shape[1:]), tf.as_dtype(t.dtype or "float32"), name=t.name))

    @tf.function(input_signature=specs)
    def serve(*args: Any) -> tuple[Any, ...]:
        return tuple(_call_keras(keras_model, args))

    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if float16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    data = converter.convert()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    _smoke_test(out)
    log.info("wrote %s (%d bytes, float16=%s)", out, len(data), float16)
    return out


def _smoke_test(path: Path) -> None:
    """Run the file once on zeros with the app's interpreter settings; outputs must be finite."""
    specs, _ = _io(_interpreter(path))
    try:
        outputs = run_tflite(path, [np.zeros(s["shape"], s["dtype"]) for s in specs])
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"{path.name}: LiteRT cannot run the converted model ({exc})") from exc
    if not all(np.all(np.isfinite(o)) for o in outputs):
        raise ExportError(f"{path.name}: the converted model gives NaN or infinite outputs on zeros")


# -- reading and running .tflite files --------------------------------------------------------


def _interpreter(path: str | Path, num_threads: int | None = None) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=num_threads)
    interp.allocate_tensors()
    return interp


def _io(interp: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs in the file's order, with their names and tensor indices."""

    def entry(i: int, d: dict[str, Any]) -> dict[str, Any]:
        return {"name": d["name"], "position": i, "index": int(d["index"]),
                "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name}

    return ([entry(i, d) for i, d in enumerate(interp.get_input_details())],
            [entry(i, d) for i, d in enumerate(interp.get_output_details())])


def describe_tflite(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a ``.tflite`` file as LiteRT sees them.

    Returns
    -------
    dict
        ``inputs`` and ``outputs``, each a list in the file's order of ``{name, position, index,
        shape, dtype}``: the tensor name (for files from :func:`to_tflite`, an input's name is
        the Keras input name), its position in that order, its tensor index, the shape with the
        batch of 1 and the numpy dtype name. For files from :func:`to_tflite` the outputs are in
        the Keras output order (:func:`write_bundle` checks this against Keras).
    """
    inputs, outputs = _io(_interpreter(path))
    return {"inputs": inputs, "outputs": outputs}


def _find_input(specs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    hits = [s for s in specs if s["name"] == key]
    if hits:
        return hits[0]
    hits = [s for s in specs if key in s["name"]]
    if len(hits) == 1:
        return hits[0]
    names = [s["name"] for s in specs]
    raise ValueError(f"no single model input matches '{key}'; the inputs are {names}")


def run_tflite(
    path: str | Path,
    inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    num_threads: int | None = None,
) -> list[np.ndarray]:
    """Run a ``.tflite`` file once with ``ai_edge_litert`` (for parity checks and tests).

    Parameters
    ----------
    path : str or Path
        The model file.
    inputs : dict or list
        A dict keyed by input name (the Keras input name; a unique part of a tensor name also
        matches), or a list in the file's input order (:func:`describe_tflite`). Each array has
        the input's shape, with or without the leading batch of 1; it is cast to the input dtype.
    num_threads : int, optional
        LiteRT threads.

    Returns
    -------
    list of np.ndarray
        Outputs in the file's order (the Keras order for files from :func:`to_tflite`), each
        with its batch axis of 1.
    """
    interp = _interpreter(path, num_threads)
    specs, outs = _io(interp)
    if isinstance(inputs, Mapping):
        pairs = [(_find_input(specs, str(k)), v) for k, v in inputs.items()]
        given = {id(s) for s, _ in pairs}
        missing = [s["name"] for s in specs if id(s) not in given]
        if missing or len(given) != len(pairs):
            raise ValueError(f"inputs must give each of {[s['name'] for s in specs]} once; "
                             f"missing {missing}")
    else:
        values = list(inputs)
        if len(values) != len(specs):
            raise ValueError(f"the model takes {len(specs)} inputs {[s['name'] for s in specs]}, "
                             f"got {len(values)}")
        pairs = list(zip(specs, values, strict=True))
    for spec, value in pairs:
        arr = np.asarray(value, dtype=spec["dtype"])
        if list(arr.shape) == spec["shape"][1:]:
            arr = arr[None]
        if list(arr.shape) != spec["shape"]:
            raise ValueError(f"input '{spec['name']}' needs shape {spec['shape']}, got {list(arr.shape)}")
        interp.set_tensor(spec["index"], np.ascontiguousarray(arr))
    interp.invoke()
    return [np.array(interp.get_tensor(o["index"])) for o in outs]


def _parity(keras_model: Any, path: Path, ranges: Mapping[str, Sequence[float]]) -> float:
    """Largest |Keras - LiteRT| over all outputs for one seeded random input in range."""
    import keras

    rng = np.random.default_rng(PARITY_SEED)
    feeds = {}
    for t in _flat_inputs(keras_model):
        lo, hi = ranges.get(t.name, DEFAULT_RANGE)
        feeds[t.name] = rng.uniform(lo, hi, size=(1, *tuple(t.shape)[1:])).astype(np.float32)
    expected = [keras.ops.convert_to_numpy(o) for o in _call_keras(keras_model, list(feeds.values()))]
    got = run_tflite(path, feeds)
    if [e.shape for e in expected] != [g.shape for g in got]:
        raise ExportError(f"{path.name}: output shapes {[g.shape for g in got]} differ from "
                          f"Keras {[e.shape for e in expected]}")
    return max(float(np.max(np.abs(e.astype(np.float64) - g))) for e, g in zip(expected, got, strict=True))


# -- metadata ---------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Check the caller's part of ``model.json`` and return a plain-JSON deep copy.

    Required keys are those of :data:`REQUIRED_METADATA`; optional ones ``description`` (text),
    ``input_ranges`` ({input name: [low, high]}, default [0, 1] for any input not listed),
    ``limitations`` (list of texts added to the model card), ``changelog``; any other key is
    kept as given. Keys the export computes (``files``, ``inputs``, ...) may not be passed.

    Raises
    ------
    ValueError
        Naming every problem found.
    """
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    problems = [f"missing '{k}': {why}" for k, why in REQUIRED_METADATA.items() if k not in metadata]
    problems += [f"'{k}' is computed by the export and may not be given" for k in COMPUTED_KEYS
                 if k in metadata]
    m = metadata
    if "name" in m and not (isinstance(m["name"], str) and m["name"].strip()):
        problems.append("'name' must be non-empty text")
    if "version" in m and not (isinstance(m["version"], str) and SEMVER.match(m["version"])):
        problems.append(f"'version' must be a semantic version like '1.2.0', got {m['version']!r}")
    if "classes" in m:
        c = m["classes"]
        if (not isinstance(c, list | tuple) or len(c) < 2
                or not all(isinstance(x, str) and x.strip() for x in c) or len(set(c)) != len(c)):
            problems.append(f"'classes' must be a list of at least 2 unique names, got {c!r}")
    for key in ("preprocessing", "pipeline"):
        if key in m and not isinstance(m[key], Mapping):
            problems.append(f"'{key}' must be a dict")
    pipeline = m.get("pipeline")
    for key, check in (("bilateral", check_bilateral), ("single_film", check_single_film)):
        if isinstance(pipeline, Mapping) and pipeline.get(key) is not None:
            try:
                check(pipeline[key], list(m.get("classes") or []))
            except ValueError as exc:
                problems.append(str(exc))
    if "temperature" in m and not (_is_number(m["temperature"]) and m["temperature"] > 0):
        problems.append(f"'temperature' must be a finite number > 0, got {m['temperature']!r}")
    if "evaluation" in m:
        e = m["evaluation"]
        if not isinstance(e, Mapping) or not e.get("data"):
            problems.append("'evaluation' must be a dict saying in 'data' what the figures were "
                            "measured on")
    if "training_data" in m:
        td = m["training_data"]
        if not isinstance(td, list | tuple) or not td:
            problems.append("'training_data' must be a non-empty list of data sources")
        else:
            for i, src in enumerate(td):
                if not isinstance(src, Mapping):
                    problems.append(f"'training_data'[{i}] must be a dict")
                    continue
                for field in ("name", "licence", "citation"):
                    if not (isinstance(src.get(field), str) and src[field].strip()):
                        problems.append(f"'training_data'[{i}] needs '{field}' (text)")
    if "input_ranges" in m:
        r = m["input_ranges"]
        ok = isinstance(r, Mapping) and all(
            isinstance(v, list | tuple) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] < v[1]
            for v in r.values())
        if not ok:
            problems.append("'input_ranges' must map input names to [low, high] with low < high")
    if "limitations" in m and not (isinstance(m["limitations"], list | tuple)
                                   and all(isinstance(x, str) for x in m["limitations"])):
        problems.append("'limitations' must be a list of texts")
    if not problems:
        try:
            return json.loads(json.dumps(dict(m), allow_nan=False))
        except (TypeError, ValueError) as exc:
            problems.append(f"metadata must be plain JSON without NaN ({exc})")
    raise ValueError("invalid bundle metadata:\n  - " + "\n  - ".join(problems))


def _frameworks() -> dict[str, str]:
    import keras
    import tensorflow as tf

    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    try:
        versions["ai_edge_litert"] = importlib_metadata.version("ai-edge-litert")
    except importlib_metadata.PackageNotFoundError:
        pass
    return versions


# -- the bundle -------------------------------------------------------------------------------


def check_bundle_target(out_dir: str | Path, overwrite: bool = False,
                        how: str = "pass overwrite=True") -> None:
    """Refuse a bundle folder that cannot be written without losing something, before any work.

    A new or empty folder is fine. An existing one is replaced only with ``overwrite``, and only
    if it is a model bundle: a ``model.json`` and no subfolders (a bundle has none). Anything else,
    a run folder, a project or data folder, a file, would lose what it holds with the swap.
    ``how`` is what the message tells the caller to do to overwrite (the CLI names its flag).

    Raises
    ------
    FileExistsError
        ``out_dir`` is a file, or a folder with content that ``overwrite`` may not replace.
    """
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for the bundle")
    content = list(out.iterdir())
    if not content:
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder, or {how} "
                              "to replace a model bundle")
    folders = sorted(c.name for c in content if c.is_dir() and c.name != "__pycache__")
    if not (out / "model.json").is_file() or folders:
        held = f"it holds folders ({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''})" \
            if folders else "it has no model.json"
        raise FileExistsError(f"{out} is not a model bundle ({held}); overwriting replaces only a "
                              "bundle folder, so choose a new or empty folder")


def write_bundle(
    out_dir: str | Path,
    classifier_model: Any,
    segmenter_model: Any,
    metadata: Mapping[str, Any],
    *,
    float16: bool = False,
    overwrite: bool = False,
    verifier_model: Any = None,
) -> Path:
    """Export both models, ``model.json`` and ``MODEL_CARD.md`` as a bundle folder, atomically.

    ``model.json`` holds, in this order: ``format_version``; ``name``, ``version``,
    ``description`` (if given); ``intended_use``; ``classes`` (classifier output order);
    ``temperature``; ``preprocessing``; ``pipeline``; ``inputs`` and ``outputs``
    (``{"classifier": [...], "segmenter": [...]}``, each entry ``{name, position, index, shape,
    dtype}`` as in :func:`describe_tflite`, in the file's order, inputs also with ``range``, the
    value range [low, high]); ``evaluation``; ``training_data``; ``limitations``;
    ``frameworks`` (tensorflow, keras, numpy, python, ai_edge_litert versions); ``export``
    (float16, converter, parity: the largest |Keras - LiteRT| difference on a seeded random
    input); ``created`` (UTC, ISO 8601); any other metadata keys as given; and last ``files``:
    ``{file name: {sha256, bytes}}`` for the two models and the model card.

    Parameters
    ----------
    out_dir : str or Path
        The bundle folder to create.
    classifier_model, segmenter_model : keras.Model
        Static input shapes; the classifier's first output has one column per class.
    metadata : dict
        See :func:`validate_metadata`.
    float16 : bool
        Float16 weights (see :func:`to_tflite`).
    overwrite : bool
        Replace an existing bundle folder ``out_dir`` (only once the new bundle is complete).
    verifier_model : keras.Model, optional
        The patch verifier, written as ``verifier.tflite`` (its number of patches must be the
        pipeline's ``verify_top`` times the number of its ``verify_shifts``, one by default);
        without it, ``verify_top`` must be absent or 0.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ValueError
        Invalid metadata, or classes that do not match the classifier's output.
    FileExistsError
        ``out_dir`` is a file, or a folder with content and ``overwrite`` is false, or a folder
        that is not a bundle (see :func:`check_bundle_target`).
    ExportError
        A converted model disagrees with Keras, or the app's loader rejects the bundle.
    """
    meta = validate_metadata(metadata)
    n_out = tuple(_first_output_shape(classifier_model))[-1]
    if n_out != len(meta["classes"]):
        raise ValueError(f"the classifier gives {n_out} outputs but metadata names "
                         f"{len(meta['classes'])} classes {meta['classes']}")
    verify_top = int(meta["pipeline"].get("verify_top", 0) or 0)
    if (verifier_model is None) != (verify_top == 0):
        raise ValueError("the pipeline's verify_top and the verifier model must come together "
                         f"(verify_top {verify_top}, verifier {'given' if verifier_model else 'none'})")
    out = Path(out_dir)
    check_bundle_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # an ordinary folder, not mkdtemp's owner-only one
    try:
        _assemble(tmp, classifier_model, segmenter_model, meta, float16, verifier_model)
        try:
            load_bundle(tmp)
        except BundleError as exc:
            raise ExportError(f"the app's loader rejects the new bundle: {exc}") from exc
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle %s %s written to %s", meta["name"], meta["version"], out)
    return out


def _first_output_shape(model: Any) -> tuple[Any, ...]:
    import keras

    return tuple(keras.tree.flatten(model.output)[0].shape)


def _assemble(folder: Path, classifier: Any, segmenter: Any, meta: dict[str, Any], float16: bool,
              verifier: Any = None) -> None:
    meta = dict(meta)  # entries are moved into the card in order; the caller's copy stays whole
    ranges = meta.pop("input_ranges", {})
    io: dict[str, dict[str, list[dict[str, Any]]]] = {}
    parity: dict[str, float] = {}
    roles = [("classifier", classifier, CLASSIFIER_FILE), ("segmenter", segmenter, SEGMENTER_FILE)]
    if verifier is not None:
        roles.append(("verifier", verifier, VERIFIER_FILE))
    for role, model, file in roles:
        path = to_tflite(model, folder / file, float16=float16)
        io[role] = describe_tflite(path)
        for spec in io[role]["inputs"]:
            spec["range"] = [float(x) for x in ranges.get(spec["name"], DEFAULT_RANGE)]
        parity[role] = _parity(model, path, ranges)
        if not parity[role] <= PARITY_TOL[float16]:  # NaN fails too
            raise ExportError(f"{file} differs from its Keras model by {parity[role]:.3g} "
                              f"(tolerance {PARITY_TOL[float16]:g})")
    card: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": meta.pop("name"),
                            "version": meta.pop("version")}
    if "description" in meta:
        card["description"] = meta.pop("description")
    card["intended_use"] = INTENDED_USE
    for key in ("classes", "temperature", "preprocessing", "pipeline"):
        card[key] = meta.pop(key)
    card["inputs"] = {role: io[role]["inputs"] for role in io}
    card["outputs"] = {role: io[role]["outputs"] for role in io}
    card["evaluation"] = meta.pop("evaluation")
    card["training_data"] = meta.pop("training_data")
    card["limitations"] = meta.pop("limitations", [])
    card["frameworks"] = _frameworks()
    card["export"] = {
        "float16": float16,
        "converter": "tf.lite.TFLiteConverter.from_concrete_functions, batch 1, built-in ops only",
        "parity_max_abs_diff": parity,
        "parity_input": f"uniform random in each input's range, seed {PARITY_SEED}",
    }
    card["created"] = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    card.update(meta)  # any further keys the caller gave (changelog, training settings, ...)
    files = {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size}
             for _, _, f in roles}
    card["files"] = files
    (folder / CARD_FILE).write_text(render_model_card(card), encoding="utf-8")
    files[CARD_FILE] = {"sha256": sha256_file(folder / CARD_FILE),
                        "bytes": (folder / CARD_FILE).stat().st_size}
    (folder / "model.json").write_text(json.dumps(card, indent=2, allow_nan=False) + "\n",
                                       encoding="utf-8")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to ``out``; an old bundle is removed only after the swap.

    Files of the old folder that the bundle does not write (a package marker, a README) are
    carried over.
    """
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for the bundle
    if not out.exists():
        os.rename(tmp, out)
        return
    check_bundle_target(out, overwrite)  # again: it may have changed during the export
    for extra in out.iterdir():
        if extra.is_file() and not (tmp / extra.name).exists():
            shutil.copy2(extra, tmp / extra.name)
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- the model card ---------------------------------------------------------------------------

_GENERIC_LIMITS = (
    "Not clinically validated. The figures above hold for the evaluation data described and may "
    "not hold for other scanners, digital or film mammography from other sites, other "
    "populations or other views.",
    "Intervals are bootstrap intervals on the evaluation data: they describe sampling "
    "uncertainty, not the change in performance on data from elsewhere.",
    "Probabilities (after the temperature) say how sure the model is, calibrated on the "
    "evaluation data; they are not the probability that a person has cancer.",
)


def _is_figure(v: Any) -> bool:
    return isinstance(v, Mapping) and "value" in v and "ci95" in v


def _is_report(v: Any) -> bool:
    return isinstance(v, Mapping) and "accuracy" in v and "per_class" in v


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _bullets(data: Mapping[str, Any], depth: int = 0) -> list[str]:
    pad = "  " * depth
    lines = []
    for key, v in data.items():
        if _is_figure(v):
            lines.append(f"{pad}- {key}: {format_figure(v)}")
        elif isinstance(v, Mapping):
            if depth >= 3:
                lines.append(f"{pad}- {key}: (see model.json)")
            else:
                lines.append(f"{pad}- {key}:")
                lines += _bullets(v, depth + 1)
        elif isinstance(v, list | tuple) and v and all(isinstance(x, Mapping) for x in v):
            lines.append(f"{pad}- {key}:")
            for item in v:
                lines.append(f"{pad}  - " + ", ".join(f"{k} {_scalar(x)}" for k, x in item.items()
                                                      if not isinstance(x, Mapping | list)))
        elif isinstance(v, list | tuple) and len(v) > 12:
            lines.append(f"{pad}- {key}: ({len(v)} values, see model.json)")
        elif isinstance(v, list | tuple):
            lines.append(f"{pad}- {key}: " + ", ".join(_scalar(x) for x in v))
        else:
            lines.append(f"{pad}- {key}: {_scalar(v)}")
    return lines


def _report_section(title: str, report: Mapping[str, Any]) -> list[str]:
    lines = [f"### {title}", "", compare_table({title: report}).rstrip(), ""]
    lines += ["| Class | n | Precision | Recall | F1 | AUC (one vs rest) |", "|---|---|---|---|---|---|"]
    for name, fig in report.get("per_class", {}).items():
        n = report.get("n_per_class", {}).get(name, "n/a")
        lines.append(f"| {name} | {n} | " + " | ".join(
            format_figure(fig.get(k)) for k in ("precision", "recall", "f1", "auc")) + " |")
    cm = report.get("confusion_matrix")
    classes = report.get("classes", [])
    if cm and len(cm) == len(classes):
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |",
                  "|---" * (len(classes) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(str(x) for x in row) + " |"
                  for c, row in zip(classes, cm, strict=True)]
    if report.get("method"):
        lines += ["", f"How obtained: {report['method']}"]
    return lines + [""]


def render_model_card(model_json: Mapping[str, Any]) -> str:
    """The model card (Markdown) for a ``model.json`` dict: intended use, model, data and
    licences, evaluation with intervals and how they were obtained, limits, provenance."""
    j = model_json
    lines = [f"# {j.get('name', 'Unnamed model')} {j.get('version', '')}".rstrip(), ""]
    if j.get("description"):
        lines += [str(j["description"]), ""]
    lines += ["## Intended use", "", f"**{INTENDED_USE}**", "",
              "Intended users: students, teachers and researchers exploring how mammography "
              "models behave. The output is a set of class probabilities and a lesion map for "
              "one image" + (", read beside the other breast's image of the same view when it is "
                             "at hand" if (j.get("pipeline") or {}).get("bilateral") else "")
              + "; it is not a finding.", ""]
    lines += ["## Model", "", "Classes, in output order: " + ", ".join(j.get("classes", [])) + ".", ""]
    if (j.get("pipeline") or {}).get("single_film"):
        lines += ["Calibration: a film read alone gets the single-film stage's probabilities "
                  "(pipeline.single_film, a logistic model on the classifier's log-odds fitted on "
                  "out-of-fold predictions), in place of the temperature.", ""]
    elif "temperature" in j:
        lines += [f"Calibration temperature: {_scalar(j['temperature'])} (probabilities are "
                  "softmax(log p / T)).", ""]
    for role, specs in j.get("inputs", {}).items():
        lines.append(f"- {role} inputs: " + "; ".join(
            f"{s['name']} {'x'.join(str(d) for d in s['shape'])} {s['dtype']} in "
            f"[{_scalar(s['range'][0])}, {_scalar(s['range'][1])}]" if "range" in s
            else f"{s['name']} {s['shape']}" for s in specs))
    lines.append("")
    lines += ["## Training data", ""]
    for src in j.get("training_data", []):
        lines.append(f"- **{src.get('name', 'unnamed')}**")
        for key in ("description", "licence", "citation"):
            if src.get(key):
                lines.append(f"  - {key.capitalize()}: {src[key]}")
        extra = {k: v for k, v in src.items() if k not in ("name", "description", "licence", "citation")}
        lines += ["  " + b for b in _bullets(extra)]
    lines += ["", "## Evaluation", ""]
    evaluation = j.get("evaluation", {})
    data = evaluation.get("data")
    if isinstance(data, Mapping):
        lines += ["Measured on:", ""] + _bullets(data) + [""]
    elif data:
        lines += [f"Measured on: {data}", ""]
    for key, v in evaluation.items():
        if key == "data":
            continue
        if _is_report(v):
            lines += _report_section(key, v)
        elif isinstance(v, Mapping) and v and all(_is_report(x) for x in v.values()):
            lines += [f"### {key}", "", compare_table(v).rstrip(), ""]
            methods = dict.fromkeys(rep["method"] for rep in v.values() if rep.get("method"))
            lines += [f"How obtained: {m}" for m in methods] + ([""] if methods else [])
        elif isinstance(v, Mapping):
            lines += [f"### {key}", ""] + _bullets(v) + [""]
        else:
            lines += [f"- {key}: {_scalar(v)}", ""]
    lines += ["## Limits", ""]
    if (j.get("pipeline") or {}).get("bilateral"):
        alone = ("No comparison with prior examinations or the other view of the same breast, and "
                 "no clinical information; the only comparison is with the other breast's film of "
                 "the same view, when it is at hand.")
    else:
        alone = ("Each image is analysed on its own: no comparison with prior examinations, the "
                 "other view or the other breast, and no clinical information.")
    limits = (*_GENERIC_LIMITS[:2], alone, *_GENERIC_LIMITS[2:], *j.get("limitations", []))
    lines += [f"- {text}" for text in limits]
    lines += ["", "## Provenance", ""]
    if j.get("created"):
        lines.append(f"- Created: {j['created']}")
    for name, version in j.get("frameworks", {}).items():
        lines.append(f"- {name} {version}")
    for name, f in j.get("files", {}).items():
        lines.append(f"- {name}: sha256 {f['sha256']}, {f['bytes']} bytes")
    if j.get("changelog"):
        lines += ["", "## Changelog", ""]
        log_ = j["changelog"]
        if isinstance(log_, Mapping):
            lines += _bullets(log_)
        elif isinstance(log_, list | tuple):
            lines += [f"- {_scalar(x) if not isinstance(x, Mapping) else ', '.join(f'{k}: {v}' for k, v in x.items())}"
                      for x in log_]
        else:
            lines.append(str(log_))
    return "\n".join(lines).rstrip() + "\n"
