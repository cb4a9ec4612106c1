"""Tests of the GAN and augmentation generators, the validity filter and the combined detector.

They train on the embedded ECG5000 data with short schedules, so they check interfaces,
determinism and invariants, not sample quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalyforge.errors import InvalidInputError
from anomalyforge.training.augment import AugmentGenerator
from anomalyforge.training.combined import (
    CombinedDetector, build_combined_detector, combine_scores, fit_standardisation,
)
from anomalyforge.training.detectors import AutoencoderConfig, ClassifierConfig, fit_autoencoder, fit_classifier
from anomalyforge.training.filters import filter_synthetic, sample_valid, validity_mask
from anomalyforge.training.fitting import score_windows
from anomalyforge.training.gan import GANConfig, GANGenerator
from anomalyforge.training.generators import one_hot_conditions
from anomalyforge.training.quality import (
    COLLAPSE_COVERAGE, COLLAPSE_DUPLICATE_SHARE, DUPLICATE_FRACTION, diversity_summary, nearest_distances,
)

SEED = 0
# Half the default generator steps at twice the default learning rate: about 12 s on one CPU
# thread, and on ECG5000 (k = 5, seed 0) the normal-condition coverage reaches 0.29, against
# 0.34 with the 300-step schedule that the sweep uses.
GAN_TEST_CONFIG = GANConfig(generator_steps=150, learning_rate=1e-3)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Train with one intra-op thread: two threads are many times slower on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def split_k5():
    from anomalyforge.training.datasets import load_ecg5000
    from anomalyforge.training.experiment import prepare
    from anomalyforge.training.splits import few_shot_split

    train, test = load_ecg5000()
    return prepare(few_shot_split(train, test, k=5, seed=SEED))


@pytest.fixture(scope="module")
def split_k10():
    from anomalyforge.training.datasets import load_ecg5000
    from anomalyforge.training.experiment import prepare
    from anomalyforge.training.splits import few_shot_split

    train, test = load_ecg5000()
    return prepare(few_shot_split(train, test, k=10, seed=SEED))


@pytest.fixture(scope="module")
def trained_gan(split_k5, one_torch_thread):
    return GANGenerator(GAN_TEST_CONFIG).fit(split_k5.normal_train, split_k5.anomalies, split_k5.anomaly_classes, SEED)


def assert_znormalised(windows: np.ndarray) -> None:
    assert np.allclose(windows.mean(axis=1), 0.0, atol=1e-4)
    assert np.allclose(windows.std(axis=1, ddof=1), 1.0, atol=1e-4)


# ---------------------------------------------------------------- augmentation


def test_augment_sample_interface(split_k10):
    generator = AugmentGenerator().fit(split_k10.normal_train, split_k10.anomalies, split_k10.anomaly_classes, SEED)
    windows, labels = generator.sample(101, seed=3)

    assert generator.classes_ == [2, 3, 4, 5]
    assert generator.decoder is None
    assert windows.shape == (101, split_k10.anomalies.shape[1])
    assert windows.dtype == np.float32
    assert labels.shape == (101,)
    assert set(labels.tolist()) == {2, 3, 4, 5}
    assert_znormalised(windows)


def test_augment_deterministic_per_seed(split_k10):
    generator = AugmentGenerator().fit(split_k10.normal_train, split_k10.anomalies, split_k10.anomaly_classes, SEED)
    first, _ = generator.sample(50, seed=7)
    again, _ = generator.sample(50, seed=7)
    other, _ = generator.sample(50, seed=8)

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_augment_keeps_requested_class(split_k10):
    generator = AugmentGenerator().fit(split_k10.normal_train, split_k10.anomalies, split_k10.anomaly_classes, SEED)
    for label in generator.classes_:
        windows, labels = generator.sample(60, seed=1, classes=[label])
        distances = np.linalg.norm(windows[:, None, :] - split_k10.anomalies[None, :, :], axis=2)
        nearest_class = split_k10.anomaly_classes[distances.argmin(axis=1)]

        assert np.all(labels == label)
        # Augmented beats stay nearest to a real anomaly of their own class in most cases.
        assert (nearest_class == label).mean() >= 0.6, f"class {label}"


def test_augment_rejects_unknown_class(split_k10):
    generator = AugmentGenerator().fit(split_k10.normal_train, split_k10.anomalies, split_k10.anomaly_classes, SEED)
    with pytest.raises(InvalidInputError, match=r"classes \[7\] were not fitted"):
        generator.sample(5, classes=[7])


# ---------------------------------------------------------------- GAN


def test_gan_sample_interface(trained_gan, split_k5):
    windows, labels = trained_gan.sample(40, seed=2)

    assert trained_gan.classes_ == sorted(set(split_k5.anomaly_classes.tolist()))
    assert trained_gan.latent_dim == GANConfig().latent_dim
    assert windows.shape == (40, split_k5.anomalies.shape[1])
    assert windows.dtype == np.float32
    assert set(labels.tolist()) == set(trained_gan.classes_)
    assert_znormalised(windows)


def test_gan_sample_deterministic_per_seed(trained_gan):
    first, _ = trained_gan.sample(30, seed=5)
    again, _ = trained_gan.sample(30, seed=5)
    other, _ = trained_gan.sample(30, seed=6)

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_gan_fit_deterministic_per_seed(split_k5):
    config = GANConfig(generator_steps=4)
    fits = [GANGenerator(config).fit(split_k5.normal_train, split_k5.anomalies, split_k5.anomaly_classes, SEED)
            for _ in range(2)]
    for first, second in zip(fits[0].decoder.parameters(), fits[1].decoder.parameters()):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_gan_no_collapse_at_k5(trained_gan, split_k5):
    from anomalyforge.signal import znormalize

    real_spacing = np.median(nearest_distances(split_k5.normal_val, split_k5.normal_val, 1, exclude_self=True))
    for label in trained_gan.classes_:
        windows, _ = trained_gan.sample(200, seed=1, classes=[label])
        spacing = nearest_distances(windows, windows, 1, exclude_self=True)
        duplicate_share = (spacing < DUPLICATE_FRACTION * real_spacing).mean()
        assert duplicate_share <= COLLAPSE_DUPLICATE_SHARE, f"class {label}: {duplicate_share:.0%} near-duplicates"

    # Normals (all-zero condition) have enough real examples to measure coverage.
    z = torch.as_tensor(np.random.default_rng(3).standard_normal((300, trained_gan.latent_dim)).astype(np.float32))
    with torch.no_grad():
        normals = znormalize(trained_gan.decoder(z, torch.zeros(300, len(trained_gan.classes_))).numpy())
    summary = diversity_summary(split_k5.normal_val, normals)
    assert summary["coverage"] >= COLLAPSE_COVERAGE
    assert not summary["mode_collapse"], summary["mode_collapse_reasons"]


def test_gan_decoder_exports_without_transposed_convolution(trained_gan, tmp_path):
    from anomalyforge.export.onnx_export import export_onnx, run_onnx

    decoder = trained_gan.decoder
    assert not any(isinstance(module, torch.nn.ConvTranspose1d) for module in decoder.modules())

    labels = trained_gan.class_schedule(8)
    z = np.random.default_rng(0).standard_normal((8, trained_gan.latent_dim)).astype(np.float32)
    condition = one_hot_conditions(labels, trained_gan.classes_)
    path = export_onnx(decoder, (torch.from_numpy(z), torch.from_numpy(condition)), tmp_path / "gan.onnx",
                       input_names=["z", "condition"], output_names=["window"])
    exported = run_onnx(path, {"z": z, "condition": condition})[0]
    with torch.no_grad():
        expected = decoder(torch.from_numpy(z), torch.from_numpy(condition)).numpy()

    np.testing.assert_allclose(exported, expected, atol=1e-4)


def test_gan_rejects_missing_labels(split_k5):
    with pytest.raises(InvalidInputError, match="one class label each"):
        GANGenerator(GANConfig(generator_steps=1)).fit(split_k5.normal_train, split_k5.anomalies,
                                                       split_k5.anomaly_classes[:2])


# ---------------------------------------------------------------- validity filter


def test_filter_drops_normal_keeps_anomaly_copy(split_k10):
    synthetic = np.stack([split_k10.normal_val[0], split_k10.anomalies[0]])
    labels = np.array([split_k10.anomaly_classes[0]] * 2)

    valid, same_class = validity_mask(synthetic, labels, split_k10.normal_train, split_k10.anomalies,
                                      split_k10.anomaly_classes)
    kept, kept_labels, report = filter_synthetic(synthetic, labels, split_k10.normal_train, split_k10.anomalies,
                                                 split_k10.anomaly_classes)

    assert valid.tolist() == [False, True]
    assert bool(same_class[1])
    assert report.closer_to_normal == 1
    assert report.n_kept == 1
    np.testing.assert_array_equal(kept[0], split_k10.anomalies[0])
    assert kept_labels.tolist() == [split_k10.anomaly_classes[0]]


def test_sample_valid_balances_classes(split_k10):
    generator = AugmentGenerator().fit(split_k10.normal_train, split_k10.anomalies, split_k10.anomaly_classes, SEED)
    windows, labels, report = sample_valid(generator, 80, SEED, split_k10.normal_train, split_k10.anomalies,
                                           split_k10.anomaly_classes)

    assert report.n_candidates == 160
    assert report.n_kept == len(windows) == len(labels)
    assert report.n_requested == 80
    assert report.closer_to_normal == sum(entry["closer_to_normal"] for entry in report.per_class.values())
    for label, entry in report.per_class.items():
        assert entry["kept"] <= 20, f"class {label}"
        assert (labels == int(label)).sum() == entry["kept"]
    valid, _ = validity_mask(windows, labels, split_k10.normal_train, split_k10.anomalies, split_k10.anomaly_classes)
    assert valid.all()


# ---------------------------------------------------------------- combined detector


def test_standardisation_maps_normals_to_unit_scale():
    scores = np.random.default_rng(0).gamma(2.0, 0.3, size=500)
    standardisation = fit_standardisation(scores)
    standardised = standardisation.apply(scores)

    assert abs(standardised.mean()) < 1e-12
    assert standardised.std(ddof=1) == pytest.approx(1.0)


def test_standardisation_rejects_constant_scores():
    with pytest.raises(InvalidInputError, match="cannot be standardised"):
        fit_standardisation(np.full(10, 0.5), "autoencoder")


def test_combined_module_matches_numpy_and_exports(split_k10, tmp_path):
    from anomalyforge.export.onnx_export import export_onnx, run_onnx

    autoencoder = fit_autoencoder(split_k10.normal_train, SEED, AutoencoderConfig(epochs=2, channels=8))
    classifier = fit_classifier(split_k10.normal_train, split_k10.anomalies, None, SEED,
                                ClassifierConfig(epochs=2, channels=8))
    autoencoder_normal = score_windows(autoencoder, split_k10.normal_val)
    classifier_normal = score_windows(classifier, split_k10.normal_val)
    detector = build_combined_detector(autoencoder, classifier, autoencoder_normal, classifier_normal)

    windows = split_k10.test.x[:200]
    expected = combine_scores(score_windows(autoencoder, windows), score_windows(classifier, windows),
                              fit_standardisation(autoencoder_normal), fit_standardisation(classifier_normal))
    combined_normal = score_windows(detector, split_k10.normal_val)

    assert isinstance(detector, CombinedDetector)
    np.testing.assert_allclose(score_windows(detector, windows), expected, rtol=1e-5, atol=1e-4)
    # Each standardised part has mean 0 on the normals it was fitted on, so their sum does too.
    assert abs(combined_normal.mean()) < 1e-4

    path = export_onnx(detector, (torch.from_numpy(windows[:4]),), tmp_path / "combined.onnx",
                       input_names=["window"], output_names=["score"])
    exported = run_onnx(path, {"window": windows})[0]
    np.testing.assert_allclose(exported, expected, rtol=1e-4, atol=1e-4)


def test_combine_scores_rejects_length_mismatch():
    standardisation = fit_standardisation(np.arange(5.0))
    with pytest.raises(InvalidInputError, match="score the same windows"):
        combine_scores(np.zeros(3), np.zeros(4), standardisation, standardisation)
