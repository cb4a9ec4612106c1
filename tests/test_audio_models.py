"""Audio detectors, the CVAE, SNR mixing and the clip metrics."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sklearn.metrics import roc_auc_score  # noqa: E402

from anomalyforge.training.audio_models import (  # noqa: E402
    DenseAutoencoder,
    DenseTrainingConfig,
    InterpolationNet,
    auc_metrics,
    clip_scores,
    fit_audio_cvae,
    fit_dense_classifier,
    mix_at_snr,
    sample_audio_cvae,
)


def test_dense_autoencoder_layer_sizes():
    model = DenseAutoencoder(np.zeros((4, 640), np.float32))
    sizes = [layer.out_features for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    assert sizes == [128, 128, 128, 128, 8, 128, 128, 128, 128, 640]


def test_interpolation_predicts_middle_frame():
    model = InterpolationNet(np.random.default_rng(0).standard_normal((8, 640)).astype(np.float32)).eval()
    assert model.context.shape == (512,)
    assert model(torch.zeros(3, 640)).shape == (3,)


def test_mix_at_snr_sets_power_ratio():
    rng = np.random.default_rng(0)
    normal, anomaly = rng.standard_normal(16000), 0.1 * rng.standard_normal(16000)
    mixed = mix_at_snr(normal, anomaly, 6.0)
    added = mixed - normal
    assert 10 * np.log10(np.mean(added ** 2) / np.mean(normal ** 2)) == pytest.approx(6.0)


def test_auc_metrics_match_sklearn():
    labels, scores = np.r_[0, 0, 0, 1, 1], np.r_[0.1, 0.4, 0.35, 0.8, 0.3]
    metrics = auc_metrics(labels, scores)
    assert metrics["roc_auc"] == roc_auc_score(labels, scores)
    assert metrics["pauc"] == roc_auc_score(labels, scores, max_fpr=0.1)
    assert auc_metrics(np.zeros(3), np.ones(3)) == {"roc_auc": None, "pauc": None}


def test_classifier_and_cvae_fit():
    rng = np.random.default_rng(0)
    normals = rng.standard_normal((200, 640)).astype(np.float32)
    anomalies = (rng.standard_normal((20, 640)) + 2.0).astype(np.float32)
    cvae = fit_audio_cvae(normals, anomalies, 0)
    synthetic = sample_audio_cvae(cvae, 50, 0)
    assert synthetic.shape == (50, 640)
    assert np.all(np.isfinite(synthetic))
    model = fit_dense_classifier(normals, anomalies, synthetic, 0, DenseTrainingConfig(epochs=10))
    scores = clip_scores(model, [normals[:50], anomalies], "max")
    assert scores[1] > scores[0]
