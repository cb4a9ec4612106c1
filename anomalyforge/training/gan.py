"""Conditional Wasserstein GAN with gradient penalty (WGAN-GP) for 1-D windows.

``GANGenerator`` has the interface of :class:`anomalyforge.training.generators.CVAEGenerator`:
``fit(normals, anomalies, anomaly_classes, seed)``, ``sample(n, seed, classes)``,
``decoder`` (exportable with inputs ``(z, condition)``), ``latent_dim`` and ``classes_``.

The generator network is a :class:`anomalyforge.training.models.CVAEDecoder`: a linear
projection, then nearest-neighbour upsampling followed by ``Conv1d`` twice, and no
``ConvTranspose1d`` (int8 quantization leaves that op in float). The condition is one-hot
over the anomaly classes with an all-zero row for normals, as in the CVAE, so the many
normals teach the generator the beat shape and the few anomalies the class offsets.

The critic receives each window with the condition broadcast as extra input channels. It has
no batch normalisation, because the gradient penalty of Gulrajani et al. 2017 ("Improved
Training of Wasserstein GANs") is defined per sample. The generator's raw output is
z-normalised inside training, so the critic compares beats in the space the detectors see.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from anomalyforge.errors import InvalidInputError
from anomalyforge.signal import ZNORM_EPS, znormalize
from anomalyforge.training.fitting import seed_everything
from anomalyforge.training.generators import one_hot_conditions, spread_over_classes
from anomalyforge.training.models import CVAEDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GANConfig:
    latent_dim: int = 16
    channels: int = 32
    critic_channels: int = 16
    # Generator updates; the critic gets ``critic_steps`` updates before each of them. The
    # gradient penalty needs a double backward pass, so one generator step costs about 0.08 s
    # on one CPU thread with these sizes (measured on a shared 2-core AMD EPYC VM).
    generator_steps: int = 400
    critic_steps: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-4
    gradient_penalty_weight: float = 10.0
    # Share of anomalies (drawn with replacement from the k real ones) in each real batch.
    anomaly_fraction: float = 0.5


class Critic(nn.Module):
    """WGAN critic: (window, condition) -> one unbounded realness score per window."""

    def __init__(self, length: int, n_classes: int, channels: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1 + n_classes, channels, 7, stride=2, padding=3),
            nn.LeakyReLU(0.2),
            nn.Conv1d(channels, 2 * channels, 5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
            nn.Conv1d(2 * channels, 2 * channels, 5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
        )
        with torch.no_grad():
            n_features = self.body(torch.zeros(1, 1 + n_classes, length)).numel()
        self.head = nn.Linear(n_features, 1)

    def forward(self, window: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        channels = condition.unsqueeze(2).expand(-1, -1, window.shape[1])
        hidden = self.body(torch.cat([window.unsqueeze(1), channels], dim=1))
        return self.head(hidden.flatten(1)).squeeze(1)


def znormalize_torch(windows: torch.Tensor) -> torch.Tensor:
    """Differentiable per-window z-normalisation with the conventions of :func:`anomalyforge.signal.znormalize`."""
    mean = windows.mean(dim=1, keepdim=True)
    std = windows.std(dim=1, keepdim=True, unbiased=True)
    return (windows - mean) / (std + ZNORM_EPS)


def gradient_penalty(critic: Critic, real: torch.Tensor, fake: torch.Tensor, condition: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """Return mean (||grad critic(x_hat)||_2 - 1)^2 on random interpolates x_hat of real and fake windows."""
    mix = torch.rand(len(real), 1, generator=generator)
    interpolates = (mix * real + (1 - mix) * fake).requires_grad_(True)
    scores = critic(interpolates, condition)
    gradients, = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
    return (gradients.norm(dim=1) - 1).pow(2).mean()


class GANGenerator:
    """Conditional WGAN-GP generator of synthetic anomalies.

    Attributes set by :meth:`fit`: ``classes_`` (anomaly class labels, one condition column
    each), ``generator_`` (the trained :class:`CVAEDecoder`), ``critic_``, ``length_`` and
    ``history_`` (critic Wasserstein estimate, logged about ten times per fit).
    """

    def __init__(self, config: GANConfig = GANConfig()):
        self.config = config

    def fit(self, normals: np.ndarray, anomalies: np.ndarray, anomaly_classes: np.ndarray,
            seed: int = 0) -> "GANGenerator":
        """Train generator and critic on normals (all-zero condition) and the k real anomalies."""
        config = self.config
        if len(anomalies) == 0 or len(anomalies) != len(anomaly_classes):
            raise InvalidInputError(
                f"need k >= 1 anomalies with one class label each, got {len(anomalies)} anomalies and "
                f"{len(anomaly_classes)} labels"
            )
        random = seed_everything(seed)
        self.classes_ = sorted(int(label) for label in np.unique(anomaly_classes))
        self.length_ = normals.shape[1]
        n_classes = len(self.classes_)

        normal_data = torch.as_tensor(np.asarray(normals, dtype=np.float32))
        anomaly_data = torch.as_tensor(np.asarray(anomalies, dtype=np.float32))
        anomaly_conditions = torch.as_tensor(one_hot_conditions(anomaly_classes, self.classes_))
        n_anomalies = max(1, int(round(config.batch_size * config.anomaly_fraction)))
        n_normals = config.batch_size - n_anomalies

        generator_net = CVAEDecoder(self.length_, config.latent_dim, n_classes, config.channels)
        critic = Critic(self.length_, n_classes, config.critic_channels)
        # Adam with beta1 = 0.5, beta2 = 0.9, as WGAN-GP training usually uses.
        generator_optimizer = torch.optim.Adam(generator_net.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))

        def real_batch():
            normal_index = torch.randint(len(normal_data), (n_normals,), generator=random)
            anomaly_index = torch.randint(len(anomaly_data), (n_anomalies,), generator=random)
            windows = torch.cat([normal_data[normal_index], anomaly_data[anomaly_index]])
            conditions = torch.cat([torch.zeros(n_normals, n_classes), anomaly_conditions[anomaly_index]])
            return windows, conditions

        def fake_windows(conditions):
            z = torch.randn(len(conditions), config.latent_dim, generator=random)
            return znormalize_torch(generator_net(z, conditions))

        self.history_ = []
        every = max(1, config.generator_steps // 10)
        started = time.perf_counter()
        generator_net.train()
        critic.train()
        for step in range(config.generator_steps):
            for _ in range(config.critic_steps):
                real, conditions = real_batch()
                with torch.no_grad():
                    fake = fake_windows(conditions)
                wasserstein = critic(real, conditions).mean() - critic(fake, conditions).mean()
                penalty = gradient_penalty(critic, real, fake, conditions, random)
                critic_loss = -wasserstein + config.gradient_penalty_weight * penalty
                critic_optimizer.zero_grad()
                critic_loss.backward()
                critic_optimizer.step()

            _, conditions = real_batch()
            generator_loss = -critic(fake_windows(conditions), conditions).mean()
            generator_optimizer.zero_grad()
            generator_loss.backward()
            generator_optimizer.step()

            if (step + 1) % every == 0 or step + 1 == config.generator_steps:
                elapsed = time.perf_counter() - started
                remaining = elapsed / (step + 1) * (config.generator_steps - step - 1)
                self.history_.append({"step": step + 1, "wasserstein": float(wasserstein.item())})
                logger.info("gan: step %d/%d, critic Wasserstein estimate %.4f, gradient penalty %.4f, "
                            "ETA %.0f s", step + 1, config.generator_steps, wasserstein.item(), penalty.item(),
                            remaining)
        self.generator_ = generator_net.eval()
        self.critic_ = critic.eval()
        return self

    @property
    def decoder(self) -> CVAEDecoder:
        """The generator network alone, exportable with inputs (z, condition).

        Its output is the raw window; z-normalise it per window, as :meth:`sample` does.
        """
        return self.generator_

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
        logger.info("gan: sampled %d synthetic anomalies over classes %s", n_samples, self.classes_)
        return znormalize(windows), labels
