"""Shared training utilities: seeding, batching and scoring for the torch modules."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch, and return a torch generator for batch shuffling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def iterate_batches(n_items: int, batch_size: int, generator: torch.Generator):
    """Yield index tensors of shuffled mini-batches covering ``n_items`` once."""
    order = torch.randperm(n_items, generator=generator)
    for start in range(0, n_items, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def score_windows(module: torch.nn.Module, windows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Run a scoring module on (n, length) float32 windows and return (n,) float64 scores."""
    module.eval()
    tensor = torch.as_tensor(np.asarray(windows, dtype=np.float32))
    scores = [module(tensor[start:start + batch_size]) for start in range(0, len(tensor), batch_size)]
    return torch.cat(scores).double().numpy()


class EpochLogger:
    """Log training progress about ten times per fit, plus the last epoch."""

    def __init__(self, name: str, epochs: int):
        self.name = name
        self.epochs = epochs
        self.every = max(1, epochs // 10)

    def __call__(self, epoch: int, loss: float) -> None:
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs:
            logger.info("%s: epoch %d/%d, loss %.5f", self.name, epoch + 1, self.epochs, loss)


def train_minibatches(model: torch.nn.Module, batch_loss, n_items: int, epochs: int, batch_size: int,
                      learning_rate: float, generator: torch.Generator, name: str) -> torch.nn.Module:
    """Train with Adam and a cosine learning-rate schedule over shuffled mini-batches.

    ``batch_loss(index)`` returns the mean loss of the items at ``index`` (a tensor of row
    indices). Returns the model in eval mode.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    progress = EpochLogger(name, epochs)

    model.train()
    for epoch in range(epochs):
        total = 0.0
        for index in iterate_batches(n_items, batch_size, generator):
            loss = batch_loss(index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        scheduler.step()
        progress(epoch, total / n_items)
    return model.eval()
