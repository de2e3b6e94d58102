"""The README's tables of the shipped model's figures say what models/bundled/model.json says.

The README is written by hand; these tests catch a bundle whose figures changed without the
README (or a number mistyped in it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CELL = re.compile(r"(\d\.\d{3}) \((\d\.\d{3})–(\d\.\d{3})\)")
COLUMNS = ("accuracy", "balanced_accuracy", "macro_auc", "Normal", "Benign", "Cancer", "ece")


def _figures(report: dict) -> list[str]:
    """The seven table cells of a report, as the README prints them."""
    out = []
    for col in COLUMNS:
        fig = report["per_class"][col]["auc"] if col in ("Normal", "Benign", "Cancer") else report[col]
        lo, hi = fig["ci95"]
        out.append(f"{fig['value']:.3f} ({lo:.3f}–{hi:.3f})")
    return out


def _readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 8 and all(CELL.fullmatch(c) for c in cells[1:]):
            rows[cells[0].replace("*", "")] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return json.loads((ROOT / "models" / "bundled" / "model.json").read_text())["evaluation"]


def _which(label: str, evaluation: dict) -> dict | None:
    """The model.json report a README row shows (None for rows of older bundles)."""
    refs = evaluation["references"]
    main = {"shipped": None, "the same run, film alone, classifier's own probabilities":
            evaluation["classifier_before_temperature"],
            "seed-style whole-image multi-branch": refs["seed-style whole-image multi-branch"],
            "patch scan (top cells of the same verified cell map)":
            refs["patch scan (top cells of the segmenter)"]}
    if label.startswith("shipped"):
        return evaluation["classifier" if "beside the other breast" in label else "classifier_single_film"]
    for prefix, report in main.items():
        if label.startswith(prefix):
            return report
    m = re.fullmatch(r"seed (\d+): (?:\S+ recipe, )?(.+)", label)
    if m:  # a row of an older recipe ("seed 1: 1.6.0 recipe (...), ...") is in no report
        return evaluation["other_fold_splits"].get(f"fold split seed {m.group(1)}: {m.group(2)}")
    return None


def test_every_readme_figure_row_is_the_bundle_own(evaluation):
    rows = _readme_rows()
    checked = 0
    for label, cells in rows.items():
        report = _which(label, evaluation)
        if report is None:
            continue
        assert cells == _figures(report), label
        checked += 1
    # The main table (5 rows) and the two other splits (4 rows each) are all checked.
    assert checked >= 13, sorted(rows)


def test_the_check_would_see_a_changed_figure(evaluation):
    report = json.loads(json.dumps(evaluation["classifier"]))
    report["per_class"]["Cancer"]["auc"]["value"] += 0.001
    rows = _readme_rows()
    shipped = next(cells for label, cells in rows.items() if label.startswith("shipped")
                   and "beside the other breast" in label)
    assert shipped != _figures(report)
