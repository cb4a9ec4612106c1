"""Combined detector: autoencoder score plus classifier score, each standardised on normal scores.

The autoencoder scores every departure from the normal beat shape, including anomaly classes
absent from the training anomalies. The classifier is sharper on the classes it trained on. Their raw
scores have unrelated units (a mean squared error and a logit). Each is therefore
standardised with the mean and standard deviation of its scores on normal windows that
neither model trained on (the calibration scores). The combined score is the sum of the two
z-scores.

:class:`CombinedDetector` holds both modules and the four constants, so it exports to ONNX
as one detector with the usual (window) -> (score) signature. :func:`combine_scores` is the
same arithmetic in numpy, for scores that were computed already.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from anomalyforge.errors import InvalidInputError


@dataclass(frozen=True)
class Standardisation:
    """Location and scale that map a detector's normal scores to mean 0 and standard deviation 1."""

    location: float
    scale: float

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - self.location) / self.scale


def fit_standardisation(normal_scores: np.ndarray, name: str = "scores") -> Standardisation:
    """Return the mean and standard deviation (ddof=1) of normal scores.

    Raises
    ------
    InvalidInputError
        With fewer than 2 scores, non-finite scores or a zero standard deviation.
    """
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 2:
        raise InvalidInputError(f"{name}: standardisation needs at least 2 normal scores in a 1-D array, "
                                f"got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError(f"{name}: normal scores contain NaN or inf; check the detector's output")
    scale = float(scores.std(ddof=1))
    if scale <= 0.0:
        raise InvalidInputError(f"{name}: all {len(scores)} normal scores equal {scores[0]}, so they cannot be "
                                "standardised; the detector is constant on normals")
    return Standardisation(location=float(scores.mean()), scale=scale)


def combine_scores(autoencoder_scores: np.ndarray, classifier_scores: np.ndarray,
                   autoencoder_standardisation: Standardisation,
                   classifier_standardisation: Standardisation) -> np.ndarray:
    """Return the sum of the two standardised scores, in float64; the inputs must have equal length."""
    autoencoder_scores = np.asarray(autoencoder_scores, dtype=np.float64)
    classifier_scores = np.asarray(classifier_scores, dtype=np.float64)
    if autoencoder_scores.shape != classifier_scores.shape:
        raise InvalidInputError(f"autoencoder scores have shape {autoencoder_scores.shape} and classifier scores "
                                f"{classifier_scores.shape}; score the same windows with both detectors")
    return autoencoder_standardisation.apply(autoencoder_scores) + classifier_standardisation.apply(classifier_scores)


class CombinedDetector(nn.Module):
    """Detector module whose score is ``(ae - ae_loc) / ae_scale + (clf - clf_loc) / clf_scale``.

    Parameters
    ----------
    autoencoder, classifier : torch.nn.Module
        Detectors mapping (batch, length) windows to (batch,) scores.
    autoencoder_standardisation, classifier_standardisation : Standardisation
        Constants from :func:`fit_standardisation` on each detector's normal scores.
    """

    def __init__(self, autoencoder: nn.Module, classifier: nn.Module,
                 autoencoder_standardisation: Standardisation, classifier_standardisation: Standardisation):
        super().__init__()
        self.autoencoder = autoencoder
        self.classifier = classifier
        constants = [autoencoder_standardisation.location, autoencoder_standardisation.scale,
                     classifier_standardisation.location, classifier_standardisation.scale]
        self.register_buffer("constants", torch.tensor(constants, dtype=torch.float32))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        autoencoder_z = (self.autoencoder(window) - self.constants[0]) / self.constants[1]
        classifier_z = (self.classifier(window) - self.constants[2]) / self.constants[3]
        return autoencoder_z + classifier_z


def build_combined_detector(autoencoder: nn.Module, classifier: nn.Module, autoencoder_normal_scores: np.ndarray,
                            classifier_normal_scores: np.ndarray) -> CombinedDetector:
    """Standardise each detector on its normal scores and wrap both in one :class:`CombinedDetector`."""
    return CombinedDetector(
        autoencoder, classifier,
        fit_standardisation(autoencoder_normal_scores, "autoencoder"),
        fit_standardisation(classifier_normal_scores, "classifier"),
    ).eval()
