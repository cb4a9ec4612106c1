"""Training side on the embedded ECG5000: modules, detectors, generator, evaluation, experiment.

Configurations are cut down (15 autoencoder epochs, 20 CVAE epochs, 5 classifier epochs,
3 folds) so the file runs in about 15 s on two CPU cores. The ROC-AUC floors below sit well
under what those short fits reached (0.985 to 0.996 over seeds 0 to 2, measured on a 2-core
CPU machine with torch 2.13), so they catch a broken detector without failing on seed noise.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from anomalyforge.errors import InvalidInputError
from anomalyforge.thresholds import calibrate_threshold
from anomalyforge.training.datasets import LabelledSeries, load_ecg5000
from anomalyforge.training.detectors import (
    AutoencoderConfig, ClassifierConfig, calibration_scores, fit_autoencoder, fit_classifier, fit_pca,
)
from anomalyforge.training.evaluation import evaluate_scores
from anomalyforge.training.experiment import ExperimentConfig, prepare, train_detector
from anomalyforge.training.fitting import score_windows
from anomalyforge.training.generators import CVAEConfig, CVAEGenerator, one_hot_conditions
from anomalyforge.training.models import CVAE, ConvAutoencoder, ConvClassifier, ConvEncoder, PCAReconstruction
from anomalyforge.training.splits import few_shot_split

WINDOW_LENGTH = 140
NORMAL_CLASS = 1
AUTOENCODER_CONFIG = AutoencoderConfig(epochs=15)
CLASSIFIER_CONFIG = ClassifierConfig(epochs=5)
CVAE_CONFIG = CVAEConfig(epochs=20)
AUC_FLOOR = 0.95


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    # Tiny models train many times slower with two intra-op threads when other processes
    # compete for the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def split():
    train, test = load_ecg5000()
    return prepare(few_shot_split(train, test, k=10, seed=0))


@pytest.fixture(scope="module")
def held_out(split) -> LabelledSeries:
    # The TEST file is sorted by class (its first 2627 beats are all normal), so take 1000
    # beats at seeded random positions: about 570 normals and 430 anomalies.
    index = np.random.default_rng(0).permutation(len(split.test))[:1000]
    return LabelledSeries(x=split.test.x[index], y=split.test.y[index])


@pytest.fixture(scope="module")
def autoencoder(split):
    return fit_autoencoder(split.normal_train, seed=0, config=AUTOENCODER_CONFIG)


@pytest.fixture(scope="module")
def generator(split):
    return CVAEGenerator(CVAE_CONFIG).fit(split.normal_train, split.anomalies, split.anomaly_classes, seed=0)


@pytest.fixture(scope="module")
def synthetic(generator):
    windows, _ = generator.sample(200, seed=0)
    return windows


def held_out_auc(module, sample: LabelledSeries) -> float:
    scores = score_windows(module, sample.x)
    return roc_auc_score(sample.y != NORMAL_CLASS, scores)


# Models


def build_detector(kind: str, normals: np.ndarray) -> nn.Module:
    if kind == "autoencoder":
        return ConvAutoencoder(WINDOW_LENGTH)
    if kind == "classifier":
        return ConvClassifier(WINDOW_LENGTH)
    return fit_pca(normals, n_components=3)


@pytest.mark.parametrize("kind", ["autoencoder", "classifier", "pca"])
@pytest.mark.parametrize("batch", [1, 7])
def test_detector_output_shape(split, kind, batch):
    module = build_detector(kind, split.normal_train).eval()
    windows = torch.as_tensor(split.normal_val[:batch])

    with torch.no_grad():
        scores = module(windows)

    assert tuple(scores.shape) == (batch,)


def test_pca_module_type(split):
    assert isinstance(fit_pca(split.normal_train, n_components=3), PCAReconstruction)


def test_cvae_decoder_no_transposed_conv():
    decoder = CVAE(WINDOW_LENGTH, n_classes=4).decoder
    kinds = {name: type(module) for name, module in decoder.named_modules()}

    transposed = [name for name, kind in kinds.items() if issubclass(kind, nn.ConvTranspose1d)]
    assert transposed == []
    # Guards the walk itself: the decoder must still contain its convolutions and upsampling.
    assert nn.Conv1d in kinds.values()
    assert nn.Upsample in kinds.values()


def test_cvae_decoder_output_shape():
    decoder = CVAE(WINDOW_LENGTH, n_classes=4, latent_dim=16).decoder

    with torch.no_grad():
        windows = decoder(torch.zeros(3, 16), torch.eye(4)[:3])

    assert tuple(windows.shape) == (3, WINDOW_LENGTH)


def test_encoder_rejects_length():
    with pytest.raises(ValueError, match="window length must be divisible by 4, got 138"):
        ConvEncoder(138)


# fit_autoencoder


def test_autoencoder_same_seed_identical(split, autoencoder):
    again = fit_autoencoder(split.normal_train, seed=0, config=AUTOENCODER_CONFIG)

    expected = score_windows(autoencoder, split.normal_val)
    np.testing.assert_array_equal(score_windows(again, split.normal_val), expected)


def test_autoencoder_other_seed_differs(split, autoencoder):
    other = fit_autoencoder(split.normal_train, seed=1, config=AUTOENCODER_CONFIG)

    expected = score_windows(autoencoder, split.normal_val)
    assert not np.allclose(score_windows(other, split.normal_val), expected)


def test_autoencoder_auc_floor(autoencoder, held_out):
    assert held_out_auc(autoencoder, held_out) > AUC_FLOOR


def test_autoencoder_anomalies_score_higher(autoencoder, held_out):
    scores = score_windows(autoencoder, held_out.x)
    is_anomaly = held_out.y != NORMAL_CLASS

    assert scores[is_anomaly].mean() > scores[~is_anomaly].mean()


# fit_pca


def test_pca_selects_count_in_range(split):
    pca = fit_pca(split.normal_train, validation_normals=split.normal_val,
                  validation_anomalies=split.anomalies, max_components=10)
    count = pca.components.shape[0]

    assert count >= 1
    assert count <= 10


def test_pca_none_without_validation(split):
    with pytest.raises(ValueError, match="n_components=None needs validation_normals and validation_anomalies"):
        fit_pca(split.normal_train)


def test_pca_none_without_anomalies(split):
    with pytest.raises(ValueError, match="n_components=None needs validation_normals and validation_anomalies"):
        fit_pca(split.normal_train, validation_normals=split.normal_val)


def test_pca_residual_training_below_anomaly(split, held_out):
    pca = fit_pca(split.normal_train, n_components=4)
    anomalies = held_out.x[held_out.y != NORMAL_CLASS]

    training_residual = score_windows(pca, split.normal_train).mean()
    assert training_residual < score_windows(pca, anomalies).mean()


# fit_classifier


def classifier_scores(split, synthetic, windows, real_anomaly_weight: float) -> np.ndarray:
    config = dataclasses.replace(CLASSIFIER_CONFIG, real_anomaly_weight=real_anomaly_weight)
    model = fit_classifier(split.normal_train, split.anomalies, synthetic, seed=0, config=config)
    return score_windows(model, windows)


def test_classifier_same_weight_identical(split, synthetic):
    first = classifier_scores(split, synthetic, split.normal_val, 5.0)

    np.testing.assert_array_equal(classifier_scores(split, synthetic, split.normal_val, 5.0), first)


def test_classifier_real_weight_changes_result(split, synthetic):
    weighted = classifier_scores(split, synthetic, split.normal_val, 5.0)

    assert not np.allclose(classifier_scores(split, synthetic, split.normal_val, 1.0), weighted)


def test_classifier_auc_floor(split, synthetic, held_out):
    model = fit_classifier(split.normal_train, split.anomalies, synthetic, seed=0, config=CLASSIFIER_CONFIG)

    assert held_out_auc(model, held_out) > AUC_FLOOR


# calibration_scores


def row_key(row) -> bytes:
    return np.asarray(row, dtype=np.float32).tobytes()


class RowRecorder(nn.Module):
    """Stand-in detector that scores each window with its row number and logs what it scored.

    ``row_numbers`` maps a window's bytes to its position in the validation normals followed
    by the training normals. ``trained_keys`` contains the windows this model was fitted on.
    """

    def __init__(self, name: str, trained_keys: set, row_numbers: dict, log: list):
        super().__init__()
        self.name = name
        self.trained_keys = trained_keys
        self.row_numbers = row_numbers
        self.log = log

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        keys = [row_key(row.numpy()) for row in window]
        self.log.append((self.name, self.trained_keys, keys))
        return torch.tensor([float(self.row_numbers[key]) for key in keys])


@pytest.fixture(scope="module")
def recorded_calibration(split):
    """Run calibration_scores with RowRecorder models and return (result, scoring log, fit calls)."""
    rows = np.concatenate([split.normal_val, split.normal_train])
    row_numbers = {row_key(row): number for number, row in enumerate(rows)}
    assert len(row_numbers) == len(rows), "ECG5000 normals must be distinct rows for this test"
    log: list = []
    fit_calls: list = []

    def fit(normals, seed):
        fit_calls.append((seed, len(normals)))
        trained = {row_key(row) for row in normals}
        return RowRecorder(f"fold {len(fit_calls)}", trained, row_numbers, log)

    training_keys = {row_key(row) for row in split.normal_train}
    deployed = RowRecorder("deployed", training_keys, row_numbers, log)
    result = calibration_scores(fit, deployed, split.normal_train, split.normal_val, n_folds=3, seed=0)
    return result, log, fit_calls


def test_calibration_score_count(split, recorded_calibration):
    result, _, _ = recorded_calibration

    assert len(result.scores) == len(split.normal_val) + len(split.normal_train)
    assert result.n_validation == len(split.normal_val)
    assert result.n_out_of_fold == len(split.normal_train)
    assert result.n_folds == 3


def test_calibration_scores_in_row_order(split, recorded_calibration):
    # Each score is its row's number, so validation rows come first and every training row
    # lands at its own position.
    result, _, _ = recorded_calibration

    expected = np.arange(len(split.normal_val) + len(split.normal_train), dtype=np.float64)
    np.testing.assert_array_equal(result.scores, expected)


def test_calibration_refits_once_per_fold(split, recorded_calibration):
    _, _, fit_calls = recorded_calibration
    seeds = [seed for seed, _ in fit_calls]

    assert len(fit_calls) == 3
    assert len(set(seeds)) == 3
    assert sum(len(split.normal_train) - n_rows for _, n_rows in fit_calls) == len(split.normal_train)


def test_calibration_training_rows_scored_once(split, recorded_calibration):
    _, log, _ = recorded_calibration
    counts = Counter(key for name, _, keys in log if name != "deployed" for key in keys)

    assert set(counts) == {row_key(row) for row in split.normal_train}
    assert set(counts.values()) == {1}


def test_calibration_fold_never_scores_own_rows(recorded_calibration):
    _, log, _ = recorded_calibration
    fold_entries = [(name, trained, keys) for name, trained, keys in log if name != "deployed"]
    leaks = {name: len(trained.intersection(keys)) for name, trained, keys in fold_entries}

    assert len(fold_entries) >= 3
    assert set(leaks.values()) == {0}


def test_calibration_deployed_scores_validation(split, recorded_calibration):
    _, log, _ = recorded_calibration
    scored = [key for name, _, keys in log if name == "deployed" for key in keys]

    assert scored == [row_key(row) for row in split.normal_val]


def test_calibration_describe(split, recorded_calibration):
    result, _, _ = recorded_calibration

    expected = (f"{len(split.normal_val)} validation normals scored by the deployed model and "
                f"{len(split.normal_train)} training normals scored out of fold (3 refits)")
    assert result.describe() == expected


# CVAEGenerator


def test_generator_sample_shape(generator):
    windows, labels = generator.sample(50, seed=1)

    assert windows.shape == (50, WINDOW_LENGTH)
    assert windows.dtype == np.float32
    assert labels.shape == (50,)


def test_generator_sample_znormalised(generator):
    windows, _ = generator.sample(50, seed=1)

    np.testing.assert_allclose(windows.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(windows.std(axis=1, ddof=1), 1.0, atol=1e-4)


def test_generator_labels_spread_evenly(generator, split):
    _, labels = generator.sample(202, seed=1)
    counts = Counter(labels.tolist())

    assert sorted(counts) == sorted(set(split.anomaly_classes.tolist()))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_generator_same_seed_identical(generator):
    first, first_labels = generator.sample(30, seed=4)
    second, second_labels = generator.sample(30, seed=4)

    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(second_labels, first_labels)


def test_generator_other_seed_differs(generator):
    first, _ = generator.sample(30, seed=4)
    other, _ = generator.sample(30, seed=5)

    assert not np.allclose(other, first)


def test_schedule_subset_of_classes(generator):
    chosen = generator.classes_[:2]
    labels = generator.class_schedule(5, chosen)

    assert labels.tolist() == [chosen[0], chosen[1], chosen[0], chosen[1], chosen[0]]


def test_schedule_rejects_unknown_class(generator):
    with pytest.raises(InvalidInputError, match=r"classes \[9\] were not fitted"):
        generator.class_schedule(10, [generator.classes_[0], 9])


def test_one_hot_normal_class_zeros():
    conditions = one_hot_conditions(np.array([1, 2, 4]), [2, 3, 4])

    np.testing.assert_array_equal(conditions[0], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(conditions[1], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(conditions[2], [0.0, 0.0, 1.0])
    assert conditions.dtype == np.float32


# evaluate_scores


def test_evaluate_perfect_separation():
    scores = np.r_[np.linspace(0.0, 1.0, 100), np.linspace(2.0, 3.0, 20)]
    labels = np.r_[np.full(100, NORMAL_CLASS), np.full(10, 2), np.full(10, 3)]

    result = evaluate_scores(scores, labels, NORMAL_CLASS, threshold=1.5)

    assert result["roc_auc"] == 1.0
    assert result["pr_auc"] == 1.0
    assert result["recall"] == 1.0
    assert result["fpr"] == 0.0
    assert result["n_normals"] == 100
    assert result["n_anomalies"] == 20


@pytest.fixture
def overlapping_scores():
    """100 normals scored 0..99; class 2 anomalies at 200 and 201, class 3 at 98.5 and 50."""
    scores = np.r_[np.arange(100.0), 200.0, 201.0, 98.5, 50.0]
    labels = np.r_[np.full(100, NORMAL_CLASS), 2, 2, 3, 3]
    return scores, labels


def test_evaluate_fpr_one_normal_flagged(overlapping_scores):
    scores, labels = overlapping_scores

    result = evaluate_scores(scores, labels, NORMAL_CLASS, threshold=98.75)

    assert result["fpr"] == 0.01
    assert result["threshold"] == 98.75


def test_evaluate_recall_per_class(overlapping_scores):
    scores, labels = overlapping_scores

    result = evaluate_scores(scores, labels, NORMAL_CLASS, threshold=98.75)

    assert result["recall_per_class"] == {"2": 1.0, "3": 0.0}
    assert result["recall"] == 0.5


def test_evaluate_diagnostic_recall(overlapping_scores):
    # At exactly 1 % FPR the cut sits at the 99th normal (98), so 98.5 counts and 50 does
    # not, whatever the calibrated threshold.
    scores, labels = overlapping_scores

    result = evaluate_scores(scores, labels, NORMAL_CLASS, threshold=150.0, diagnostic_fpr=0.01)
    diagnostic = result["diagnostic_recall_at_test_fpr"]

    assert diagnostic["fpr"] == 0.01
    assert diagnostic["recall"] == 0.75
    assert diagnostic["recall_per_class"] == {"2": 1.0, "3": 0.5}
    assert result["recall"] == 0.5


# experiment.train_detector


@pytest.fixture(scope="module")
def trained_autoencoder(split, held_out):
    small_split = dataclasses.replace(split, test=held_out)
    config = ExperimentConfig(n_folds=3, autoencoder=AUTOENCODER_CONFIG)

    def fit(normals, seed):
        return fit_autoencoder(normals, seed, config.autoencoder)

    return train_detector("autoencoder", fit, small_split, config, seed=0)


def test_train_detector_threshold_count(split, trained_autoencoder):
    threshold = trained_autoencoder.threshold

    assert threshold.n_normals == len(split.normal_val) + len(split.normal_train)
    assert threshold.target_fpr == 0.01


def test_train_detector_threshold_from_calibration(trained_autoencoder):
    expected = calibrate_threshold(trained_autoencoder.calibration.scores, 0.01)

    assert trained_autoencoder.threshold.value == expected.value


def test_train_detector_reports_test_fpr(trained_autoencoder, held_out):
    evaluation = trained_autoencoder.evaluation
    is_normal = held_out.y == NORMAL_CLASS
    flagged = trained_autoencoder.test_scores > trained_autoencoder.threshold.value

    assert 0.0 <= evaluation["fpr"] <= 1.0
    assert 0.0 <= evaluation["recall"] <= 1.0
    assert evaluation["fpr"] == flagged[is_normal].mean()
    assert evaluation["n_normals"] == int(is_normal.sum())


def test_train_detector_test_scores(trained_autoencoder, held_out):
    assert trained_autoencoder.test_scores.shape == (len(held_out),)


def test_train_detector_threshold_record(trained_autoencoder):
    record = trained_autoencoder.threshold_record()

    assert record["calibration_data"] == trained_autoencoder.calibration.describe()
    assert record["value"] == trained_autoencoder.threshold.value
