"""Tests for anomalyforge.training.splits on the embedded ECG5000 and hand-made class sizes."""

from pathlib import Path

import numpy as np
import pytest

from anomalyforge.errors import InvalidInputError
from anomalyforge.training.datasets import LabelledSeries, load_ecg5000, load_ucr
from anomalyforge.training.splits import allocate_per_class, few_shot_split

FULL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_full_data = pytest.mark.skipif(
    not FULL_DATA_DIR.is_dir(), reason="full ECG5000 files are not present next to the repository"
)

# Anomalous classes 2..5 of the ECG5000 training file and their sizes.
ECG5000_TRAIN_ANOMALIES = {2: 177, 3: 10, 4: 19, 5: 2}


@pytest.fixture(scope="module")
def ecg5000():
    return load_ecg5000()


def row_keys(windows: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in windows]


def labels_by_row(series: LabelledSeries) -> dict[bytes, int]:
    return dict(zip(row_keys(series.x), series.y.tolist()))


@pytest.mark.parametrize(
    "available, k, expected",
    [
        ({2: 177, 3: 10, 4: 19, 5: 2}, 10, {2: 3, 3: 3, 4: 2, 5: 2}),
        ({2: 177, 3: 10, 4: 19, 5: 2}, 4, {2: 1, 3: 1, 4: 1, 5: 1}),
        ({2: 177, 3: 10, 4: 19, 5: 2}, 3, {2: 1, 3: 1, 4: 1, 5: 0}),
        ({2: 177, 3: 10, 4: 19, 5: 2}, 1, {2: 1, 3: 0, 4: 0, 5: 0}),
        ({2: 5, 3: 5}, 7, {2: 4, 3: 3}),
        ({7: 1, 3: 9, 5: 9}, 9, {3: 4, 5: 4, 7: 1}),
        ({2: 1, 3: 1, 4: 20}, 12, {2: 1, 3: 1, 4: 10}),
        ({2: 0, 3: 6}, 4, {2: 0, 3: 4}),
    ],
)
def test_allocate_per_class_round_robin(available, k, expected):
    assert allocate_per_class(available, k) == expected


def test_allocate_per_class_sum_is_k():
    available = {2: 3, 3: 40, 4: 1, 5: 17}

    for k in range(1, sum(available.values()) + 1):
        picks = allocate_per_class(available, k)
        assert sum(picks.values()) == k
        assert all(picks[label] <= available[label] for label in available)


def test_allocate_per_class_k_above_total():
    # The rule stops when every class is used up. few_shot_split rejects this case earlier.
    assert allocate_per_class({2: 2, 3: 1}, 10) == {2: 2, 3: 1}


def test_allocate_per_class_k_zero():
    assert allocate_per_class({2: 5, 3: 5}, 0) == {2: 0, 3: 0}


def test_few_shot_split_k10_ecg5000(ecg5000):
    train, test = ecg5000

    split = few_shot_split(train, test, k=10, seed=0)

    assert split.summary()["anomalies_per_class"] == {2: 3, 3: 3, 4: 2, 5: 2}
    assert split.anomalies.shape == (10, 140)
    assert split.anomaly_classes.shape == (10,)


@pytest.mark.parametrize("k", [1, 5, 10, 25, 208])
def test_few_shot_split_follows_allocation(ecg5000, k):
    train, test = ecg5000
    expected = {label: count for label, count in allocate_per_class(ECG5000_TRAIN_ANOMALIES, k).items() if count}

    split = few_shot_split(train, test, k=k, seed=3)

    assert split.summary()["anomalies_per_class"] == expected
    assert len(split.anomalies) == k


def test_few_shot_split_sizes(ecg5000):
    train, test = ecg5000

    summary = few_shot_split(train, test, k=10, val_fraction=0.2, seed=0).summary()

    assert summary["normal_val"] == 58
    assert summary["normal_train"] == 234
    assert summary["k_anomalies"] == 10
    assert summary["test"] == 4500
    assert summary["seed"] == 0


def test_few_shot_split_normal_all(ecg5000):
    train, test = ecg5000

    split = few_shot_split(train, test, k=10, seed=0)

    assert sorted(row_keys(split.normal_all)) == sorted(row_keys(train.x[train.y == 1]))


def test_few_shot_split_rows_keep_labels(ecg5000):
    train, test = ecg5000
    label_of = labels_by_row(train)

    split = few_shot_split(train, test, k=10, seed=5)

    assert all(label_of[key] == 1 for key in row_keys(split.normal_train))
    assert all(label_of[key] == 1 for key in row_keys(split.normal_val))
    assert [label_of[key] for key in row_keys(split.anomalies)] == split.anomaly_classes.tolist()


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_few_shot_split_no_overlap(ecg5000, seed):
    train, test = ecg5000

    split = few_shot_split(train, test, k=25, seed=seed)
    normal_train = set(row_keys(split.normal_train))
    normal_val = set(row_keys(split.normal_val))
    anomalies = set(row_keys(split.anomalies))

    assert len(normal_train) == len(split.normal_train)
    assert len(normal_val) == len(split.normal_val)
    assert len(anomalies) == len(split.anomalies)
    assert normal_train.isdisjoint(normal_val)
    assert normal_train.isdisjoint(anomalies)
    assert normal_val.isdisjoint(anomalies)


def test_few_shot_split_seeded_determinism(ecg5000):
    train, test = ecg5000

    first = few_shot_split(train, test, k=10, seed=7)
    second = few_shot_split(train, test, k=10, seed=7)

    np.testing.assert_array_equal(first.normal_train, second.normal_train)
    np.testing.assert_array_equal(first.normal_val, second.normal_val)
    np.testing.assert_array_equal(first.anomalies, second.anomalies)
    np.testing.assert_array_equal(first.anomaly_classes, second.anomaly_classes)


def test_few_shot_split_seeds_differ(ecg5000):
    train, test = ecg5000

    first = few_shot_split(train, test, k=10, seed=0)
    second = few_shot_split(train, test, k=10, seed=1)

    assert set(row_keys(first.normal_val)) != set(row_keys(second.normal_val))
    assert set(row_keys(first.anomalies)) != set(row_keys(second.anomalies))


def test_few_shot_split_test_untouched(ecg5000):
    train, test = ecg5000
    test_x_before = test.x.copy()
    test_y_before = test.y.copy()

    split = few_shot_split(train, test, k=10, seed=0)

    assert split.test is test
    np.testing.assert_array_equal(split.test.x, test_x_before)
    np.testing.assert_array_equal(split.test.y, test_y_before)
    _, fresh_test = load_ecg5000()
    np.testing.assert_array_equal(split.test.x, fresh_test.x)
    np.testing.assert_array_equal(split.test.y, fresh_test.y)


@needs_full_data
def test_few_shot_split_test_equals_ucr_file(ecg5000):
    train, test = ecg5000
    full_test = load_ucr(FULL_DATA_DIR / "ecg5000" / "ECG5000_TEST.txt.gz")

    split = few_shot_split(train, test, k=10, seed=0)

    np.testing.assert_array_equal(split.test.x, full_test.x)
    np.testing.assert_array_equal(split.test.y, full_test.y)


def test_few_shot_split_other_normal_class(ecg5000):
    # Class 2 (R-on-T PVC, 177 beats) is treated as normal, so classes 1, 3, 4 and 5 are anomalies.
    train, test = ecg5000

    split = few_shot_split(train, test, k=8, normal_class=2, seed=0)

    assert split.normal_class == 2
    assert len(split.normal_all) == 177
    assert split.summary()["anomalies_per_class"] == {1: 2, 3: 2, 4: 2, 5: 2}


@pytest.mark.parametrize("k", [0, -3])
def test_few_shot_split_rejects_small_k(ecg5000, k):
    train, test = ecg5000

    with pytest.raises(InvalidInputError, match=rf"k must be at least 1, got {k}"):
        few_shot_split(train, test, k=k)


def test_few_shot_split_rejects_large_k(ecg5000):
    train, test = ecg5000

    with pytest.raises(InvalidInputError, match=r"k=209 real anomalies requested but the training file has only 208"):
        few_shot_split(train, test, k=209)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.2])
def test_few_shot_split_rejects_val_fraction(ecg5000, val_fraction):
    train, test = ecg5000

    with pytest.raises(InvalidInputError, match=r"val_fraction must lie in \(0, 1\)"):
        few_shot_split(train, test, val_fraction=val_fraction)


def test_few_shot_split_rejects_rare_normal_class(ecg5000):
    # Class 5 has only 2 training beats, too few to serve as the normal class.
    train, test = ecg5000

    with pytest.raises(InvalidInputError, match=r"only 2 training series have the normal class 5"):
        few_shot_split(train, test, normal_class=5)
