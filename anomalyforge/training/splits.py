"""Few-shot split: many normals, k real anomalies, and a held-out real test set."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from anomalyforge.errors import InvalidInputError
from anomalyforge.training.datasets import LabelledSeries

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotSplit:
    """Arrays for one few-shot experiment (all float32 windows of shape (n, length)).

    ``normal_train`` and ``normal_val`` come from the training file; ``anomalies`` are the k
    real anomalies with their classes in ``anomaly_classes``; ``test`` is the whole held-out
    file, which no generator or detector sees during fitting.
    """

    normal_train: np.ndarray
    normal_val: np.ndarray
    anomalies: np.ndarray
    anomaly_classes: np.ndarray
    test: LabelledSeries
    normal_class: int
    seed: int

    @property
    def normal_all(self) -> np.ndarray:
        """All training-file normals (train + validation), for out-of-fold calibration."""
        return np.concatenate([self.normal_train, self.normal_val])

    def summary(self) -> dict:
        classes, counts = np.unique(self.anomaly_classes, return_counts=True)
        return {
            "seed": self.seed,
            "normal_train": len(self.normal_train),
            "normal_val": len(self.normal_val),
            "k_anomalies": len(self.anomalies),
            "anomalies_per_class": {int(c): int(n) for c, n in zip(classes, counts)},
            "test": len(self.test),
        }


def allocate_per_class(available: dict[int, int], k: int) -> dict[int, int]:
    """Spread k picks over classes as evenly as their sizes allow (round-robin in label order)."""
    picks = {label: 0 for label in available}
    remaining = k
    while remaining > 0:
        open_classes = [label for label in sorted(available) if picks[label] < available[label]]
        if not open_classes:
            break
        for label in open_classes:
            if remaining == 0:
                break
            picks[label] += 1
            remaining -= 1
    return picks


def few_shot_split(train: LabelledSeries, test: LabelledSeries, k: int = 10, normal_class: int = 1,
                   val_fraction: float = 0.2, seed: int = 0) -> FewShotSplit:
    """Split a labelled training file into normals and k real anomalies; keep ``test`` whole.

    Parameters
    ----------
    train, test : LabelledSeries
        The official training and test files.
    k : int, default=10
        Number of real anomalies to keep, spread evenly over the anomalous classes present
        in ``train``; a class with fewer examples than its share gives its remainder to the others.
    normal_class : int, default=1
        Label of normal windows; every other label is an anomaly.
    val_fraction : float in (0, 1), default=0.2
        Fraction of training normals held out for validation.
    seed : int, default=0
        Seed for the choice of anomalies and the normal train / validation split.
    """
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)

    normal_index = np.flatnonzero(train.y == normal_class)
    if len(normal_index) < 10:
        raise InvalidInputError(
            f"only {len(normal_index)} training series have the normal class {normal_class}; "
            "check --normal-class"
        )
    normal_index = rng.permutation(normal_index)
    n_val = max(1, int(round(val_fraction * len(normal_index))))

    anomaly_labels = sorted(int(label) for label in np.unique(train.y) if label != normal_class)
    available = {label: int(np.sum(train.y == label)) for label in anomaly_labels}
    if sum(available.values()) < k:
        raise InvalidInputError(
            f"k={k} real anomalies requested but the training file has only {sum(available.values())}"
        )
    picks = allocate_per_class(available, k)
    chosen = [
        rng.choice(np.flatnonzero(train.y == label), size=count, replace=False)
        for label, count in picks.items() if count > 0
    ]
    anomaly_index = np.concatenate(chosen)

    split = FewShotSplit(
        normal_train=train.x[normal_index[n_val:]],
        normal_val=train.x[normal_index[:n_val]],
        anomalies=train.x[anomaly_index],
        anomaly_classes=train.y[anomaly_index],
        test=test,
        normal_class=normal_class,
        seed=seed,
    )
    logger.info("few-shot split: %s", split.summary())
    return split
