"""Synthetic-anomaly generators.

``CVAEGenerator`` is a conditional VAE fitted on normal windows plus the k real anomalies.
Its condition is one-hot over the anomaly classes, with an all-zero row for the normal
class, so the decoder learns the shared beat shape from the many normals and the class
offsets from the few anomalies. Sampling draws z from the prior N(0, I) for a chosen anomaly
class and z-normalises each generated window with the same code as real windows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from anomalyforge.errors import InvalidInputError
from anomalyforge.signal import znormalize
from anomalyforge.training.fitting import EpochLogger, seed_everything
from anomalyforge.training.models import CVAE, CVAEDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CVAEConfig:
    latent_dim: int = 16
    channels: int = 32
    epochs: int = 150
    batch_size: int = 64
    learning_rate: float = 2e-3
    # Weight of the KL term against the summed squared reconstruction error of a window.
    beta: float = 1.0
    # Each batch holds this fraction of anomalies (drawn with replacement from the k real ones),
    # so the few anomalies shape the decoder instead of being swamped by normals.
    anomaly_fraction: float = 0.25


def negative_elbo(reconstruction: torch.Tensor, target: torch.Tensor, mean: torch.Tensor,
                  log_variance: torch.Tensor, beta: float) -> torch.Tensor:
    """Return the batch mean of summed squared error plus ``beta`` times KL(q(z|x) || N(0, I))."""
    reconstruction_loss = (reconstruction - target).pow(2).sum(dim=1).mean()
    kl = -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).sum(dim=1).mean()
    return reconstruction_loss + beta * kl


def one_hot_conditions(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Return (n, len(classes)) one-hot rows; labels not in ``classes`` (the normal class) get zeros."""
    conditions = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for column, label in enumerate(classes):
        conditions[np.asarray(labels) == label, column] = 1.0
    return conditions


def spread_over_classes(n_samples: int, fitted_classes: list[int], classes: list[int] | None = None) -> np.ndarray:
    """Return ``n_samples`` labels cycling through ``classes`` (default: ``fitted_classes``).

    Shared by every generator's ``class_schedule``. Raises InvalidInputError for a class the
    generator was not fitted on.
    """
    classes = fitted_classes if classes is None else [int(label) for label in classes]
    unknown = sorted(set(classes) - set(fitted_classes))
    if unknown:
        raise InvalidInputError(f"classes {unknown} were not fitted; the generator knows {fitted_classes}")
    return np.array([classes[i % len(classes)] for i in range(n_samples)], dtype=np.int64)


class CVAEGenerator:
    """Conditional VAE generator of synthetic anomalies for 1-D windows.

    Attributes set by :meth:`fit`: ``classes_`` (anomaly class labels, one condition column
    each), ``model_`` (the trained :class:`CVAE`), ``length_``.
    """

    def __init__(self, config: CVAEConfig = CVAEConfig()):
        self.config = config

    def fit(self, normals: np.ndarray, anomalies: np.ndarray, anomaly_classes: np.ndarray,
            seed: int = 0) -> "CVAEGenerator":
        config = self.config
        generator = seed_everything(seed)
        self.classes_ = sorted(int(label) for label in np.unique(anomaly_classes))
        self.length_ = normals.shape[1]

        normal_data = torch.as_tensor(np.asarray(normals, dtype=np.float32))
        anomaly_data = torch.as_tensor(np.asarray(anomalies, dtype=np.float32))
        anomaly_conditions = torch.as_tensor(one_hot_conditions(anomaly_classes, self.classes_))
        n_anomalies_per_batch = max(1, int(round(config.batch_size * config.anomaly_fraction)))
        n_normals_per_batch = config.batch_size - n_anomalies_per_batch
        steps_per_epoch = max(1, len(normal_data) // n_normals_per_batch)

        model = CVAE(self.length_, len(self.classes_), config.latent_dim, config.channels)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        progress = EpochLogger("cvae", config.epochs)

        model.train()
        for epoch in range(config.epochs):
            total = 0.0
            order = torch.randperm(len(normal_data), generator=generator)
            for step in range(steps_per_epoch):
                normal_index = order[step * n_normals_per_batch:(step + 1) * n_normals_per_batch]
                anomaly_index = torch.randint(len(anomaly_data), (n_anomalies_per_batch,), generator=generator)
                windows = torch.cat([normal_data[normal_index], anomaly_data[anomaly_index]])
                conditions = torch.cat([
                    torch.zeros(len(normal_index), len(self.classes_)), anomaly_conditions[anomaly_index],
                ])
                reconstruction, mean, log_variance = model(windows, conditions)
                loss = negative_elbo(reconstruction, windows, mean, log_variance, config.beta)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            scheduler.step()
            progress(epoch, total / steps_per_epoch)
        self.model_ = model.eval()
        return self

    @property
    def decoder(self) -> CVAEDecoder:
        """The decoder alone, exportable with inputs (z, condition)."""
        return self.model_.decoder

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def class_schedule(self, n_samples: int, classes: list[int] | None = None) -> np.ndarray:
        """Spread ``n_samples`` as evenly as possible over ``classes`` (default: all fitted classes)."""
        return spread_over_classes(n_samples, self.classes_, classes)

    @torch.no_grad()
    def sample(self, n_samples: int, seed: int = 0, classes: list[int] | None = None):
        """Draw ``n_samples`` synthetic anomalies, returned as (windows (n, length) float32, labels (n,))."""
        labels = self.class_schedule(n_samples, classes)
        rng = np.random.default_rng(seed)
        z = torch.as_tensor(rng.standard_normal((n_samples, self.latent_dim)).astype(np.float32))
        conditions = torch.as_tensor(one_hot_conditions(labels, self.classes_))
        windows = self.decoder(z, conditions).numpy()
        logger.info("cvae: sampled %d synthetic anomalies over classes %s", n_samples, self.classes_)
        return znormalize(windows), labels
