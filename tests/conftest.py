"""Shared fixtures: a small but real ECG5000 bundle built by the project's own pipeline.

The autoencoder and the CVAE train for a few epochs on the embedded ECG5000 data with the
same code as ``anomalyforge demo``, then ``BundleWriter`` exports them to fp32 and int8
ONNX. Scores are meaningful but far from the demo's quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

DETECTOR_NAME = "autoencoder"
DECODER_NAME = "decoder"
# 0.05 needs at least 19 normals; the fixture calibrates on 58 validation normals.
FIXTURE_TARGET_FPR = 0.05
SEED = 0


def write_small_bundle(bundle_dir: Path) -> dict:
    """Train, export and quantise an autoencoder and a CVAE decoder; return the test arrays."""
    from anomalyforge.export.writer import BundleWriter
    from anomalyforge.signal import preprocessing_spec
    from anomalyforge.thresholds import calibrate_threshold
    from anomalyforge.training.datasets import ecg5000_task, load_ecg5000
    from anomalyforge.training.detectors import AutoencoderConfig, fit_autoencoder
    from anomalyforge.training.experiment import DETECTOR_OUTPUTS, prepare
    from anomalyforge.training.fitting import score_windows
    from anomalyforge.training.generators import CVAEConfig, CVAEGenerator, one_hot_conditions
    from anomalyforge.training.splits import few_shot_split

    train, test = load_ecg5000()
    split = prepare(few_shot_split(train, test, k=10, seed=SEED))
    autoencoder = fit_autoencoder(split.normal_train, SEED, AutoencoderConfig(epochs=8, channels=16))
    generator = CVAEGenerator(CVAEConfig(epochs=8, channels=16, latent_dim=8)).fit(
        split.normal_train, split.anomalies, split.anomaly_classes, SEED)
    threshold = calibrate_threshold(score_windows(autoencoder, split.normal_val), FIXTURE_TARGET_FPR)

    writer = BundleWriter(bundle_dir, ecg5000_task(split.test.x.shape[1]), preprocessing_spec())
    writer.add_detector(DETECTOR_NAME, autoencoder, split.normal_val[:1], threshold.to_dict(),
                        DETECTOR_OUTPUTS[DETECTOR_NAME], split.normal_val)
    rng = np.random.default_rng(SEED)
    labels = generator.class_schedule(64)
    writer.add_decoder(DECODER_NAME, generator.decoder, generator.latent_dim, generator.classes_, {
        "z": rng.standard_normal((64, generator.latent_dim)).astype(np.float32),
        "condition": one_hot_conditions(labels, generator.classes_),
    })
    writer.finish(DETECTOR_NAME)
    return {"test_x": test.x, "test_y": test.y, "normal_val": split.normal_val}


@pytest.fixture(scope="session")
def tiny_bundle_data(tmp_path_factory):
    """The small bundle directory plus the ECG5000 arrays the tests stream through it."""
    import torch

    bundle_dir = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    # One intra-op thread: with two, OpenMP threads contend with onnxruntime and other test
    # processes on a 2-core runner and each training step becomes many times slower.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        arrays = write_small_bundle(bundle_dir)
    finally:
        torch.set_num_threads(previous_threads)
    return {"bundle_dir": bundle_dir, **arrays}


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_data) -> Path:
    """Directory of a real bundle: Conv1d autoencoder detector and CVAE decoder, fp32 and int8.

    Tests that change the bundle must copy it first (see ``bundle_copy``).
    """
    return tiny_bundle_data["bundle_dir"]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the small bundle that a test may modify."""
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target
