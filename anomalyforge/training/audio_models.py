"""Detectors, generators and metrics for stacked log-mel vectors of machine sounds.

Every detector maps ``window`` of shape (batch, 640) (5 stacked frames of 128 mel bands)
to ``score`` of shape (batch,), higher meaning more anomalous, and carries the
standardisation of its input as buffers, so the exported ONNX graph needs only the
features of :mod:`anomalyforge.signal`. A clip score is the mean (or max) of its vector
scores.

- :class:`DenseAutoencoder`: the DCASE 2020 Task 2 / MLPerf Tiny anomaly-detection
  baseline, 640-128-128-128-128-8-128-128-128-128-640 with batch normalisation and ReLU;
  score = mean squared reconstruction error.
- :class:`InterpolationNet`: predicts the middle frame from the two frames on each side
  (the "interpolation DNN" idea of Suefusa et al., ICASSP 2020); score = mean squared
  error of the middle frame. A stationary fan hum is easy to interpolate, a rattle or an
  unbalance that changes from frame to frame is not.
- :class:`DenseClassifier`: normals against the k real anomaly clips plus synthetic ones.
- :class:`DenseCVAE`: a fully connected conditional VAE on the 640-value vectors.

:func:`mix_at_snr` is the physically motivated augmentation: a real anomalous recording
mixed into a normal one at a chosen signal-to-noise ratio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from anomalyforge.training.fitting import EpochLogger, score_windows, seed_everything, train_minibatches
from anomalyforge.training.generators import negative_elbo

logger = logging.getLogger(__name__)

N_MELS = 128
N_STACK = 5
N_VALUES = N_MELS * N_STACK
PAUC_MAX_FPR = 0.1
STD_FLOOR = 1e-3


class Standardise(nn.Module):
    """Subtract a per-feature mean and divide by a per-feature standard deviation (fitted in numpy)."""

    def __init__(self, features: np.ndarray):
        super().__init__()
        features = np.asarray(features, dtype=np.float64)
        self.register_buffer("mean", torch.as_tensor(features.mean(axis=0), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.maximum(features.std(axis=0), STD_FLOOR), dtype=torch.float32))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return (window - self.mean) / self.std


def dense_block(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU())


class DenseAutoencoder(nn.Module):
    """DCASE 2020 / MLPerf Tiny fully connected autoencoder; forward returns the reconstruction MSE."""

    def __init__(self, features: np.ndarray, hidden: int = 128, bottleneck: int = 8):
        super().__init__()
        n_values = features.shape[1]
        self.standardise = Standardise(features)
        sizes = [n_values, hidden, hidden, hidden, hidden, bottleneck, hidden, hidden, hidden, hidden]
        self.body = nn.Sequential(
            *[dense_block(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])],
            nn.Linear(hidden, n_values),
        )

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        standardised = self.standardise(window)
        return (standardised - self.body(standardised)).pow(2).mean(dim=1)


class InterpolationNet(nn.Module):
    """Predict the middle frame of a stack from the other frames; forward returns that frame's MSE."""

    def __init__(self, features: np.ndarray, n_mels: int = N_MELS, hidden: int = 128):
        super().__init__()
        n_stack = features.shape[1] // n_mels
        if n_stack < 3 or n_stack % 2 == 0:
            raise ValueError(f"the interpolation model needs an odd number of stacked frames >= 3, got {n_stack}")
        middle = n_stack // 2
        self.standardise = Standardise(features)
        self.middle = slice(middle * n_mels, (middle + 1) * n_mels)
        keep = np.r_[0:middle * n_mels, (middle + 1) * n_mels:n_stack * n_mels]
        self.register_buffer("context", torch.as_tensor(keep, dtype=torch.long))
        self.body = nn.Sequential(
            dense_block(len(keep), hidden), dense_block(hidden, hidden // 2), dense_block(hidden // 2, hidden // 4),
            dense_block(hidden // 4, hidden // 2), dense_block(hidden // 2, hidden), nn.Linear(hidden, n_mels),
        )

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        standardised = self.standardise(window)
        predicted = self.body(standardised.index_select(1, self.context))
        return (standardised[:, self.middle] - predicted).pow(2).mean(dim=1)


class DenseClassifier(nn.Module):
    """Multilayer perceptron returning the anomaly logit of each vector."""

    def __init__(self, features: np.ndarray, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.standardise = Standardise(features)
        self.body = nn.Sequential(
            nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1),
        )

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.body(self.standardise(window)).squeeze(1)


class DenseCVAEDecoder(nn.Module):
    """Decoder (z, condition) -> stacked log-mel vector in the feature scale (dB)."""

    def __init__(self, standardise: Standardise, latent_dim: int, n_classes: int, hidden: int = 256):
        super().__init__()
        n_values = standardise.mean.shape[0]
        self.register_buffer("mean", standardise.mean.clone())
        self.register_buffer("std", standardise.std.clone())
        self.body = nn.Sequential(
            nn.Linear(latent_dim + n_classes, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, hidden), nn.ReLU(),
            nn.Linear(hidden, n_values),
        )

    def standardised(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([z, condition], dim=1))

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.standardised(z, condition) * self.std + self.mean


class DenseCVAE(nn.Module):
    """Fully connected conditional VAE on standardised 640-value vectors."""

    def __init__(self, features: np.ndarray, n_classes: int, latent_dim: int = 8, hidden: int = 256):
        super().__init__()
        self.standardise = Standardise(features)
        self.encoder = nn.Sequential(
            nn.Linear(features.shape[1] + n_classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, 2 * latent_dim),
        )
        self.decoder = DenseCVAEDecoder(self.standardise, latent_dim, n_classes, hidden)

    def forward(self, window: torch.Tensor, condition: torch.Tensor):
        target = self.standardise(window)
        mean, log_variance = self.encoder(torch.cat([target, condition], dim=1)).chunk(2, dim=1)
        log_variance = log_variance.clamp(-10.0, 10.0)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance)
        return target, self.decoder.standardised(z, condition), mean, log_variance


@dataclass(frozen=True)
class DenseTrainingConfig:
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class AudioCVAEConfig:
    latent_dim: int = 8
    epochs: int = 40
    batch_size: int = 256
    learning_rate: float = 1e-3
    beta: float = 1.0
    # Share of each batch drawn (with replacement) from the few real anomaly vectors.
    anomaly_fraction: float = 0.25


def fit_dense_autoencoder(normals: np.ndarray, seed: int = 0,
                          config: DenseTrainingConfig = DenseTrainingConfig()) -> DenseAutoencoder:
    """Train the DCASE baseline autoencoder on normal vectors of shape (n, 640)."""
    generator = seed_everything(seed)
    model = DenseAutoencoder(normals)
    data = torch.as_tensor(np.asarray(normals, dtype=np.float32))
    return train_minibatches(model, lambda index: model(data[index]).mean(), len(data), config.epochs,
                             config.batch_size, config.learning_rate, generator, "dense-autoencoder")


def fit_interpolation(normals: np.ndarray, seed: int = 0,
                      config: DenseTrainingConfig = DenseTrainingConfig()) -> InterpolationNet:
    """Train the middle-frame interpolation model on normal vectors of shape (n, 640)."""
    generator = seed_everything(seed)
    model = InterpolationNet(normals)
    data = torch.as_tensor(np.asarray(normals, dtype=np.float32))
    return train_minibatches(model, lambda index: model(data[index]).mean(), len(data), config.epochs,
                             config.batch_size, config.learning_rate, generator, "interpolation")


def fit_dense_classifier(normals: np.ndarray, anomalies: np.ndarray, synthetic: np.ndarray | None = None,
                         seed: int = 0, config: DenseTrainingConfig = DenseTrainingConfig(),
                         real_anomaly_weight: float = 5.0) -> DenseClassifier:
    """Train the classifier on normals (0) against real and synthetic anomaly vectors (1).

    Normals and anomalies carry equal total weight in the loss; inside the anomaly half a
    real vector weighs ``real_anomaly_weight`` times a synthetic one.
    """
    generator = seed_everything(seed)
    synthetic = np.zeros((0, normals.shape[1]), np.float32) if synthetic is None else synthetic
    vectors = np.concatenate([normals, anomalies, synthetic]).astype(np.float32)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(anomalies) + len(synthetic))]
    anomaly_weights = np.r_[np.full(len(anomalies), real_anomaly_weight), np.ones(len(synthetic))]
    anomaly_weights *= len(normals) / anomaly_weights.sum()
    weights = np.r_[np.ones(len(normals)), anomaly_weights]

    model = DenseClassifier(normals)
    data = torch.as_tensor(vectors)
    targets = torch.as_tensor(labels, dtype=torch.float32)
    sample_weights = torch.as_tensor(weights / weights.mean(), dtype=torch.float32)
    loss_function = nn.BCEWithLogitsLoss(reduction="none")

    def batch_loss(index):
        return (loss_function(model(data[index]), targets[index]) * sample_weights[index]).mean()

    return train_minibatches(model, batch_loss, len(data), config.epochs, config.batch_size,
                             config.learning_rate, generator, "dense-classifier")


def fit_audio_cvae(normals: np.ndarray, anomalies: np.ndarray, seed: int = 0,
                   config: AudioCVAEConfig = AudioCVAEConfig()) -> DenseCVAE:
    """Fit the conditional VAE on normal vectors (condition 0) and real anomaly vectors (condition 1)."""
    generator = seed_everything(seed)
    model = DenseCVAE(normals, n_classes=1, latent_dim=config.latent_dim)
    normal_data = torch.as_tensor(np.asarray(normals, dtype=np.float32))
    anomaly_data = torch.as_tensor(np.asarray(anomalies, dtype=np.float32))
    n_anomalies = max(1, int(round(config.batch_size * config.anomaly_fraction)))
    n_normals = config.batch_size - n_anomalies
    steps = max(1, len(normal_data) // n_normals)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    progress = EpochLogger("audio-cvae", config.epochs)
    model.train()
    for epoch in range(config.epochs):
        total = 0.0
        order = torch.randperm(len(normal_data), generator=generator)
        for step in range(steps):
            normal_index = order[step * n_normals:(step + 1) * n_normals]
            anomaly_index = torch.randint(len(anomaly_data), (n_anomalies,), generator=generator)
            windows = torch.cat([normal_data[normal_index], anomaly_data[anomaly_index]])
            conditions = torch.cat([torch.zeros(len(normal_index), 1), torch.ones(n_anomalies, 1)])
            target, reconstruction, mean, log_variance = model(windows, conditions)
            loss = negative_elbo(reconstruction, target, mean, log_variance, config.beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        progress(epoch, total / steps)
    return model.eval()


@torch.no_grad()
def sample_audio_cvae(model: DenseCVAE, n_samples: int, seed: int = 0) -> np.ndarray:
    """Draw anomalous vectors (condition 1) from the prior; returns (n_samples, 640) float32 in dB."""
    rng = np.random.default_rng(seed)
    latent_dim = model.decoder.body[0].in_features - 1
    z = torch.as_tensor(rng.standard_normal((n_samples, latent_dim)).astype(np.float32))
    return model.decoder(z, torch.ones(n_samples, 1)).numpy()


def mix_at_snr(normal, anomaly, snr_db: float) -> np.ndarray:
    """Add an anomalous recording to a normal one so that anomaly power / normal power = ``snr_db``.

    Both signals are full scale and the shorter one sets the length. The anomaly is the
    "signal" here: a positive SNR makes it louder than the normal background.
    """
    normal = np.asarray(normal, dtype=np.float64)
    anomaly = np.asarray(anomaly, dtype=np.float64)
    length = min(len(normal), len(anomaly))
    normal, anomaly = normal[:length], anomaly[:length]
    normal_power = np.mean(normal ** 2)
    anomaly_power = np.mean(anomaly ** 2)
    if anomaly_power == 0.0:
        return normal.copy()
    scale = np.sqrt(normal_power / anomaly_power * 10.0 ** (snr_db / 10.0))
    return normal + scale * anomaly


def clip_scores(model: nn.Module, clip_features: list[np.ndarray], aggregation: str = "mean") -> np.ndarray:
    """Score each clip: the mean (or max) of its vector scores."""
    reduce = np.max if aggregation == "max" else np.mean
    return np.array([reduce(score_windows(model, features)) for features in clip_features])


def auc_metrics(labels, scores, max_fpr: float = PAUC_MAX_FPR) -> dict:
    """Return ROC-AUC and the standardised partial AUC up to ``max_fpr`` (sklearn's McClish correction).

    This is the pAUC definition of the DCASE 2020 Task 2 evaluation script
    (``roc_auc_score(..., max_fpr=0.1)``).
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return {"roc_auc": None, "pauc": None}
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pauc": float(roc_auc_score(labels, scores, max_fpr=max_fpr)),
    }
