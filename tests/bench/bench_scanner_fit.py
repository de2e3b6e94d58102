"""Speed of a scanner's fine-tuning epoch, fitted whole against above its frozen blocks.

Run with ``make bench`` (needs ../shared/data/mias). On real MIAS training patches
(``PatchSampler``, the shipped configuration), the same patches are fitted ``--repeat`` times
after a warm-up, in turns, on two scanners with the same starting weights:
- whole: ``scanner.fit`` on the patches, the frozen lower Lite0 blocks run forward in Keras at
  every batch (the recipe before ``FrozenSplit``);
- split: the frozen blocks read the patches once through LiteRT, then the top blocks are fitted on
  their readings (``FrozenSplit``, what ``make train`` runs).
Reports the median seconds of each and their ratio, with each fit's loss (close, not equal: the
shuffles and dropout draws of the two differ, and LiteRT's readings differ from Keras's in the
last digits). Not a test: prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--patches", type=int, default=800, help="patches per timed epoch")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()

    import keras
    import numpy as np

    from models.bundle_recipe import (
        FrozenSplit,
        PatchSampler,
        RecipeConfig,
        build_scanner,
        prepare_films,
        tfdata_autotune_off,
    )
    from models.data import load_mias
    from models.efficientnet_lite import LITE0_NUM_BLOCKS, unfreeze_lite0_top

    cfg = RecipeConfig()
    records = load_mias(args.data / "mias")[::4]
    films = prepare_films(records, cfg)
    x, y = PatchSampler(films, np.arange(len(records)), cfg).epoch(np.random.default_rng(0))
    pick = np.random.default_rng(1).permutation(len(x))[: args.patches]
    x, y = x[pick], y[pick]
    print(f"{len(x)} real patches from {len(records)} MIAS films; scanner top {cfg.scan_blocks} blocks trained")

    def scanner():
        keras.utils.set_random_seed(0)
        model = build_scanner(cfg)
        unfreeze_lite0_top(model, cfg.scan_blocks)
        return model

    whole = scanner()
    whole.compile(optimizer=keras.optimizers.Adam(2e-4), loss="sparse_categorical_crossentropy")
    twin = scanner()
    t = time.perf_counter()
    split = FrozenSplit(twin, LITE0_NUM_BLOCKS - cfg.scan_blocks)
    convert = time.perf_counter() - t
    split.top.compile(optimizer=keras.optimizers.Adam(2e-4), loss="sparse_categorical_crossentropy")

    def fit_whole() -> float:
        return whole.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=True).history["loss"][0]

    def fit_split() -> float:
        return split.top.fit(split.features(x), y, batch_size=32, epochs=1, verbose=0,
                             shuffle=True).history["loss"][0]

    times: dict[str, list[float]] = {"whole": [], "split": []}
    losses: dict[str, list[float]] = {"whole": [], "split": []}
    with tfdata_autotune_off():
        for fit in (fit_whole, fit_split):  # warm-up: graph tracing
            fit()
        for _ in range(args.repeat):
            for name, fit in (("whole", fit_whole), ("split", fit_split)):
                t = time.perf_counter()
                losses[name].append(fit())
                times[name].append(time.perf_counter() - t)
    w, s = statistics.median(times["whole"]), statistics.median(times["split"])
    print(f"converting the frozen blocks to LiteRT: {convert:.1f} s (once per fine-tuning phase)")
    print(f"epoch of {len(x)} patches, whole: {w:.1f} s  split: {s:.1f} s  split/whole: {s / w:.2f}")
    print("losses, whole:", " ".join(f"{v:.4f}" for v in losses["whole"]),
          " split:", " ".join(f"{v:.4f}" for v in losses["split"]))


if __name__ == "__main__":
    main()
