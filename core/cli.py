"""The ``mammolab`` command.

    mammolab [PATH] [--model DIR] [--screenshot OUT.png]    the desktop app (default)
    mammolab classify PATH... --csv OUT [--model DIR] [--masks DIR] [--no-pair] [--pairs OUT]
    mammolab train ... | evaluate ... | export ...          (need the training extras)

The GUI and the training commands are imported only when asked for, so ``classify`` never loads
Qt or TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from core import __version__

SUBCOMMANDS = ("classify", "train", "evaluate", "export")
TRAINING_COMMANDS = ("train", "evaluate", "export")


def _gui_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mammolab",
        description="MammoLab: a mammography AI workstation for teaching and research. "
        "Not a medical device. Subcommands: " + ", ".join(SUBCOMMANDS) + " (mammolab CMD -h).",
    )
    p.add_argument("paths", nargs="*", help="image or folder to open")
    p.add_argument("--model", metavar="DIR", help="model bundle folder (default: the bundled model)")
    p.add_argument("--screenshot", metavar="OUT.png",
                   help="open PATH, wait for the analysis, save a grab of the window and exit")
    p.add_argument("--version", action="version", version=f"MammoLab {__version__}")
    return p


def _classify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mammolab classify",
        description="Classify images and folders (recursively) into a CSV. "
        "Exit 0: all files succeeded; 1: some failed; 2: usage or model error.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    p.add_argument("--csv", required=True, metavar="OUT", help="CSV file to write")
    p.add_argument("--model", metavar="DIR", help="model bundle folder (default: the bundled model)")
    p.add_argument("--masks", metavar="DIR", help="also write each lesion mask as a PNG here")
    p.add_argument("--no-pair", action="store_true",
                   help="read every film alone (default: a film whose other breast, same view, is "
                        "among the files is read beside it, when the model can)")
    p.add_argument("--pairs", metavar="OUT",
                   help="also write, per classified film, the other breast it was read beside and "
                        "its film-alone probabilities (CSV)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p


def _classify(argv: list[str]) -> int:
    args = _classify_parser().parse_args(argv)
    from core.batch import classify_files, find_images, write_csv, write_pairs_csv
    from core.inference import Analyzer, BundleError

    out = Path(args.csv)
    if out.is_dir():
        print(f"mammolab classify: --csv {out} is a folder; give a file name", file=sys.stderr)
        return 2
    if not out.parent.exists():
        print(f"mammolab classify: the folder of --csv {out} does not exist", file=sys.stderr)
        return 2
    pairs_out = Path(args.pairs) if args.pairs else None
    if pairs_out is not None and (pairs_out.is_dir() or not pairs_out.parent.exists()
                                  or pairs_out.resolve() == out.resolve()):
        print(f"mammolab classify: --pairs {pairs_out} must be a file name in an existing folder, "
              "other than the --csv file", file=sys.stderr)
        return 2
    if args.masks and Path(args.masks).exists() and not Path(args.masks).is_dir():
        print(f"mammolab classify: --masks {args.masks} is a file; give a folder", file=sys.stderr)
        return 2
    try:
        analyzer = Analyzer.from_bundle(args.model)
    except BundleError as exc:
        print(f"mammolab classify: {exc}", file=sys.stderr)
        return 2
    files, skipped = find_images(args.paths)
    if not files:
        print("mammolab classify: no image files found in the given paths", file=sys.stderr)
        return 2
    inputs = {f.resolve() for f in files}
    outputs = {"--csv": out.resolve(), **({"--pairs": pairs_out.resolve()} if pairs_out else {})}
    for flag, path in outputs.items():
        if path in inputs:
            print(f"mammolab classify: {flag} {path} is one of the images to classify; "
                  "give another file name", file=sys.stderr)
            return 2
    rows = []
    gen = classify_files(analyzer, files, args.masks, skipped, pair=not args.no_pair)
    # On a terminal the progress line rewrites itself; into a log or a pipe it is one line a file,
    # with the error of a file that failed, since carriage returns there make one long line.
    live = sys.stderr is not None and sys.stderr.isatty()
    try:
        for row in gen:
            rows.append(row)
            if args.quiet:
                continue
            if live:
                eta = row.elapsed_s / row.index * (row.total - row.index)
                print(f"\r[{row.index}/{row.total}] {row.status:5s} eta {eta:5.0f}s  {row.path.name[:40]:40s}",
                      end="", file=sys.stderr, flush=True)
            else:
                detail = f": {row.reason}" if row.status != "ok" else ""
                print(f"[{row.index}/{row.total}] {row.status:5s} {row.path}{detail}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\nmammolab classify: interrupted; writing the rows done so far", file=sys.stderr)
    write_csv(rows, out)
    if pairs_out is not None:
        write_pairs_csv(rows, pairs_out)
    failed = sum(r.status != "ok" for r in rows)
    if live and not args.quiet:
        print(file=sys.stderr)
    paired = sum(r.other_breast is not None for r in rows)
    pairing = f", {paired} read beside the other breast" if analyzer.reads_pairs and not args.no_pair else ""
    print(f"{len(rows)} classified ({len(rows) - failed} ok, {failed} failed{pairing}), "
          f"{skipped} other files skipped; CSV: {out}", file=sys.stderr)
    return 1 if failed else 0


def _training(cmd: str, argv: list[str]) -> int:
    try:
        from models import cli as models_cli
    except ImportError as exc:
        print(f"mammolab {cmd}: needs the training extras ({exc}); "
              "install them with: pip install 'mammolab[train]'", file=sys.stderr)
        return 2
    return models_cli.main(cmd, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("MAMMOLAB_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # pydicom reports damage it reads past twice, as a Python warning and as a log line. A
        # file that cannot be read gets MammoLab's own message (its CSV row, the app's error
        # box), so pydicom's notes show only with MAMMOLAB_LOG=DEBUG.
        import pydicom  # noqa: F401  (its import sets its logger's level; set it after)

        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
        if cmd == "classify":
            return _classify(rest)
        return _training(cmd, rest)
    args = _gui_parser().parse_args(argv)
    if len(args.paths) > 1:
        print("mammolab: give one image or folder to open (for many, use 'mammolab classify')",
              file=sys.stderr)
        return 2
    try:
        from desktop.app import run_gui
    except ImportError as exc:
        print(f"mammolab: the desktop app cannot start ({exc})", file=sys.stderr)
        return 2
    return run_gui(args.paths, args.model, args.screenshot)


if __name__ == "__main__":
    sys.exit(main())
