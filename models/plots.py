"""Figures for training runs and evaluation reports, written as PNG files.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas directly, never
through ``pyplot``: no global backend is switched and no window can open, so this works on a
headless training machine and in tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from models.evaluation import ECE_BINS, one_vs_rest_auc, reliability_bins

__all__ = [
    "plot_confusion_matrix",
    "plot_learning_curves",
    "plot_reliability",
    "plot_reliability_diagram",
    "plot_roc_curves",
]

DPI = 120


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_learning_curves(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """One panel per metric of a Keras ``History.history`` dict, training and validation together.

    ``val_<name>`` is drawn in the panel of ``<name>``; a learning-rate series (``lr`` or
    ``learning_rate``) gets its own panel on a log scale.
    """
    names = [k for k in history if not k.startswith("val_")]
    names += [k[4:] for k in history if k.startswith("val_") and k[4:] not in history]
    if not names:
        raise ValueError("history holds no series to plot")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = _new_figure(4.0 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        for key, label in ((name, "training"), (f"val_{name}", "validation")):
            if key in history and len(history[key]):
                values = np.asarray(history[key], dtype=np.float64)
                ax.plot(np.arange(1, len(values) + 1), values, marker=".", label=label)
        if name in ("lr", "learning_rate"):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], path: str | Path
) -> Path:
    """Counts with true classes in rows; the shade and the percentage are of the row (recall)."""
    counts = np.asarray(cm, dtype=np.int64)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {counts.shape} does not match {len(classes)} classes")
    row_frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 1.1 * len(classes)
    fig = _new_figure(size + 1.0, size)
    ax = fig.subplots()
    image = ax.imshow(row_frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{counts[i, j]}\n{100 * row_frac[i, j]:.0f} %", ha="center", va="center",
                    color="white" if row_frac[i, j] > 0.5 else "black", fontsize="small")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    return _save(fig, path)


def plot_roc_curves(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path
) -> Path:
    """One-vs-rest ROC curve of each class, its AUC in the legend; classes absent are skipped."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    fig = _new_figure(4.8, 4.5)
    ax = fig.subplots()
    for k, name in enumerate(classes):
        positive = y == k
        auc = one_vs_rest_auc(positive, p[:, k])
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f}, n={int(positive.sum())})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.set_title("ROC, one class against the rest")
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def plot_reliability_diagram(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, path: str | Path, n_bins: int = ECE_BINS
) -> Path:
    """Accuracy against top-label confidence per bin, with the bin counts below.

    Bars under the diagonal mean over-confidence. The bins are those of the ECE in
    :func:`models.evaluation.reliability_bins`.
    """
    b = reliability_bins(y_true, probs, n_bins)
    edges = b["edges"]
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    used = b["count"] > 0
    fig = _new_figure(4.8, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(centres[used], b["accuracy"][used], width=width, edgecolor="black", linewidth=0.5,
            label="accuracy")
    top.plot(b["confidence"][used], b["confidence"][used], "o", color="tab:red", markersize=3,
             label="mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect calibration")
    weights = b["count"][used] / b["count"].sum()
    ece = float(np.sum(weights * np.abs(b["accuracy"][used] - b["confidence"][used])))
    top.set_title(f"Reliability (ECE {ece:.3f}, {n_bins} bins)")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(fontsize="small", loc="upper left")
    bottom.bar(centres, b["count"], width=width, color="grey")
    bottom.set_xlabel("top-label confidence")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return _save(fig, path)


plot_reliability = plot_reliability_diagram  # shorter name used by the training recipe
