"""core.decision: which class a model calls from its probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from core.decision import check_class_prior, decide

PRIOR = np.array([165, 51, 42]) / 258  # the MIAS training films' class shares


def test_without_a_prior_the_most_probable_class_is_called():
    assert decide(np.array([0.5, 0.3, 0.2])) == 0
    np.testing.assert_array_equal(decide(np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])), [0, 2])


def test_the_balanced_call_weighs_each_class_against_its_share():
    # 0.5 / 0.64 = 0.78 < 0.3 / 0.198 = 1.52 > 0.2 / 0.163 = 1.23: Benign, though Normal is likelier.
    p = np.array([0.5, 0.3, 0.2])
    assert decide(p, PRIOR) == 1
    # Equal shares change nothing; a film clearly normal stays normal.
    assert decide(p, np.full(3, 1 / 3)) == 0
    assert decide(np.array([0.9, 0.06, 0.04]), PRIOR) == 0
    # One prior per row (cross-validation: each fold has its own training films).
    rows = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    priors = np.array([PRIOR, [0.6, 0.3, 0.1]])
    np.testing.assert_array_equal(decide(rows, priors), [1, 2])
    with pytest.raises(ValueError, match="class_prior has 2 classes"):
        decide(p, np.array([0.5, 0.5]))


def test_the_balanced_call_maximises_balanced_accuracy_on_calibrated_probabilities():
    # Films drawn from the prior with probabilities that are exactly the posteriors: the balanced
    # call's mean recall beats the arg-max's, which favours the common class.
    rng = np.random.default_rng(0)
    n = 20000
    y = rng.choice(3, size=n, p=PRIOR)
    means = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x = means[y] + rng.normal(size=(n, 2))
    log_lik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    post = np.exp(log_lik) * PRIOR
    post /= post.sum(axis=1, keepdims=True)

    def balanced_accuracy(pred):
        return np.mean([(pred[y == k] == k).mean() for k in range(3)])

    assert balanced_accuracy(decide(post, PRIOR)) > balanced_accuracy(decide(post)) + 0.05


def test_a_class_prior_is_checked_and_normalised():
    np.testing.assert_allclose(check_class_prior([2, 1, 1], 3), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="one number per class"):
        check_class_prior([1, 1], 3)
    with pytest.raises(ValueError, match="finite numbers > 0"):
        check_class_prior([1, -1, 1], 3)
    with pytest.raises(ValueError, match="list of numbers"):
        check_class_prior({"a": 1}, 3)
