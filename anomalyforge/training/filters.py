"""Validity filter: keep only synthetic anomalies that lie nearer to real anomalies than to normals.

A generated window labelled "anomaly" that is closer to a normal training beat than to every
real anomaly most likely looks normal, so a classifier trained on it learns label noise. The
filter measures Euclidean distances in one fixed feature space, the raw z-normalised beat
(the space of :data:`anomalyforge.training.quality.FEATURE_SPACE`), and

- drops a window whose nearest training normal is closer than its nearest real anomaly
  (the ``closer_to_normal`` count);
- counts, without dropping, windows whose nearest real anomaly has another class than the
  window's label (the ``other_class_nearest`` count), a diagnostic of class mixing.

:func:`sample_valid` draws more candidates than needed from a generator and keeps the
requested number per class, so the classifier still trains on a balanced set after filtering.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from anomalyforge.errors import InvalidInputError
from anomalyforge.training.quality import DISTANCE_CHUNK, pairwise_distances

logger = logging.getLogger(__name__)

FILTER_FEATURE_SPACE = "raw z-normalised beat, Euclidean distance"


@dataclass
class FilterReport:
    """Counts of what the validity filter dropped, overall and per class."""

    n_candidates: int
    closer_to_normal: int
    other_class_nearest: int
    n_kept: int
    n_requested: int
    per_class: dict = field(default_factory=dict)
    feature_space: str = FILTER_FEATURE_SPACE

    @property
    def dropped_share(self) -> float:
        """Share of candidates dropped for lying closer to a normal beat."""
        return self.closer_to_normal / self.n_candidates if self.n_candidates else 0.0

    def to_dict(self) -> dict:
        record = asdict(self)
        record["dropped_share"] = self.dropped_share
        return record


def nearest_with_index(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return each query's distance to its nearest reference row and that row's index."""
    distances = np.empty(len(queries))
    indices = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), DISTANCE_CHUNK):
        block = pairwise_distances(queries[start:start + DISTANCE_CHUNK], reference)
        indices[start:start + DISTANCE_CHUNK] = block.argmin(axis=1)
        distances[start:start + DISTANCE_CHUNK] = block.min(axis=1)
    return distances, indices


def validity_mask(synthetic: np.ndarray, labels: np.ndarray, normals: np.ndarray, anomalies: np.ndarray,
                  anomaly_classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mark synthetic windows that are nearer to a real anomaly than to any training normal.

    Parameters
    ----------
    synthetic : ndarray of shape (n, length)
        Z-normalised synthetic windows.
    labels : ndarray of shape (n,)
        Class of each synthetic window.
    normals : ndarray of shape (n_normals, length)
        Z-normalised training normals.
    anomalies : ndarray of shape (k, length)
        The k real, z-normalised training anomalies.
    anomaly_classes : ndarray of shape (k,)
        Class of each real anomaly.

    Returns
    -------
    valid : ndarray of shape (n,), bool
        False where the nearest training normal is strictly closer than the nearest real anomaly.
    same_class : ndarray of shape (n,), bool
        True where the nearest real anomaly has the window's own class.
    """
    synthetic = np.asarray(synthetic, dtype=np.float64)
    normals = np.asarray(normals, dtype=np.float64)
    anomalies = np.asarray(anomalies, dtype=np.float64)
    if len(anomalies) == 0 or len(normals) == 0:
        raise InvalidInputError(
            f"the validity filter needs at least one normal and one real anomaly, got "
            f"{len(normals)} normals and {len(anomalies)} anomalies"
        )
    if len(synthetic) != len(labels):
        raise InvalidInputError(f"{len(synthetic)} synthetic windows but {len(labels)} labels; pass one label per window")
    to_normal, _ = nearest_with_index(synthetic, normals)
    to_anomaly, nearest_anomaly = nearest_with_index(synthetic, anomalies)
    valid = ~(to_normal < to_anomaly)
    same_class = np.asarray(anomaly_classes)[nearest_anomaly] == np.asarray(labels)
    return valid, same_class


def filter_synthetic(synthetic: np.ndarray, labels: np.ndarray, normals: np.ndarray, anomalies: np.ndarray,
                     anomaly_classes: np.ndarray, n_keep_per_class: dict[int, int] | None = None):
    """Drop invalid synthetic windows and keep at most ``n_keep_per_class[c]`` of class c, in draw order.

    Returns
    -------
    windows : ndarray of shape (n_kept, length), float32
    labels : ndarray of shape (n_kept,)
    report : FilterReport
    """
    labels = np.asarray(labels)
    valid, same_class = validity_mask(synthetic, labels, normals, anomalies, anomaly_classes)
    keep = valid.copy()
    per_class = {}
    for label in np.unique(labels):
        in_class = labels == label
        if n_keep_per_class is not None:
            quota = n_keep_per_class.get(int(label), 0)
            surplus = np.flatnonzero(in_class & valid)[quota:]
            keep[surplus] = False
        per_class[str(int(label))] = {
            "candidates": int(in_class.sum()),
            "closer_to_normal": int((in_class & ~valid).sum()),
            "other_class_nearest": int((in_class & ~same_class).sum()),
            "kept": int((in_class & keep).sum()),
        }
    n_requested = int(sum(n_keep_per_class.values())) if n_keep_per_class is not None else len(labels)
    report = FilterReport(
        n_candidates=len(labels), closer_to_normal=int((~valid).sum()),
        other_class_nearest=int((~same_class).sum()), n_kept=int(keep.sum()), n_requested=n_requested,
        per_class=per_class,
    )
    return np.asarray(synthetic, dtype=np.float32)[keep], labels[keep], report


def sample_valid(generator, n_samples: int, seed: int, normals: np.ndarray, anomalies: np.ndarray,
                 anomaly_classes: np.ndarray, oversample: int = 2):
    """Draw ``oversample * n_samples`` candidates class by class and keep ``n_samples`` valid ones.

    Each class keeps as many windows as ``generator.class_schedule(n_samples)`` gives it. A
    class with too few valid candidates keeps all of them, so the result can be shorter than
    ``n_samples``; the report then shows ``n_kept < n_requested``.
    """
    if oversample < 1:
        raise InvalidInputError(f"oversample must be at least 1, got {oversample}")
    schedule = generator.class_schedule(n_samples)
    requested = {int(label): int(count) for label, count in zip(*np.unique(schedule, return_counts=True))}
    candidates, labels = generator.sample(oversample * n_samples, seed=seed)
    windows, kept_labels, report = filter_synthetic(candidates, labels, normals, anomalies, anomaly_classes,
                                                    n_keep_per_class=requested)
    logger.info("validity filter: %d of %d candidates closer to a normal beat (dropped), %d nearest to "
                "another class, %d kept of %d requested", report.closer_to_normal, report.n_candidates,
                report.other_class_nearest, report.n_kept, n_samples)
    return windows, kept_labels, report
