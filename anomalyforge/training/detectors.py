"""Detectors: fitting, scoring and out-of-fold calibration scores.

Three detector families, all returned as torch modules that map (batch, length) windows to
(batch,) scores:

- ``fit_autoencoder``: unsupervised, trained on normals only; score = reconstruction error.
- ``fit_classifier``: supervised, normals against anomalies (real, optionally plus
  synthetic); score = anomaly logit.
- ``fit_pca``: principal-component reconstruction error, the baseline every deep model is
  compared with.

``calibration_scores`` produces the normal scores that set a detector's threshold: scores
of validation normals from the deployed model plus out-of-fold scores of the training
normals from k refits, so every calibration score comes from a model that did not train on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from anomalyforge.training.fitting import score_windows, seed_everything, train_minibatches
from anomalyforge.training.models import ConvAutoencoder, ConvClassifier, PCAReconstruction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderConfig:
    latent_dim: int = 16
    channels: int = 32
    epochs: int = 80
    batch_size: int = 32
    learning_rate: float = 2e-3


@dataclass(frozen=True)
class ClassifierConfig:
    channels: int = 32
    epochs: int = 25
    batch_size: int = 64
    learning_rate: float = 2e-3
    # Weight of the real anomalies relative to one synthetic anomaly in the loss.
    real_anomaly_weight: float = 5.0


def fit_autoencoder(normals: np.ndarray, seed: int = 0, config: AutoencoderConfig = AutoencoderConfig(),
                    name: str = "autoencoder") -> ConvAutoencoder:
    """Train the convolutional autoencoder on normal windows of shape (n, length)."""
    generator = seed_everything(seed)
    data = torch.as_tensor(np.asarray(normals, dtype=np.float32))
    model = ConvAutoencoder(data.shape[1], config.latent_dim, config.channels)
    return train_minibatches(model, lambda index: model(data[index]).mean(), len(data), config.epochs,
                             config.batch_size, config.learning_rate, generator, name)


def fit_classifier(normals: np.ndarray, anomalies: np.ndarray, synthetic: np.ndarray | None = None,
                   seed: int = 0, config: ClassifierConfig = ClassifierConfig(),
                   name: str = "classifier") -> ConvClassifier:
    """Train the CNN classifier on normals (label 0) against real and synthetic anomalies (label 1).

    The loss is weighted so that normals and anomalies carry equal total weight; inside the
    anomaly half a real anomaly weighs ``real_anomaly_weight`` times a synthetic one.
    """
    generator = seed_everything(seed)
    synthetic = np.empty((0, normals.shape[1]), np.float32) if synthetic is None else synthetic
    windows = np.concatenate([normals, anomalies, synthetic]).astype(np.float32)
    labels = np.concatenate([np.zeros(len(normals)), np.ones(len(anomalies) + len(synthetic))])
    anomaly_weights = np.concatenate([
        np.full(len(anomalies), config.real_anomaly_weight), np.ones(len(synthetic)),
    ])
    anomaly_weights *= len(normals) / anomaly_weights.sum()
    weights = np.concatenate([np.ones(len(normals)), anomaly_weights])

    data = torch.as_tensor(windows)
    targets = torch.as_tensor(labels, dtype=torch.float32)
    sample_weights = torch.as_tensor(weights / weights.mean(), dtype=torch.float32)
    model = ConvClassifier(data.shape[1], config.channels)
    loss_function = nn.BCEWithLogitsLoss(reduction="none")

    def batch_loss(index):
        return (loss_function(model(data[index]), targets[index]) * sample_weights[index]).mean()

    return train_minibatches(model, batch_loss, len(data), config.epochs, config.batch_size,
                             config.learning_rate, generator, name)


def fit_pca(normals: np.ndarray, n_components: int | None = None, validation_normals: np.ndarray | None = None,
            validation_anomalies: np.ndarray | None = None, max_components: int = 20) -> PCAReconstruction:
    """Fit principal components on normal windows (numpy SVD) and wrap the residual as a module.

    Parameters
    ----------
    normals : ndarray of shape (n_normals, length)
        Training normals.
    n_components : int or None, default=None
        Components to keep. None selects it from 1..max_components by the ROC-AUC of
        ``validation_anomalies`` against ``validation_normals`` (ties go to fewer
        components); both must then be given. The held-out test data play no part.
    """
    data = np.asarray(normals, dtype=np.float64)
    mean = data.mean(axis=0)
    _, _, components = np.linalg.svd(data - mean, full_matrices=False)
    if n_components is None:
        if validation_normals is None or validation_anomalies is None:
            raise ValueError("n_components=None needs validation_normals and validation_anomalies")
        n_components = select_pca_components(mean, components[:max_components], validation_normals,
                                             validation_anomalies)
    return PCAReconstruction(mean, components[:n_components]).eval()


def select_pca_components(mean: np.ndarray, components: np.ndarray, validation_normals: np.ndarray,
                          validation_anomalies: np.ndarray) -> int:
    """Return the component count whose residual best separates the validation anomalies."""
    windows = np.concatenate([validation_normals, validation_anomalies]).astype(np.float64) - mean
    is_anomaly = np.r_[np.zeros(len(validation_normals)), np.ones(len(validation_anomalies))]
    best_count, best_auc = 1, -1.0
    for count in range(1, len(components) + 1):
        basis = components[:count]
        residual = ((windows - windows @ basis.T @ basis) ** 2).mean(axis=1)
        auc = roc_auc_score(is_anomaly, residual)
        if auc > best_auc + 1e-12:
            best_count, best_auc = count, auc
    logger.info("pca: %d components selected (validation ROC-AUC %.4f)", best_count, best_auc)
    return best_count


@dataclass
class CalibrationScores:
    """Normal scores for threshold calibration and where each came from."""

    scores: np.ndarray
    n_validation: int
    n_out_of_fold: int
    n_folds: int
    sources: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.n_validation} validation normals scored by the deployed model and "
                f"{self.n_out_of_fold} training normals scored out of fold ({self.n_folds} refits)")


def calibration_scores(fit: Callable[[np.ndarray, int], nn.Module], deployed: nn.Module,
                       normal_train: np.ndarray, normal_val: np.ndarray, n_folds: int = 5,
                       seed: int = 0) -> CalibrationScores:
    """Collect normal scores that no scoring model trained on.

    ``fit(normals, seed)`` must train a detector the same way ``deployed`` was trained,
    given a subset of the training normals; it is called ``n_folds`` times.
    """
    validation = score_windows(deployed, normal_val)
    out_of_fold = np.empty(len(normal_train))
    folds = np.array_split(np.random.default_rng(seed).permutation(len(normal_train)), n_folds)
    for fold_number, held_out in enumerate(folds):
        kept = np.setdiff1d(np.arange(len(normal_train)), held_out)
        logger.info("out-of-fold refit %d/%d on %d normals", fold_number + 1, n_folds, len(kept))
        model = fit(normal_train[kept], seed + 1000 * (fold_number + 1))
        out_of_fold[held_out] = score_windows(model, normal_train[held_out])
    return CalibrationScores(
        scores=np.concatenate([validation, out_of_fold]),
        n_validation=len(validation), n_out_of_fold=len(out_of_fold), n_folds=n_folds,
    )
