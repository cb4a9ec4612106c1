"""Quality metrics of synthetic windows against real ones (numpy and scikit-learn, no torch).

Every function takes ``real`` and ``synthetic`` as arrays of shape (n, length), one window
per row, already z-normalised the way the models see them. Distances are Euclidean in that
raw space (see :data:`FEATURE_SPACE`).

Four groups of metrics:

- fidelity: :func:`discriminative_score`, :func:`mmd_test`, :func:`curve_distances`;
- diversity and coverage: :func:`prdc` (Naeem et al. 2020) and :func:`diversity_summary`;
- utility: :func:`train_synthetic_test_real`;
- memorisation: :func:`memorisation_summary` (distance to closest record).

scikit-learn is imported inside the functions that fit classifiers, so the command-line
parser can import this module on a device install without scikit-learn.
"""

from __future__ import annotations

import logging

import numpy as np

from anomalyforge.errors import InvalidInputError

logger = logging.getLogger(__name__)

FEATURE_SPACE = (
    "raw z-normalised window (one coordinate per sample, Euclidean distance): the beats are "
    "aligned and z-normalised, there is no pretrained feature extractor for ECG beats, and a "
    "projection fitted on normals would drop the directions in which anomalies differ"
)
DISCRIMINATOR_FEATURES = "raw z-normalised window plus log power spectrum (np.fft.rfft), standardised"
NEAREST_K = 5
# Coverage under this value marks mode collapse (Naeem et al. 2020 report coverage near
# 1 - 2**-k for two samples of one distribution, about 0.97 for k = 5).
COLLAPSE_COVERAGE = 0.2
# A synthetic window is a near-duplicate when its nearest other synthetic window is closer than
# this fraction of the median nearest-neighbour distance among the real windows.
DUPLICATE_FRACTION = 0.25
COLLAPSE_DUPLICATE_SHARE = 0.5
# A synthetic window is a near-copy when its distance to the closest real training anomaly
# is under this fraction of the median distance from held-out real anomalies to them.
COPY_FRACTION = 0.2
MEMORISATION_COPY_SHARE = 0.05
HOLDOUT_QUANTILE = 0.05
DISTANCE_CHUNK = 1024


def check_pair(real, synthetic, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return both sets as finite float64 arrays of equal window length.

    Raises
    ------
    InvalidInputError
        When a set is not 2-D, has fewer than ``min_rows`` windows, contains NaN or inf, or
        the window lengths differ.
    """
    arrays = []
    for name, values in (("real", real), ("synthetic", synthetic)):
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 2:
            raise InvalidInputError(
                f"{name} windows must have shape (n_windows, length), got shape {array.shape}"
            )
        if len(array) < min_rows:
            raise InvalidInputError(
                f"{name} has {len(array)} windows but this metric needs at least {min_rows}; "
                "pass more windows or skip the metric for this group"
            )
        if not np.all(np.isfinite(array)):
            raise InvalidInputError(f"{name} windows contain NaN or inf; drop or repair those windows")
        arrays.append(array)
    if arrays[0].shape[1] != arrays[1].shape[1]:
        raise InvalidInputError(
            f"real windows have {arrays[0].shape[1]} samples and synthetic windows "
            f"{arrays[1].shape[1]}; resample both to one window length"
        )
    return arrays[0], arrays[1]


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the (len(a), len(b)) Euclidean distance matrix, computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def nearest_distances(queries: np.ndarray, reference: np.ndarray, k: int = 1,
                      exclude_self: bool = False) -> np.ndarray:
    """Return the distance from each query to its k-th nearest reference window.

    With ``exclude_self`` the queries are the reference itself and each window's zero
    distance to itself is skipped (a duplicate of it still counts as a neighbour at 0).
    Works in chunks of rows so memory stays at ``DISTANCE_CHUNK * len(reference)`` floats.
    """
    rank = k if exclude_self else k - 1
    if rank >= len(reference):
        raise InvalidInputError(
            f"the {k}-th nearest neighbour needs at least {rank + 1} reference windows, got "
            f"{len(reference)}; lower k or pass more windows"
        )
    result = np.empty(len(queries))
    for start in range(0, len(queries), DISTANCE_CHUNK):
        block = pairwise_distances(queries[start:start + DISTANCE_CHUNK], reference)
        result[start:start + DISTANCE_CHUNK] = np.partition(block, rank, axis=1)[:, rank]
    return result


def balanced_subsample(array: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if len(array) <= size:
        return array
    return array[np.sort(rng.choice(len(array), size=size, replace=False))]


# ---------------------------------------------------------------- fidelity


def discriminator_features(windows: np.ndarray) -> np.ndarray:
    """Map (n, length) windows to the fixed features of the post-hoc discriminator.

    The raw samples catch differences in shape, and the log power spectrum catches
    differences in smoothness and noise that no linear function of the raw samples captures.
    """
    windows = np.asarray(windows, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    return np.hstack([windows, np.log(spectrum + 1e-6)])


def standardised_logistic_regression(**options):
    """Return a scikit-learn pipeline: StandardScaler, then LogisticRegression(C=0.1, **options)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, **options))


def discriminative_score(real, synthetic, seed: int = 0, n_folds: int = 5, max_per_set: int = 1000) -> dict:
    """Train a classifier to tell real from synthetic windows and report its held-out accuracy.

    Both sets are cut to the size of the smaller one (at most ``max_per_set``), so chance
    accuracy is 0.5. A standardised logistic regression on :func:`discriminator_features`
    is fitted in stratified ``n_folds``-fold cross-validation, and every window is predicted
    by the model that did not train on it. Identical windows fall into one fold, so the model
    never predicts a window after training on its twin with the other label.

    Returns
    -------
    dict
        ``score`` = |accuracy - 0.5| (0: indistinguishable, 0.5: fully separable),
        ``accuracy`` and ``n_per_set``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    real, synthetic = check_pair(real, synthetic, min_rows=n_folds)
    rng = np.random.default_rng(seed)
    size = min(len(real), len(synthetic), max_per_set)
    real = balanced_subsample(real, size, rng)
    synthetic = balanced_subsample(synthetic, size, rng)
    features = discriminator_features(np.vstack([real, synthetic]))
    labels = np.r_[np.zeros(size), np.ones(size)]

    _, groups = np.unique(np.vstack([real, synthetic]), axis=0, return_inverse=True)

    predictions = np.empty_like(labels)
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for train_index, test_index in folds.split(features, labels, groups.ravel()):
        model = standardised_logistic_regression()
        model.fit(features[train_index], labels[train_index])
        predictions[test_index] = model.predict(features[test_index])
    accuracy = float((predictions == labels).mean())
    return {"score": abs(accuracy - 0.5), "accuracy": accuracy, "n_per_set": int(size)}


def median_bandwidth(pooled: np.ndarray) -> float:
    """Return the median pairwise Euclidean distance of the pooled windows (the median heuristic)."""
    distances = pairwise_distances(pooled, pooled)
    upper = distances[np.triu_indices(len(pooled), k=1)]
    positive = upper[upper > 0]
    return float(np.median(positive)) if len(positive) else 1.0


def mmd_test(real, synthetic, seed: int = 0, n_permutations: int = 200, max_per_set: int = 1000,
             bandwidth: float | None = None) -> dict:
    """Estimate MMD² with an RBF kernel and test it against label permutations.

    Parameters
    ----------
    real, synthetic : ndarray of shape (n, length) and (m, length)
        At least 2 windows each. Sets larger than ``max_per_set`` are subsampled (seeded).
    seed : int, default=0
        Seeds the subsampling and the permutations.
    n_permutations : int, default=200
        Random relabellings of the pooled windows; the p-value cannot go below
        1 / (n_permutations + 1).
    bandwidth : float or None, default=None
        Kernel width sigma in k(x, y) = exp(-|x - y|² / (2 sigma²)). None uses the median
        pairwise distance of the pooled windows.

    Returns
    -------
    dict
        ``mmd2`` (unbiased estimate), ``p_value``, ``bandwidth``, ``n_real``, ``n_synthetic``.
    """
    real, synthetic = check_pair(real, synthetic, min_rows=2)
    if n_permutations < 1:
        raise InvalidInputError(f"n_permutations must be at least 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    real = balanced_subsample(real, max_per_set, rng)
    synthetic = balanced_subsample(synthetic, max_per_set, rng)
    pooled = np.vstack([real, synthetic])
    n, m = len(real), len(synthetic)
    sigma = median_bandwidth(pooled) if bandwidth is None else float(bandwidth)
    kernel = np.exp(-pairwise_distances(pooled, pooled) ** 2 / (2.0 * sigma ** 2))

    # Column j of `membership` marks the windows that relabelling j assigns to the real set;
    # column 0 is the observed labelling. The kernel's diagonal is 1, which the unbiased
    # estimator leaves out of the within-set sums.
    membership = np.zeros((n + m, n_permutations + 1))
    membership[:n, 0] = 1.0
    for column in range(1, n_permutations + 1):
        membership[rng.permutation(n + m)[:n], column] = 1.0
    row_sums = kernel.sum(axis=1)
    total = row_sums.sum()
    within_real = np.einsum("ij,ij->j", membership, kernel @ membership)
    across = membership.T @ row_sums - within_real
    within_synthetic = total - within_real - 2.0 * across
    statistics = ((within_real - n) / (n * (n - 1)) + (within_synthetic - m) / (m * (m - 1))
                  - 2.0 * across / (n * m))
    observed = statistics[0]
    p_value = (1.0 + np.sum(statistics[1:] >= observed)) / (n_permutations + 1.0)
    return {"mmd2": float(observed), "p_value": float(p_value), "bandwidth": sigma,
            "n_real": n, "n_synthetic": m, "n_permutations": n_permutations}


def mean_autocorrelation(windows: np.ndarray) -> np.ndarray:
    """Return the mean over windows of the biased autocorrelation at lags 0 .. length - 1."""
    centred = windows - windows.mean(axis=1, keepdims=True)
    length = windows.shape[1]
    spectrum = np.fft.rfft(centred, n=2 * length, axis=1)
    covariance = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :length]
    variance = covariance[:, :1]
    safe = np.where(variance > 0, variance, 1.0)
    return (covariance / safe).mean(axis=0)


def mean_power_spectrum(windows: np.ndarray) -> np.ndarray:
    """Return the mean power spectrum (np.fft.rfft), scaled to sum to 1."""
    power = (np.abs(np.fft.rfft(windows, axis=1)) ** 2).mean(axis=0)
    return power / power.sum() if power.sum() > 0 else power


def curve_distances(real, synthetic) -> dict:
    """Compare per-time-step statistics, power spectra and autocorrelations of the two sets.

    Returns
    -------
    dict
        ``mean_curve_rmse`` and ``std_curve_rmse``: root mean square difference over time
        steps of the per-step mean and standard deviation (in z-normalised units);
        ``spectrum_l1``: L1 distance of the normalised mean power spectra (0 to 2);
        ``autocorrelation_rmse``: root mean square difference of the mean autocorrelation
        functions over all lags.
    """
    real, synthetic = check_pair(real, synthetic, min_rows=2)
    return {
        "mean_curve_rmse": float(np.sqrt(np.mean((real.mean(axis=0) - synthetic.mean(axis=0)) ** 2))),
        "std_curve_rmse": float(np.sqrt(np.mean((real.std(axis=0) - synthetic.std(axis=0)) ** 2))),
        "spectrum_l1": float(np.abs(mean_power_spectrum(real) - mean_power_spectrum(synthetic)).sum()),
        "autocorrelation_rmse": float(np.sqrt(np.mean(
            (mean_autocorrelation(real) - mean_autocorrelation(synthetic)) ** 2))),
    }


# ---------------------------------------------------------------- diversity and coverage


def prdc(real, synthetic, nearest_k: int = NEAREST_K) -> dict:
    """Compute precision, recall, density and coverage with k-NN manifolds.

    Definitions of Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
    Models" (ICML): each real window gets a ball whose radius is the distance to its
    ``nearest_k``-th nearest other real window, and each synthetic window likewise among
    synthetic windows.

    - precision: share of synthetic windows inside at least one real ball;
    - recall: share of real windows inside at least one synthetic ball;
    - density: mean number of real balls containing a synthetic window, divided by
      ``nearest_k`` (about 1 when both sets come from one distribution, and it can exceed 1);
    - coverage: share of real balls that contain at least one synthetic window.

    Raises
    ------
    InvalidInputError
        When either set has ``nearest_k`` windows or fewer.
    """
    real, synthetic = check_pair(real, synthetic, min_rows=nearest_k + 1)
    real_radii = nearest_distances(real, real, nearest_k, exclude_self=True)
    synthetic_radii = nearest_distances(synthetic, synthetic, nearest_k, exclude_self=True)

    balls_per_synthetic = np.zeros(len(synthetic))
    covered = np.zeros(len(real), dtype=bool)
    recalled = np.zeros(len(real), dtype=bool)
    for start in range(0, len(real), DISTANCE_CHUNK):
        stop = start + DISTANCE_CHUNK
        distances = pairwise_distances(real[start:stop], synthetic)
        inside_real_balls = distances <= real_radii[start:stop, None]
        balls_per_synthetic += inside_real_balls.sum(axis=0)
        covered[start:stop] = distances.min(axis=1) <= real_radii[start:stop]
        recalled[start:stop] = (distances <= synthetic_radii[None, :]).any(axis=1)
    return {
        "precision": float((balls_per_synthetic > 0).mean()),
        "recall": float(recalled.mean()),
        "density": float(balls_per_synthetic.sum() / (nearest_k * len(synthetic))),
        "coverage": float(covered.mean()),
        "nearest_k": nearest_k,
    }


def diversity_summary(real, synthetic, nearest_k: int = NEAREST_K) -> dict:
    """Compute :func:`prdc` plus the share of near-duplicate synthetic windows, and flag mode collapse.

    A synthetic window is a near-duplicate when its nearest other synthetic window lies
    closer than ``DUPLICATE_FRACTION`` times the median nearest-neighbour distance among
    the real windows. ``mode_collapse`` is true when coverage is under
    ``COLLAPSE_COVERAGE`` or more than ``COLLAPSE_DUPLICATE_SHARE`` of the synthetic
    windows are near-duplicates.
    """
    real, synthetic = check_pair(real, synthetic, min_rows=nearest_k + 1)
    result = prdc(real, synthetic, nearest_k)
    real_spacing = float(np.median(nearest_distances(real, real, 1, exclude_self=True)))
    synthetic_spacing = nearest_distances(synthetic, synthetic, 1, exclude_self=True)
    duplicate_radius = DUPLICATE_FRACTION * real_spacing
    duplicate_share = float((synthetic_spacing < duplicate_radius).mean())
    reasons = []
    if result["coverage"] < COLLAPSE_COVERAGE:
        reasons.append(f"coverage {result['coverage']:.3f} < {COLLAPSE_COVERAGE}")
    if duplicate_share > COLLAPSE_DUPLICATE_SHARE:
        reasons.append(f"{duplicate_share:.0%} near-duplicates > {COLLAPSE_DUPLICATE_SHARE:.0%}")
    result.update({
        "real_nn_median": real_spacing,
        "synthetic_nn_median": float(np.median(synthetic_spacing)),
        "duplicate_radius": duplicate_radius,
        "near_duplicate_share": duplicate_share,
        "mode_collapse": bool(reasons),
        "mode_collapse_reasons": reasons,
    })
    return result


# ---------------------------------------------------------------- memorisation


def memorisation_summary(training_anomalies, synthetic, holdout_anomalies) -> dict:
    """Compare distances to the closest training anomaly (DCR) of synthetic and held-out real windows.

    A generator that learned the distribution, not the k examples, puts its samples about as
    far from the training anomalies as new real anomalies are. ``holdout_anomalies`` are
    real anomalies the generator never saw.

    Returns
    -------
    dict
        ``dcr`` (per synthetic window), ``holdout_dcr`` (per held-out window), their medians,
        ``share_below_holdout_p5``: share of synthetic windows closer than the 5th percentile
        of ``holdout_dcr`` (about 0.05 without memorisation), ``copy_radius`` =
        ``COPY_FRACTION`` times the held-out median, ``near_copies`` (count under
        ``copy_radius``), ``nearest_training_index`` (per synthetic window) and
        ``memorisation`` (true when more than ``MEMORISATION_COPY_SHARE`` are near-copies).
    """
    training, synthetic = check_pair(training_anomalies, synthetic)
    _, holdout = check_pair(training, holdout_anomalies)
    synthetic_to_training = np.vstack([
        pairwise_distances(synthetic[start:start + DISTANCE_CHUNK], training)
        for start in range(0, len(synthetic), DISTANCE_CHUNK)
    ])
    dcr = synthetic_to_training.min(axis=1)
    holdout_dcr = nearest_distances(holdout, training, 1)
    holdout_median = float(np.median(holdout_dcr))
    copy_radius = COPY_FRACTION * holdout_median
    near_copies = int((dcr < copy_radius).sum())
    return {
        "dcr": dcr,
        "holdout_dcr": holdout_dcr,
        "nearest_training_index": synthetic_to_training.argmin(axis=1),
        "dcr_median": float(np.median(dcr)),
        "holdout_dcr_median": holdout_median,
        "share_below_holdout_p5": float((dcr < np.quantile(holdout_dcr, HOLDOUT_QUANTILE)).mean()),
        "copy_radius": copy_radius,
        "near_copies": near_copies,
        "near_copy_share": near_copies / len(dcr),
        "memorisation": near_copies / len(dcr) > MEMORISATION_COPY_SHARE,
    }


# ---------------------------------------------------------------- utility


def fit_window_classifier(normals: np.ndarray, anomalies: np.ndarray, seed: int = 0):
    """Fit the utility classifier: standardised, class-balanced logistic regression on
    :func:`discriminator_features`, normals labelled 0 and anomalies 1."""
    features = discriminator_features(np.vstack([normals, anomalies]))
    labels = np.r_[np.zeros(len(normals)), np.ones(len(anomalies))]
    model = standardised_logistic_regression(class_weight="balanced", random_state=seed)
    return model.fit(features, labels)


def evaluate_classifier(model, test_x: np.ndarray, test_y: np.ndarray, normal_class: int) -> dict:
    """Return ROC-AUC on the test windows overall and per anomaly class (that class against all normals)."""
    from sklearn.metrics import roc_auc_score

    scores = model.decision_function(discriminator_features(test_x))
    is_normal = test_y == normal_class
    per_class = {}
    for label in np.unique(test_y[~is_normal]):
        chosen = is_normal | (test_y == label)
        per_class[str(int(label))] = float(roc_auc_score(test_y[chosen] != normal_class, scores[chosen]))
    return {"roc_auc": float(roc_auc_score(~is_normal, scores)), "roc_auc_per_class": per_class}


def train_synthetic_test_real(normals, real_anomalies, synthetic, test_x, test_y, normal_class: int,
                              seed: int = 0) -> dict:
    """Compare held-out ROC-AUC of one classifier trained three ways.

    ``trtr`` trains on normals and the real anomalies, ``tstr`` on normals and the synthetic
    anomalies only, and ``real_and_synthetic`` on normals plus both, the way the demo's
    classifier is trained. All three are tested on the real ``test_x`` / ``test_y``.
    """
    normals, real_anomalies = check_pair(normals, real_anomalies)
    _, synthetic = check_pair(normals, synthetic)
    test_x = np.asarray(test_x, dtype=np.float64)
    test_y = np.asarray(test_y)
    if len(np.unique(test_y == normal_class)) < 2:
        raise InvalidInputError(
            f"the test labels need both normal (class {normal_class}) and anomalous windows for ROC-AUC"
        )
    training_sets = {
        "trtr": real_anomalies,
        "tstr": synthetic,
        "real_and_synthetic": np.vstack([real_anomalies, synthetic]),
    }
    return {
        name: evaluate_classifier(fit_window_classifier(normals, anomalies, seed), test_x, test_y, normal_class)
        for name, anomalies in training_sets.items()
    }
