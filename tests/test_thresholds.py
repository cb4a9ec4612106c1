"""Tests for anomalyforge.thresholds against scipy.stats and a seeded simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from anomalyforge.errors import InvalidInputError
from anomalyforge.thresholds import (
    binomial_upper_tail,
    calibrate_threshold,
    fpr_upper_bound,
    min_normals_for,
    threshold_at_fpr,
)
from anomalyforge.training.datasets import load_ecg5000


@pytest.mark.parametrize(
    "n, p, k",
    [
        (10, 0.3, 3),
        (10, 0.3, 10),
        (100, 0.01, 1),
        (100, 0.01, 5),
        (292, 0.99, 291),
        (292, 0.5, 200),
        (1000, 0.001, 10),
        (1000, 0.999, 1000),
        (2000, 0.2, 450),
    ],
)
def test_binomial_upper_tail_matches_scipy(n, p, k):
    expected = stats.binom.sf(k - 1, n, p)

    assert binomial_upper_tail(n, p, k) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_binomial_upper_tail_edge_cases():
    assert binomial_upper_tail(10, 0.3, 0) == 1.0
    assert binomial_upper_tail(10, 0.3, -2) == 1.0
    assert binomial_upper_tail(10, 0.3, 11) == 0.0
    assert binomial_upper_tail(10, 0.0, 1) == 0.0
    assert binomial_upper_tail(10, 1.0, 10) == 1.0


@pytest.mark.parametrize(
    "n, rank, confidence",
    [(99, 99, 0.95), (292, 291, 0.95), (292, 291, 0.99), (1000, 991, 0.95), (50, 25, 0.9), (10, 1, 0.95)],
)
def test_fpr_upper_bound_matches_beta_ppf(n, rank, confidence):
    # The uniform value of the rank-th smallest of n scores is Beta(rank, n + 1 - rank),
    # so the rate above it is Beta(n + 1 - rank, rank).
    expected = stats.beta.ppf(confidence, n + 1 - rank, rank)

    assert fpr_upper_bound(n, rank, confidence) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("rank", [0, 101])
def test_fpr_upper_bound_rejects_rank(rank):
    with pytest.raises(InvalidInputError, match=rf"rank must lie in \[1, 100\], got {rank}"):
        fpr_upper_bound(100, rank)


@pytest.mark.parametrize("n, target_fpr", [(99, 0.01), (100, 0.01), (292, 0.01), (292, 0.05), (40, 0.1)])
def test_calibrate_threshold_rank_formula(n, target_fpr):
    scores = np.random.default_rng(n).normal(size=n)
    rank = math.ceil((n + 1) * (1 - target_fpr))

    threshold = calibrate_threshold(scores, target_fpr=target_fpr)

    assert threshold.rank == rank
    assert threshold.n_normals == n
    assert threshold.value == np.sort(scores)[rank - 1]
    assert threshold.target_fpr == target_fpr
    assert threshold.expected_fpr_bound == (n + 1 - rank) / (n + 1)
    assert threshold.expected_fpr_bound <= target_fpr
    assert threshold.fpr_upper_95 == fpr_upper_bound(n, rank, 0.95)


def test_calibrate_threshold_on_ecg5000_sample_values():
    # Any finite scores work, so each normal training beat is scored by its maximum sample.
    train, _ = load_ecg5000()
    scores = train.x[train.y == 1].max(axis=1)

    threshold = calibrate_threshold(scores, target_fpr=0.01, source="device")

    assert threshold.n_normals == 292
    assert threshold.rank == 291
    assert threshold.value == float(np.sort(scores.astype(np.float64))[290])
    assert int(np.sum(scores > threshold.value)) <= 2
    assert threshold.source == "device"
    assert threshold.to_dict()["rank"] == 291


def test_calibrate_threshold_min_normals_accepted():
    n = min_normals_for(0.01)
    threshold = calibrate_threshold(np.arange(n, dtype=float), target_fpr=0.01)

    assert n == 99
    assert threshold.rank == 99
    assert threshold.value == 98.0


def test_calibrate_threshold_too_few_normals():
    with pytest.raises(InvalidInputError, match=r"98 normal scores cannot guarantee .* at least 99 are needed"):
        calibrate_threshold(np.arange(98, dtype=float), target_fpr=0.01)


def test_calibrate_threshold_too_few_for_five_percent():
    with pytest.raises(InvalidInputError, match=r"at least 19 are needed"):
        calibrate_threshold(np.arange(18, dtype=float), target_fpr=0.05)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_calibrate_threshold_non_finite(bad_value):
    scores = np.arange(200, dtype=float)
    scores[[3, 50]] = bad_value

    with pytest.raises(InvalidInputError, match=r"2 normal scores are not finite"):
        calibrate_threshold(scores)


@pytest.mark.parametrize("target_fpr", [0.0, 1.0, -0.01, 1.5])
def test_calibrate_threshold_rejects_target(target_fpr):
    with pytest.raises(InvalidInputError, match=r"target_fpr must lie in \(0, 1\)"):
        calibrate_threshold(np.arange(200, dtype=float), target_fpr=target_fpr)


def test_calibrate_threshold_simulated_fpr():
    # 2000 independent calibration sets of 292 standard-normal scores, as many as the
    # ECG5000 training file has normal beats. The realised false-positive rate of each threshold is the
    # normal tail probability above it.
    n_draws, n, target_fpr = 2000, 292, 0.01
    rng = np.random.default_rng(20240611)
    realised = np.empty(n_draws)
    threshold = None
    for draw in range(n_draws):
        threshold = calibrate_threshold(rng.standard_normal(n), target_fpr=target_fpr)
        realised[draw] = stats.norm.sf(threshold.value)

    # The realised rate follows Beta(n + 1 - rank, rank) = Beta(2, 291), with mean 2 / 293
    # and standard deviation about 0.0048. The mean of 2000 draws therefore has a
    # standard error of about 1.1e-4.
    standard_error = realised.std(ddof=1) / math.sqrt(n_draws)
    assert realised.mean() <= target_fpr
    assert abs(realised.mean() - threshold.expected_fpr_bound) < 4 * standard_error

    # The 95 % quantile of the realised rates should sit at fpr_upper_95, and about 5 %
    # of the draws should exceed it (binomial standard error 0.0049).
    assert np.quantile(realised, 0.95) == pytest.approx(threshold.fpr_upper_95, rel=0.1)
    exceed_fraction = float(np.mean(realised > threshold.fpr_upper_95))
    assert abs(exceed_fraction - 0.05) < 0.015


def test_threshold_at_fpr_counts_above():
    scores = np.random.default_rng(7).permutation(np.arange(1000, dtype=float))

    for fpr in (0.0, 0.001, 0.01, 0.05, 0.1, 0.5):
        value = threshold_at_fpr(scores, fpr)
        assert int(np.sum(scores > value)) == math.floor(fpr * 1000)


def test_threshold_at_fpr_values():
    scores = np.arange(100, dtype=float)

    assert threshold_at_fpr(scores, 0.0) == 99.0
    assert threshold_at_fpr(scores, 0.01) == 98.0
    assert threshold_at_fpr(scores, 0.05) == 94.0
    assert threshold_at_fpr(scores, 0.019) == 98.0


def test_threshold_at_fpr_decimal_rate():
    # 0.29 * 100 evaluates to 28.999999999999996 in binary floating point, but 29 of
    # 100 scores are allowed above the threshold at a 29 % rate.
    scores = np.arange(100, dtype=float)

    value = threshold_at_fpr(scores, 0.29)

    assert int(np.sum(scores > value)) == 29


@pytest.mark.parametrize("fpr", [1.0, 1.5, -0.1])
def test_threshold_at_fpr_rejects_rate(fpr):
    # No score has all n scores above it, so a rate of 1 or more has no valid threshold.
    with pytest.raises(InvalidInputError, match=r"fpr must lie in \[0, 1\)"):
        threshold_at_fpr(np.arange(100, dtype=float), fpr)
