"""Torch modules for 1-D windows: detectors that output one score per window, and the CVAE.

Every detector takes ``window`` of shape (batch, length) and returns ``score`` of shape
(batch,), higher meaning more anomalous, so the exported ONNX graph carries the whole
scoring rule and the device only compares the output with a threshold.

No module uses ``ConvTranspose1d``: PT2E int8 quantization leaves that op in float, so the
decoders upsample by nearest-neighbour interpolation followed by a ``Conv1d``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
        nn.ReLU(),
    )


def upsample_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Double the length: nearest-neighbour upsampling, then a convolution."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.ReLU(),
    )


class ConvEncoder(nn.Module):
    """Map (batch, length) windows to (batch, features) through two stride-2 convolutions."""

    def __init__(self, length: int, channels: int = 32):
        super().__init__()
        if length % 4 != 0:
            raise ValueError(f"window length must be divisible by 4, got {length}")
        self.body = nn.Sequential(
            conv_block(1, channels // 2, 7),
            conv_block(channels // 2, channels, 5, stride=2),
            conv_block(channels, channels, 5, stride=2),
        )
        self.n_features = channels * (length // 4)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.body(window.unsqueeze(1)).flatten(1)


class ConvDecoder(nn.Module):
    """Map (batch, code) vectors back to (batch, length) windows without transposed convolutions."""

    def __init__(self, length: int, code_size: int, channels: int = 32):
        super().__init__()
        self.channels = channels
        self.short_length = length // 4
        self.project = nn.Linear(code_size, channels * self.short_length)
        self.body = nn.Sequential(
            upsample_block(channels, channels, 5),
            upsample_block(channels, channels // 2, 5),
            nn.Conv1d(channels // 2, 1, 7, padding=3),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.project(code)).view(-1, self.channels, self.short_length)
        return self.body(hidden).squeeze(1)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder whose forward pass returns the mean squared reconstruction error."""

    def __init__(self, length: int, latent_dim: int = 16, channels: int = 32):
        super().__init__()
        self.encoder = ConvEncoder(length, channels)
        self.bottleneck = nn.Linear(self.encoder.n_features, latent_dim)
        self.decoder = ConvDecoder(length, latent_dim, channels)

    def reconstruct(self, window: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(window)))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return (window - self.reconstruct(window)).pow(2).mean(dim=1)


class ConvClassifier(nn.Module):
    """1-D CNN that returns the anomaly logit of each window (sigmoid gives the probability)."""

    def __init__(self, length: int, channels: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(1, channels // 2, 7),
            nn.MaxPool1d(2),
            conv_block(channels // 2, channels, 5),
            nn.MaxPool1d(2),
            conv_block(channels, channels, 5),
        )
        self.head = nn.Linear(channels * 2, 1)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        hidden = self.features(window.unsqueeze(1))
        pooled = torch.cat([hidden.mean(dim=2), hidden.amax(dim=2)], dim=1)
        return self.head(pooled).squeeze(1)


class PCAReconstruction(nn.Module):
    """Squared reconstruction error after projection onto principal components fitted in numpy.

    Wrapped as a module only so that the baseline exports to ONNX like the other detectors.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("components", torch.as_tensor(components, dtype=torch.float32))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        centred = window - self.mean
        projected = (centred @ self.components.T) @ self.components
        return (centred - projected).pow(2).mean(dim=1)


class CVAEDecoder(nn.Module):
    """Decoder of the conditional VAE: (z, condition) -> window.

    ``condition`` is one-hot over the anomaly classes; an all-zero row means the normal class.
    """

    def __init__(self, length: int, latent_dim: int, n_classes: int, channels: int = 32):
        super().__init__()
        self.net = ConvDecoder(length, latent_dim + n_classes, channels)

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, condition], dim=1))


class CVAE(nn.Module):
    """Conditional VAE with a convolutional encoder and a transposed-convolution-free decoder."""

    def __init__(self, length: int, n_classes: int, latent_dim: int = 16, channels: int = 32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(length, channels)
        self.posterior = nn.Linear(self.encoder.n_features + n_classes, 2 * latent_dim)
        self.decoder = CVAEDecoder(length, latent_dim, n_classes, channels)

    def encode(self, window: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.cat([self.encoder(window), condition], dim=1)
        mean, log_variance = self.posterior(features).chunk(2, dim=1)
        return mean, log_variance.clamp(-10.0, 10.0)

    def forward(self, window: torch.Tensor, condition: torch.Tensor):
        mean, log_variance = self.encode(window, condition)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance)
        return self.decoder(z, condition), mean, log_variance
