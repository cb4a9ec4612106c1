"""Decision thresholds with a stated false-positive guarantee (numpy and the standard library only).

The empirical 99th percentile of a few dozen normal scores is too coarse to hit a 1 %
false-positive rate: with n scores it can only move in steps of 1/n. This module uses the
conformal order-statistic rule instead. With n normal calibration scores, exchangeable with
the normal scores seen later, the threshold is the r-th smallest score with
r = ceil((n + 1) * (1 - alpha)). A new normal window then exceeds it with probability at
most (n + 1 - r) / (n + 1) <= alpha (Vovk et al., "Algorithmic Learning in a Random World",
2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021, sec. 3).

The guarantee is on the expected false-positive rate. The rate realised by one calibration
set is random: it follows Beta(n + 1 - r, r), and :func:`fpr_upper_bound` gives its
one-sided upper confidence bound, which is what the manifest and reports show beside the
expected rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from anomalyforge.errors import InvalidInputError


@dataclass(frozen=True)
class Threshold:
    """A calibrated decision threshold: a window is anomalous when its score is above ``value``."""

    value: float
    target_fpr: float
    n_normals: int
    rank: int
    expected_fpr_bound: float
    fpr_upper_95: float
    method: str = "conformal order statistic"
    source: str = "workstation"

    def to_dict(self) -> dict:
        return asdict(self)


def binomial_upper_tail(n: int, p: float, k: int) -> float:
    """Return P(X >= k) for X ~ Binomial(n, p), summed in log space for stability."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    peak = max(log_terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in log_terms))


def fpr_upper_bound(n: int, rank: int, confidence: float = 0.95) -> float:
    """Return the false-positive rate that the rank-th smallest of n normal scores exceeds
    with probability at most ``1 - confidence`` over the draw of the calibration set.

    The realised rate is 1 - F(s_(rank)), and F(s_(rank)) ~ Beta(rank, n + 1 - rank), so
    P(rate > e) = P(Binomial(n, 1 - e) >= rank). Solved for e by bisection.
    """
    if not 1 <= rank <= n:
        raise InvalidInputError(f"rank must lie in [1, {n}], got {rank}")
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if binomial_upper_tail(n, 1.0 - middle, rank) > 1.0 - confidence:
            low = middle
        else:
            high = middle
    return high


def min_normals_for(target_fpr: float) -> int:
    """Return the smallest number of normal scores for which the rule can guarantee target_fpr."""
    return math.ceil(1.0 / target_fpr - 1.0)


def calibrate_threshold(normal_scores, target_fpr: float = 0.01, source: str = "workstation") -> Threshold:
    """Set the threshold for ``target_fpr`` from scores of normal windows.

    Parameters
    ----------
    normal_scores : array_like of shape (n_normals,)
        Scores of normal windows that the detector did not train on (held-out or
        out-of-fold scores). Higher means more anomalous.
    target_fpr : float in (0, 1), default=0.01
        False-positive rate the threshold must not exceed in expectation.
    source : str, default="workstation"
        Where the threshold was set, recorded in the manifest.

    Raises
    ------
    InvalidInputError
        If a score is not finite, or there are fewer than ``ceil(1 / target_fpr - 1)``
        scores, which is too few to guarantee the rate.
    """
    if not 0.0 < target_fpr < 1.0:
        raise InvalidInputError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError(
            f"{int(np.sum(~np.isfinite(scores)))} normal scores are not finite; "
            "check the detector input for NaN or inf"
        )
    n = scores.size
    rank = math.ceil((n + 1) * (1.0 - target_fpr))
    if rank > n:
        raise InvalidInputError(
            f"{n} normal scores cannot guarantee a false-positive rate of {target_fpr}: "
            f"at least {min_normals_for(target_fpr)} are needed; collect more normal windows "
            "or raise the target rate"
        )
    return Threshold(
        value=float(scores[rank - 1]),
        target_fpr=float(target_fpr),
        n_normals=int(n),
        rank=int(rank),
        expected_fpr_bound=(n + 1 - rank) / (n + 1),
        fpr_upper_95=fpr_upper_bound(n, rank, 0.95),
        source=source,
    )


def threshold_at_fpr(normal_scores, fpr: float) -> float:
    """Return the score above which exactly ``floor(fpr * n)`` of the normal scores lie.

    A diagnostic for ranking quality on labelled test data, never a way to set a threshold.
    """
    if not 0.0 <= fpr < 1.0:
        raise InvalidInputError(f"fpr must lie in [0, 1), got {fpr}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    # Rounding first keeps 0.29 * 100 = 28.999999999999996 from losing one score.
    n_allowed = int(math.floor(round(fpr * scores.size, 9)))
    return float(scores[scores.size - n_allowed - 1])
