"""Shared fixtures: a tiny but real ECG5000 bundle (detector and decoder, fp32 and int8 ONNX).

The models train for a few seconds on CPU, so scores are meaningful but far from tuned.
The fixture writes the bundle with :mod:`anomalyforge.bundle` helpers alone and does not
depend on the export package.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from anomalyforge import bundle as bundle_lib
from anomalyforge.signal import apply_preprocessing, preprocessing_spec
from anomalyforge.thresholds import calibrate_threshold

logger = logging.getLogger(__name__)

WINDOW_LENGTH = 140
LATENT_DIM = 8
DECODER_CLASSES = [2, 3, 4, 5]
DETECTOR_NAME = "conv_ae"
DECODER_NAME = "cvae_decoder"
# 0.05 needs at least 19 validation normals; ECG5000's 292 training normals leave 58.
FIXTURE_TARGET_FPR = 0.05
TRAIN_SECONDS = 2.5
SEED = 0


def build_models():
    """Define the detector and decoder modules (torch imported here, only for the fixture)."""
    import torch
    from torch import nn

    class ConvAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Conv1d(1, 8, 7, stride=2, padding=3), nn.ReLU(),
                nn.Conv1d(8, 16, 7, stride=2, padding=3), nn.ReLU(),
            )
            self.decoder = nn.Sequential(
                nn.Upsample(scale_factor=2), nn.Conv1d(16, 8, 7, padding=3), nn.ReLU(),
                nn.Upsample(scale_factor=2), nn.Conv1d(8, 1, 7, padding=3),
            )

        def forward(self, window):
            return self.decoder(self.encoder(window.unsqueeze(1))).squeeze(1)

    class ReconstructionScore(nn.Module):
        """Mean squared reconstruction error per window: (batch, 140) -> (batch,)."""

        def __init__(self, autoencoder):
            super().__init__()
            self.autoencoder = autoencoder

        def forward(self, window):
            return ((self.autoencoder(window) - window) ** 2).mean(dim=1)

    class ConditionalDecoder(nn.Module):
        """(z (batch, 8), condition (batch, 4)) -> beat (batch, 140)."""

        def __init__(self):
            super().__init__()
            self.project = nn.Sequential(nn.Linear(LATENT_DIM + len(DECODER_CLASSES), 16 * 35), nn.ReLU())
            self.body = nn.Sequential(
                nn.Upsample(scale_factor=2), nn.Conv1d(16, 8, 7, padding=3), nn.ReLU(),
                nn.Upsample(scale_factor=2), nn.Conv1d(8, 1, 7, padding=3),
            )

        def forward(self, z, condition):
            hidden = self.project(torch.cat([z, condition], dim=1)).view(-1, 16, 35)
            return self.body(hidden).squeeze(1)

    class ConditionalEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv1d(1, 8, 7, stride=2, padding=3), nn.ReLU(),
                nn.Conv1d(8, 8, 7, stride=2, padding=3), nn.ReLU(), nn.Flatten(),
            )
            self.head = nn.Linear(8 * 35 + len(DECODER_CLASSES), 2 * LATENT_DIM)

        def forward(self, beat, condition):
            features = self.body(beat.unsqueeze(1))
            return self.head(torch.cat([features, condition], dim=1)).chunk(2, dim=1)

    return ConvAutoencoder, ReconstructionScore, ConditionalDecoder, ConditionalEncoder


def train_for(seconds, step):
    """Call ``step()`` until ``seconds`` of wall time have passed; return the step count."""
    steps = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        step()
        steps += 1
    return steps


def train_models(normal_train, anomalies, anomaly_classes):
    import torch

    torch.manual_seed(SEED)
    ConvAutoencoder, ReconstructionScore, ConditionalDecoder, ConditionalEncoder = build_models()

    autoencoder = ConvAutoencoder()
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)
    normals = torch.from_numpy(normal_train)

    def autoencoder_step():
        optimiser.zero_grad()
        loss = ((autoencoder(normals) - normals) ** 2).mean()
        loss.backward()
        optimiser.step()

    steps = train_for(TRAIN_SECONDS, autoencoder_step)
    logger.info("autoencoder trained for %d steps", steps)

    encoder, decoder = ConditionalEncoder(), ConditionalDecoder()
    parameters = list(encoder.parameters()) + list(decoder.parameters())
    optimiser_vae = torch.optim.Adam(parameters, lr=3e-3)
    beats = torch.from_numpy(anomalies)
    class_index = np.searchsorted(DECODER_CLASSES, anomaly_classes)
    conditions = torch.nn.functional.one_hot(torch.from_numpy(class_index), len(DECODER_CLASSES)).float()

    def vae_step():
        optimiser_vae.zero_grad()
        mean, log_var = encoder(beats, conditions)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        reconstruction = ((decoder(z, conditions) - beats) ** 2).sum(dim=1).mean()
        kl = (-0.5 * (1 + log_var - mean ** 2 - log_var.exp()).sum(dim=1)).mean()
        (reconstruction + kl).backward()
        optimiser_vae.step()

    steps = train_for(TRAIN_SECONDS, vae_step)
    logger.info("conditional VAE trained for %d steps", steps)
    return ReconstructionScore(autoencoder.eval()), decoder.eval()


def export_onnx(module, args, input_names, output_names, path: Path):
    import torch

    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
    # The TorchScript exporter is deprecated in torch 2.13 but writes a single file in about
    # a second, which keeps this fixture fast; the warning is noise for these tests.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, args, str(path), input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=17, dynamo=False,
        )


def quantize_int8(fp32_path: Path, int8_path: Path, batches: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        """Feeds ``batches`` (dicts of input name -> array) once, then signals the end with None."""

        def __init__(self):
            self.remaining = iter(batches)

        def get_next(self):
            return next(self.remaining, None)

    quantize_static(
        str(fp32_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    )


def tensor(name, shape):
    return {"name": name, "shape": shape, "dtype": "float32"}


def write_tiny_bundle(bundle_dir: Path) -> dict:
    """Train, export and quantise the two models, then write the manifest; return fixture data."""
    import torch

    from anomalyforge.training.datasets import load_ecg5000

    train, test = load_ecg5000()
    rng = np.random.default_rng(SEED)
    normal_index = rng.permutation(np.flatnonzero(train.y == 1))
    n_val = len(normal_index) // 5
    normal_val = train.x[normal_index[:n_val]]
    normal_train = train.x[normal_index[n_val:]]
    anomaly_mask = train.y != 1
    score_module, decoder = train_models(normal_train, train.x[anomaly_mask], train.y[anomaly_mask])

    window_example = torch.from_numpy(normal_val[:4])
    z_example = torch.zeros(4, LATENT_DIM)
    condition_example = torch.eye(len(DECODER_CLASSES))
    files = {
        "detector_fp32": bundle_dir / "conv_ae.fp32.onnx",
        "detector_int8": bundle_dir / "conv_ae.int8.onnx",
        "decoder_fp32": bundle_dir / "decoder.fp32.onnx",
        "decoder_int8": bundle_dir / "decoder.int8.onnx",
    }
    export_onnx(score_module, (window_example,), ["window"], ["score"], files["detector_fp32"])
    export_onnx(decoder, (z_example, condition_example), ["z", "condition"], ["beat"], files["decoder_fp32"])

    spec = preprocessing_spec()
    calibration_windows = apply_preprocessing(spec, normal_train[:128])
    quantize_int8(files["detector_fp32"], files["detector_int8"],
                  [{"window": calibration_windows[i:i + 32]} for i in range(0, 128, 32)])
    z_batches = rng.standard_normal((4, 32, LATENT_DIM)).astype(np.float32)
    decoder_batches = [
        {"z": z, "condition": np.eye(len(DECODER_CLASSES), dtype=np.float32)[np.arange(32) % 4]}
        for z in z_batches
    ]
    quantize_int8(files["decoder_fp32"], files["decoder_int8"], decoder_batches)

    with torch.no_grad():
        val_scores = score_module(torch.from_numpy(apply_preprocessing(spec, normal_val))).numpy()
    threshold = calibrate_threshold(val_scores, FIXTURE_TARGET_FPR, source="workstation")

    detector_io = {"inputs": [tensor("window", [None, WINDOW_LENGTH])], "outputs": [tensor("score", [None])]}
    decoder_io = {
        "inputs": [tensor("z", [None, LATENT_DIM]), tensor("condition", [None, len(DECODER_CLASSES)])],
        "outputs": [tensor("beat", [None, WINDOW_LENGTH])],
    }
    task = {"modality": "ecg-beat", "window_length": WINDOW_LENGTH, "hop": WINDOW_LENGTH, "channels": 1,
            "sample_format": "text"}
    manifest = bundle_lib.new_manifest(task, spec)
    manifest["default_detector"] = DETECTOR_NAME
    manifest["models"][DETECTOR_NAME] = {
        "role": "detector",
        "output": "score",
        "formats": {
            "onnx-fp32": bundle_lib.file_entry(bundle_dir, files["detector_fp32"].name, "onnx", "fp32", **detector_io),
            "onnx-int8": bundle_lib.file_entry(bundle_dir, files["detector_int8"].name, "onnx", "int8", **detector_io),
        },
        "threshold": threshold.to_dict(),
    }
    manifest["models"][DECODER_NAME] = {
        "role": "decoder",
        "output": "beat",
        "latent_dim": LATENT_DIM,
        "classes": DECODER_CLASSES,
        "formats": {
            "onnx-fp32": bundle_lib.file_entry(bundle_dir, files["decoder_fp32"].name, "onnx", "fp32", **decoder_io),
            "onnx-int8": bundle_lib.file_entry(bundle_dir, files["decoder_int8"].name, "onnx", "int8", **decoder_io),
        },
    }
    bundle_lib.write_manifest(bundle_dir, manifest)
    return {"test_x": test.x, "test_y": test.y, "normal_val": normal_val}


@pytest.fixture(scope="session")
def tiny_bundle_data(tmp_path_factory):
    """The tiny bundle directory plus the ECG5000 arrays the tests stream through it."""
    import torch

    bundle_dir = tmp_path_factory.mktemp("tiny_bundle")
    # One intra-op thread: with two, OpenMP threads contend with onnxruntime and other test
    # processes on a 2-core runner and each training step becomes about 20 times slower.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        arrays = write_tiny_bundle(bundle_dir)
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
    """A private copy of the tiny bundle that a test may modify."""
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target
