"""The few-shot experiment on one split: generator, four detectors, thresholds, evaluation.

Every detector gets its threshold from normal scores it did not train on (see
``detectors.calibration_scores``) and is then evaluated once on the held-out test set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from anomalyforge.signal import znormalize
from anomalyforge.thresholds import Threshold, calibrate_threshold
from anomalyforge.training.detectors import (
    AutoencoderConfig, CalibrationScores, ClassifierConfig, calibration_scores, fit_autoencoder,
    fit_classifier, fit_pca,
)
from anomalyforge.training.evaluation import evaluate_scores
from anomalyforge.training.fitting import score_windows
from anomalyforge.training.generators import CVAEConfig, CVAEGenerator
from anomalyforge.training.splits import FewShotSplit

logger = logging.getLogger(__name__)

DETECTOR_OUTPUTS = {
    "autoencoder": "mean squared reconstruction error of the window (unsupervised, normals only)",
    "classifier_synthetic": "anomaly logit of a CNN trained on normals, k real and synthetic anomalies",
    "classifier_real": "anomaly logit of a CNN trained on normals and k real anomalies only",
    "pca": "mean squared residual after projection onto principal components of normals",
}


@dataclass
class TrainedDetector:
    """A fitted detector with its calibrated threshold and held-out evaluation."""

    name: str
    module: nn.Module
    threshold: Threshold
    calibration: CalibrationScores
    test_scores: np.ndarray
    evaluation: dict
    fit_seconds: float

    def threshold_record(self) -> dict:
        record = self.threshold.to_dict()
        record["calibration_data"] = self.calibration.describe()
        # Torch fp32 scores: the ONNX fp32 files reproduce them within 1e-5, int8 files do not.
        record["precision"] = "fp32"
        return record


@dataclass
class ExperimentConfig:
    n_synthetic: int = 1000
    target_fpr: float = 0.01
    n_folds: int = 5
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cvae: CVAEConfig = field(default_factory=CVAEConfig)


def prepare(split: FewShotSplit) -> FewShotSplit:
    """Apply the shared preprocessing (per-window z-normalisation) to every array of the split."""
    from anomalyforge.training.datasets import LabelledSeries

    return FewShotSplit(
        normal_train=znormalize(split.normal_train),
        normal_val=znormalize(split.normal_val),
        anomalies=znormalize(split.anomalies),
        anomaly_classes=split.anomaly_classes,
        test=LabelledSeries(x=znormalize(split.test.x), y=split.test.y),
        normal_class=split.normal_class,
        seed=split.seed,
    )


def train_detector(name: str, fit, split: FewShotSplit, config: ExperimentConfig, seed: int) -> TrainedDetector:
    """Fit ``fit(normals, seed)`` on the training normals, calibrate its threshold, evaluate on test."""
    started = time.perf_counter()
    logger.info("training %s", name)
    module = fit(split.normal_train, seed)
    calibration = calibration_scores(fit, module, split.normal_train, split.normal_val,
                                     n_folds=config.n_folds, seed=seed)
    threshold = calibrate_threshold(calibration.scores, config.target_fpr)
    test_scores = score_windows(module, split.test.x)
    evaluation = evaluate_scores(test_scores, split.test.y, split.normal_class, threshold.value,
                                 diagnostic_fpr=config.target_fpr)
    seconds = time.perf_counter() - started
    logger.info("%s: test ROC-AUC %.4f, recall %.3f at FPR %.4f (threshold from %d normals), %.1f s",
                name, evaluation["roc_auc"], evaluation["recall"], evaluation["fpr"],
                threshold.n_normals, seconds)
    return TrainedDetector(name, module, threshold, calibration, test_scores, evaluation, seconds)


def train_unsupervised(split: FewShotSplit, config: ExperimentConfig, seed: int) -> dict[str, TrainedDetector]:
    """Train the detectors that need no anomalies for training: the autoencoder and PCA."""
    def fit_ae(normals, fit_seed):
        return fit_autoencoder(normals, fit_seed, config.autoencoder)

    # The component count is chosen once on validation data, then kept for the refits.
    pca = fit_pca(split.normal_train, validation_normals=split.normal_val, validation_anomalies=split.anomalies)
    n_components = pca.components.shape[0]

    def fit_pca_fixed(normals, fit_seed):
        return fit_pca(normals, n_components=n_components)

    return {
        "autoencoder": train_detector("autoencoder", fit_ae, split, config, seed),
        "pca": train_detector("pca", fit_pca_fixed, split, config, seed),
    }


def train_generator(split: FewShotSplit, config: ExperimentConfig, seed: int):
    """Fit the CVAE on training normals and the k real anomalies, then sample synthetic anomalies."""
    started = time.perf_counter()
    generator = CVAEGenerator(config.cvae).fit(split.normal_train, split.anomalies, split.anomaly_classes, seed)
    synthetic, synthetic_classes = generator.sample(config.n_synthetic, seed=seed)
    logger.info("cvae: fitted and sampled in %.1f s", time.perf_counter() - started)
    return generator, synthetic, synthetic_classes


def train_classifiers(split: FewShotSplit, synthetic: np.ndarray, config: ExperimentConfig,
                      seed: int) -> dict[str, TrainedDetector]:
    """Train the classifier with synthetic anomalies and the real-only baseline it must beat."""
    def fit_with_synthetic(normals, fit_seed):
        return fit_classifier(normals, split.anomalies, synthetic, fit_seed, config.classifier,
                              name="classifier_synthetic")

    def fit_real_only(normals, fit_seed):
        return fit_classifier(normals, split.anomalies, None, fit_seed, config.classifier,
                              name="classifier_real")

    return {
        "classifier_synthetic": train_detector("classifier_synthetic", fit_with_synthetic, split, config, seed),
        "classifier_real": train_detector("classifier_real", fit_real_only, split, config, seed),
    }
