"""Quality metrics of synthetic windows, checked on real ECG5000 beats with known answers.

Two random halves of the TEST normals stand in for a perfect generator, class-2 anomalies
against normals for a clearly different one, copies of the training anomalies for a
memorising generator and one repeated beat for a collapsed one.
"""

from __future__ import annotations

import numpy as np
import pytest

from anomalyforge.errors import InvalidInputError
from anomalyforge.signal import znormalize
from anomalyforge.training import quality
from anomalyforge.training.datasets import load_ecg5000

NORMAL_CLASS = 1
N_PER_SET = 400


@pytest.fixture(scope="module")
def beats():
    """Z-normalised ECG5000 beats: TEST normals in two disjoint random halves, anomalies by class."""
    train, test = load_ecg5000()
    x_test, x_train = znormalize(test.x).astype(np.float64), znormalize(train.x).astype(np.float64)
    rng = np.random.default_rng(0)
    normals = x_test[test.y == NORMAL_CLASS]
    order = rng.permutation(len(normals))
    train_anomalies = x_train[train.y != NORMAL_CLASS]
    return {
        "normals_a": normals[order[:N_PER_SET]],
        "normals_b": normals[order[N_PER_SET:2 * N_PER_SET]],
        "class2": x_test[test.y == 2][:N_PER_SET],
        "test_x": x_test,
        "test_y": test.y,
        "train_normals": x_train[train.y == NORMAL_CLASS],
        "k_anomalies": train_anomalies[:10],
        "other_train_anomalies": train_anomalies[10:],
        "test_anomalies": x_test[test.y != NORMAL_CLASS],
    }


def test_prdc_matches_reference_package(beats):
    prdc_package = pytest.importorskip("prdc")
    cases = [(beats["normals_a"], beats["normals_b"]), (beats["normals_a"], beats["class2"]),
             (beats["class2"][:50], beats["normals_b"][:300])]
    for real, synthetic in cases:
        ours = quality.prdc(real, synthetic, nearest_k=5)
        reference = prdc_package.compute_prdc(real_features=real, fake_features=synthetic, nearest_k=5)
        for metric in ("precision", "recall", "density", "coverage"):
            assert ours[metric] == pytest.approx(float(reference[metric]), abs=1e-9), metric


def test_identical_sets_score_as_perfect(beats):
    real = beats["normals_a"]
    result = quality.prdc(real, real.copy())
    assert result["precision"] == 1.0
    assert result["recall"] == 1.0
    assert result["coverage"] == 1.0
    assert quality.discriminative_score(real, real.copy())["score"] < 0.1
    assert quality.mmd_test(real, real.copy(), n_permutations=100)["p_value"] > 0.5
    distances = quality.curve_distances(real, real.copy())
    assert all(value == pytest.approx(0.0, abs=1e-12) for value in distances.values())


def test_same_distribution_halves_pass(beats):
    real, synthetic = beats["normals_a"], beats["normals_b"]
    assert quality.discriminative_score(real, synthetic)["score"] < 0.1
    assert quality.mmd_test(real, synthetic)["p_value"] > 0.05
    diversity = quality.diversity_summary(real, synthetic)
    assert diversity["coverage"] > 0.9
    assert 0.8 < diversity["density"] < 1.25
    assert not diversity["mode_collapse"]
    assert quality.curve_distances(real, synthetic)["mean_curve_rmse"] < 0.1


def test_shifted_sets_are_detected(beats):
    real, synthetic = beats["normals_a"], beats["class2"]
    assert quality.discriminative_score(real, synthetic)["score"] > 0.4
    mmd = quality.mmd_test(real, synthetic, n_permutations=200)
    assert mmd["p_value"] == pytest.approx(1 / 201)
    assert mmd["mmd2"] > 0.1
    assert quality.curve_distances(real, synthetic)["mean_curve_rmse"] > 0.3


def test_small_time_shift_is_detected(beats):
    real = beats["normals_a"]
    shifted = znormalize(np.roll(beats["normals_b"], 4, axis=1)).astype(np.float64)
    assert quality.mmd_test(real, shifted)["p_value"] < 0.01
    assert quality.discriminative_score(real, shifted)["score"] > 0.2


def test_mmd_is_deterministic_given_seed(beats):
    first = quality.mmd_test(beats["normals_a"], beats["normals_b"], seed=3, n_permutations=50)
    second = quality.mmd_test(beats["normals_a"], beats["normals_b"], seed=3, n_permutations=50)
    assert first == second
    assert first["p_value"] >= 1 / 51


def test_mmd_unbiased_estimate_matches_direct_formula():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 6)), rng.normal(0.5, 1.0, size=(20, 6))
    sigma = 2.0
    def kernel(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2))
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    expected = ((kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (20 * 19)
                - 2 * kxy.mean())
    assert quality.mmd_test(x, y, bandwidth=sigma, n_permutations=10)["mmd2"] == pytest.approx(expected, rel=1e-10)


def test_collapsed_generator_is_flagged(beats):
    collapsed = np.repeat(beats["normals_b"][:1], 200, axis=0)
    result = quality.diversity_summary(beats["normals_a"], collapsed)
    assert result["mode_collapse"]
    assert result["near_duplicate_share"] == 1.0
    assert result["recall"] == 0.0
    assert result["coverage"] < quality.COLLAPSE_COVERAGE


def test_few_modes_generator_is_flagged_by_duplicates(beats):
    # Five beats, each repeated 40 times with tiny jitter: coverage alone might pass a small
    # real set, the near-duplicate share does not.
    rng = np.random.default_rng(2)
    modes = np.repeat(beats["normals_b"][:5], 40, axis=0) + rng.normal(0, 1e-3, size=(200, 140))
    result = quality.diversity_summary(beats["normals_a"], modes)
    assert result["near_duplicate_share"] == 1.0
    assert result["mode_collapse"]


def test_copying_generator_is_flagged(beats):
    rng = np.random.default_rng(3)
    training = beats["k_anomalies"]
    copies = np.repeat(training, 20, axis=0) + rng.normal(0, 0.01, size=(200, 140))
    result = quality.memorisation_summary(training, copies, beats["other_train_anomalies"])
    assert result["near_copies"] == 200
    assert result["memorisation"]
    assert result["share_below_holdout_p5"] == 1.0
    assert result["dcr_median"] < 0.2
    assert np.array_equal(result["nearest_training_index"], np.repeat(np.arange(10), 20))


def test_fresh_real_anomalies_are_not_copies(beats):
    training = beats["k_anomalies"]
    fresh = beats["test_anomalies"][:500]
    result = quality.memorisation_summary(training, fresh, beats["other_train_anomalies"])
    assert not result["memorisation"]
    assert result["near_copy_share"] < 0.02
    assert result["share_below_holdout_p5"] < 0.15


def test_utility_real_anomalies_match_trtr(beats):
    # Held-out real anomalies as the "synthetic" set: TSTR must be at least as good as TRTR,
    # while Gaussian noise as the synthetic set must be clearly worse.
    normals, training = beats["train_normals"], beats["k_anomalies"]
    good = quality.train_synthetic_test_real(normals, training, beats["other_train_anomalies"],
                                             beats["test_x"], beats["test_y"], NORMAL_CLASS)
    assert good["tstr"]["roc_auc"] > 0.97
    assert good["tstr"]["roc_auc"] >= good["trtr"]["roc_auc"] - 0.01
    assert set(good["trtr"]["roc_auc_per_class"]) == {"2", "3", "4", "5"}
    noise = np.random.default_rng(4).normal(size=(200, 140))
    bad = quality.train_synthetic_test_real(normals, training, noise, beats["test_x"], beats["test_y"], NORMAL_CLASS)
    assert bad["tstr"]["roc_auc"] < good["tstr"]["roc_auc"] - 0.1
    assert bad["trtr"] == good["trtr"]


def test_autocorrelation_and_spectrum_shapes(beats):
    acf = quality.mean_autocorrelation(beats["normals_a"])
    assert acf.shape == (140,)
    assert acf[0] == pytest.approx(1.0)
    assert quality.mean_power_spectrum(beats["normals_a"]).sum() == pytest.approx(1.0)
    smooth = np.cumsum(np.random.default_rng(5).normal(size=(100, 140)), axis=1)
    rough = np.random.default_rng(6).normal(size=(100, 140))
    assert quality.curve_distances(smooth, rough)["spectrum_l1"] > 1.0


def test_invalid_inputs_are_rejected(beats):
    with pytest.raises(InvalidInputError, match="139"):
        quality.mmd_test(beats["normals_a"], beats["normals_b"][:, :139])
    with pytest.raises(InvalidInputError, match="at least 6"):
        quality.prdc(beats["normals_a"][:5], beats["normals_b"])
    with pytest.raises(InvalidInputError, match="NaN"):
        quality.curve_distances(np.full((3, 140), np.nan), beats["normals_b"])
    with pytest.raises(InvalidInputError, match="shape"):
        quality.discriminative_score(beats["normals_a"][0], beats["normals_b"])
