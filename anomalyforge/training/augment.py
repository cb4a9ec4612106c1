"""Classic time-series augmentation of the k real anomalies, with the generator interface.

``AugmentGenerator`` has the ``fit`` / ``sample`` interface of
:class:`anomalyforge.training.generators.CVAEGenerator` but learns no model: ``fit`` stores
the real anomalies per class, and ``sample`` derives each synthetic anomaly from one or two
real anomalies of the requested class. It has no decoder, so it cannot be exported to a
bundle or run on the device. It is a sample-only baseline that a learned generator has to beat.

Each sample goes through these steps, each with its own probability:

1. interpolation inside the class (mixup / SMOTE): ``a + lam * (b - a)`` for two real
   anomalies a, b of the same class and ``lam`` uniform in [0, 1];
2. time warp: resampling along a smooth, monotone time axis;
3. window slicing: a random crop of ``slice_fraction`` of the beat, stretched back to full length;
4. shift: a circular shift of a few samples;
5. magnitude warp: multiplication by a smooth random curve around 1;
6. scaling, then jitter: an amplitude factor around 1 and additive Gaussian noise. After
   z-normalisation a scaling alone is an identity, but it changes the level of the jitter
   relative to the beat;
7. z-normalisation of each beat with :func:`anomalyforge.signal.znormalize`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline

from anomalyforge.errors import InvalidInputError
from anomalyforge.signal import znormalize
from anomalyforge.training.generators import spread_over_classes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and strengths of the augmentation steps (all in z-normalised units)."""

    mixup_probability: float = 0.7
    time_warp_probability: float = 0.5
    # Standard deviation of the log-speed at each knot of the time warp.
    time_warp_sigma: float = 0.2
    slice_probability: float = 0.3
    # Fraction of the beat kept by window slicing.
    slice_fraction: float = 0.9
    shift_probability: float = 0.5
    # Maximum circular shift in samples, each direction.
    max_shift: int = 5
    magnitude_warp_probability: float = 0.5
    magnitude_warp_sigma: float = 0.2
    # Interior knots of the smooth curves used by time and magnitude warps.
    n_knots: int = 4
    scaling_sigma: float = 0.1
    jitter_sigma: float = 0.03


def smooth_curve(rng: np.random.Generator, length: int, n_knots: int, sigma: float) -> np.ndarray:
    """Return a cubic spline through ``n_knots + 2`` knots drawn from N(1, sigma**2), sampled at ``length`` points."""
    knot_positions = np.linspace(0.0, length - 1.0, n_knots + 2)
    knot_values = rng.normal(1.0, sigma, size=n_knots + 2)
    return CubicSpline(knot_positions, knot_values)(np.arange(length))


def time_warp(beat: np.ndarray, rng: np.random.Generator, n_knots: int, sigma: float) -> np.ndarray:
    """Resample ``beat`` along a smooth monotone time axis that starts and ends where the beat does."""
    length = len(beat)
    # The clip keeps the speed positive, so the warped time axis is strictly increasing.
    speed = np.clip(smooth_curve(rng, length, n_knots, sigma), 0.2, None)
    warped_time = np.concatenate([[0.0], np.cumsum(speed[1:])])
    warped_time *= (length - 1) / warped_time[-1]
    return np.interp(warped_time, np.arange(length), beat)


def window_slice(beat: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Crop ``fraction`` of the beat at a random start and stretch it back to the full length."""
    length = len(beat)
    kept = max(2, int(round(fraction * length)))
    start = int(rng.integers(0, length - kept + 1))
    positions = np.linspace(start, start + kept - 1, length)
    return np.interp(positions, np.arange(length), beat)


class AugmentGenerator:
    """Sample-only generator: augmented copies of the k real anomalies, class by class.

    Attributes set by :meth:`fit`: ``classes_`` (sorted anomaly labels), ``anomalies_by_class_``
    (label -> float64 array of that class's real anomalies), ``length_``.
    """

    # No decoder exists: the samples come from real anomalies, which are not shipped.
    decoder = None
    latent_dim = None

    def __init__(self, config: AugmentConfig = AugmentConfig()):
        self.config = config

    def fit(self, normals: np.ndarray, anomalies: np.ndarray, anomaly_classes: np.ndarray,
            seed: int = 0) -> "AugmentGenerator":
        """Store the real anomalies per class; ``normals`` and ``seed`` are accepted for the shared interface.

        Raises
        ------
        InvalidInputError
            When ``anomalies`` is empty or its length differs from ``anomaly_classes``.
        """
        anomalies = np.asarray(anomalies, dtype=np.float64)
        anomaly_classes = np.asarray(anomaly_classes)
        if anomalies.ndim != 2 or len(anomalies) == 0:
            raise InvalidInputError(
                f"anomalies must have shape (k, length) with k >= 1, got shape {anomalies.shape}"
            )
        if len(anomalies) != len(anomaly_classes):
            raise InvalidInputError(
                f"{len(anomalies)} anomalies but {len(anomaly_classes)} class labels; pass one label per anomaly"
            )
        self.classes_ = sorted(int(label) for label in np.unique(anomaly_classes))
        self.anomalies_by_class_ = {label: anomalies[anomaly_classes == label] for label in self.classes_}
        self.length_ = anomalies.shape[1]
        return self

    def class_schedule(self, n_samples: int, classes: list[int] | None = None) -> np.ndarray:
        """Spread ``n_samples`` as evenly as possible over ``classes`` (default: all fitted classes)."""
        return spread_over_classes(n_samples, self.classes_, classes)

    def augment_one(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """Return one raw (not yet z-normalised) augmented beat of class ``label``."""
        config = self.config
        pool = self.anomalies_by_class_[label]
        beat = pool[rng.integers(len(pool))].copy()

        if len(pool) > 1 and rng.random() < config.mixup_probability:
            partner = pool[rng.integers(len(pool))]
            beat = beat + rng.random() * (partner - beat)
        if rng.random() < config.time_warp_probability:
            beat = time_warp(beat, rng, config.n_knots, config.time_warp_sigma)
        if rng.random() < config.slice_probability:
            beat = window_slice(beat, rng, config.slice_fraction)
        if rng.random() < config.shift_probability:
            beat = np.roll(beat, int(rng.integers(-config.max_shift, config.max_shift + 1)))
        if rng.random() < config.magnitude_warp_probability:
            beat = beat * smooth_curve(rng, len(beat), config.n_knots, config.magnitude_warp_sigma)

        beat = beat * rng.normal(1.0, config.scaling_sigma)
        return beat + rng.normal(0.0, config.jitter_sigma, size=len(beat))

    def sample(self, n_samples: int, seed: int = 0, classes: list[int] | None = None):
        """Draw ``n_samples`` augmented anomalies, returned as (windows (n, length) float32, labels (n,)).

        The same ``seed`` gives the same windows.
        """
        labels = self.class_schedule(n_samples, classes)
        rng = np.random.default_rng(seed)
        windows = np.empty((n_samples, self.length_))
        for row, label in enumerate(labels):
            windows[row] = self.augment_one(int(label), rng)
        logger.info("augment: sampled %d synthetic anomalies over classes %s", n_samples, sorted(set(labels.tolist())))
        return znormalize(windows), labels
