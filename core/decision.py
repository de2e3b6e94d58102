"""Which class a model calls, from its class probabilities.

A model fitted by maximum likelihood on the training films carries those films' class shares in
its probabilities: on MIAS two films in three are normal, so the largest probability is Normal
for most films that show something, and calling the arg-max rarely says Benign. The bilateral
reading (:mod:`core.pairing`) is such a model; its bundle entry may carry ``class_prior``, the
training films' class shares, and the pair is then called the class whose probability stands
highest against its share, ``argmax_k p_k / prior_k``. With calibrated probabilities that is the
call that maximises balanced accuracy (every class's recall counts the same) rather than
accuracy. The probabilities shown are unchanged.

Measured on the MIAS out-of-fold predictions: for films read beside the other breast this call
raised balanced accuracy 0.490 -> 0.585 (accuracy 0.690 -> 0.647). On the classifier's own
probabilities, which are not calibrated class by class, it lowered it (0.509 -> 0.437), so a film
read alone is called this way only when the bundle reads it through its single-film stage
(``pipeline.single_film``, the same form of logistic model as the pair's, with its own
``class_prior``), and by its arg-max otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RULE_TEXT = ("the class whose probability is largest relative to its share of the training films "
             "(argmax p_k / prior_k)")


def check_class_prior(value: Any, n_classes: int) -> np.ndarray:
    """A bundle's ``class_prior`` as a (C,) array summing to 1; ValueError says what is wrong."""
    try:
        prior = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError("class_prior must be a list of numbers") from None
    if prior.shape != (n_classes,):
        raise ValueError(f"class_prior needs one number per class ({n_classes}), got shape {prior.shape}")
    if not (np.isfinite(prior).all() and (prior > 0).all()):
        raise ValueError("class_prior must hold finite numbers > 0")
    return prior / prior.sum()


def decide(probabilities: np.ndarray, class_prior: np.ndarray | None = None) -> np.ndarray | int:
    """The called class index: arg-max of ``probabilities / class_prior`` (or of the probabilities).

    ``probabilities`` is (C,) or (N, C); ``class_prior`` is (C,), one prior per row (N, C), or
    None. Returns an int for one row, an (N,) int array for several.
    """
    p = np.asarray(probabilities, np.float64)
    if class_prior is not None:
        prior = np.asarray(class_prior, np.float64)
        if prior.shape[-1] != p.shape[-1]:
            raise ValueError(f"class_prior has {prior.shape[-1]} classes, the probabilities "
                             f"{p.shape[-1]}")
        p = p / prior
    out = np.argmax(p, axis=-1)
    return int(out) if p.ndim == 1 else out
