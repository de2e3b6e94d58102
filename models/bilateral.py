"""How much comparing a film with the other breast of the same woman adds (a probe; not in the app).

``python -m models.bilateral RUN`` reads a recipe run's out-of-fold predictions and reports the
cancer-vs-rest AUC of each model's P(cancer) as it is, and after subtracting the other breast's
cancer log-odds. Both films of a woman are always in the same fold, so the adjusted score is as
out-of-fold as the original. The pairing is by patient: a patient with exactly two films (MIAS:
the right and left MLO) gives each film the other as its contralateral; anyone else keeps the
unadjusted score. The app classifies one image at a time and does not do this.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models import evaluation as ev

CANCER = 2  # column of P(cancer) in the recipe's predictions


def contralateral(patients: np.ndarray) -> np.ndarray:
    """(N,) index of the other film of the same patient, -1 unless the patient has exactly two."""
    patients = np.asarray(patients)
    out = np.full(len(patients), -1, np.int64)
    for pid in np.unique(patients):
        films = np.flatnonzero(patients == pid)
        if len(films) == 2:
            out[films[0]], out[films[1]] = films[1], films[0]
    return out


def bilateral_score(p_cancer: np.ndarray, other: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """Cancer log-odds minus ``weight`` times the contralateral film's (unpaired films unchanged)."""
    p = np.clip(np.asarray(p_cancer, np.float64), 1e-6, 1 - 1e-6)
    logit = np.log(p / (1 - p))
    paired = other >= 0
    out = logit.copy()
    out[paired] -= weight * logit[other[paired]]
    return out


def _auc_with_interval(positive: np.ndarray, score: np.ndarray, groups: np.ndarray, seed: int,
                       n_boot: int) -> dict[str, Any]:
    point = ev.one_vs_rest_auc(positive, score)
    values = [ev.one_vs_rest_auc(positive[i], score[i])
              for i in ev.bootstrap_samples(len(score), n_boot, seed, groups)]
    kept = np.array([v for v in values if v is not None])
    ci = [float(v) for v in np.percentile(kept, [2.5, 97.5])] if len(kept) else None
    return {"value": point, "ci95": ci}


def report(oof: dict[str, Any], seed: int = 0, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Per model: cancer AUC of P(cancer) alone and with the contralateral subtracted."""
    y = np.asarray(oof["labels"])
    patients = np.asarray(oof["patients"])
    other = contralateral(patients)
    out = {}
    for name in ("lesion_multibranch", "patch_scan", "seed_multibranch"):
        if name not in oof:
            continue
        p = np.asarray(oof[name], np.float64)[:, CANCER]
        out[name] = {
            "single": _auc_with_interval(y == CANCER, p, patients, seed, n_boot),
            "bilateral": _auc_with_interval(y == CANCER, bilateral_score(p, other), patients, seed, n_boot),
            "paired_films": int((other >= 0).sum()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.bilateral", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="run folder of the bundle recipe (oof_predictions.json)")
    args = p.parse_args(argv)
    path = args.run / "oof_predictions.json"
    try:
        oof = json.loads(path.read_text())
        result = report(oof)
    except (OSError, json.JSONDecodeError, KeyError, ValueError, IndexError) as exc:
        print(f"models.bilateral: cannot read {path} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    print("| Model | films paired | cancer AUC, one film | cancer AUC, minus the other breast |")
    print("|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['paired_films']} | {ev.format_figure(r['single'])} | "
              f"{ev.format_figure(r['bilateral'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
