"""Tests for anomalyforge.training.datasets on the committed ECG5000 excerpt and the embedded copy.

The checks marked ``needs_full_data`` compare against the full UCR ECG5000 files, which sit
next to the repository in CI and are skipped on a plain clone.
"""

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from anomalyforge.errors import InvalidInputError
from anomalyforge.training.datasets import load_ecg5000, load_ucr, pack_ucr_pair

DATA_DIR = Path(__file__).resolve().parent / "data"
EXCERPT = DATA_DIR / "ecg5000_train_excerpt.txt"
EXCERPT_SHA256 = "84a088dd6729a894d1c4b56493373b5cd8c55ff9d59bf21d55f99302741c76af"
EXCERPT_ROWS = 20

FULL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
FULL_TRAIN = FULL_DATA_DIR / "ecg5000" / "ECG5000_TRAIN.txt"
FULL_TEST = FULL_DATA_DIR / "ecg5000" / "ECG5000_TEST.txt.gz"
needs_full_data = pytest.mark.skipif(
    not FULL_DATA_DIR.is_dir(), reason="full ECG5000 files are not present next to the repository"
)

# Official ECG5000 class counts for classes 1..5.
TRAIN_CLASS_COUNTS = {1: 292, 2: 177, 3: 10, 4: 19, 5: 2}
TEST_CLASS_COUNTS = {1: 2627, 2: 1590, 3: 86, 4: 175, 5: 22}


def excerpt_lines() -> list[str]:
    return EXCERPT.read_text(encoding="utf-8").splitlines()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def class_counts(labels: np.ndarray) -> dict[int, int]:
    classes, counts = np.unique(labels, return_counts=True)
    return {int(label): int(count) for label, count in zip(classes, counts)}


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.loadtxt(EXCERPT)


def test_excerpt_checksum():
    assert hashlib.sha256(EXCERPT.read_bytes()).hexdigest() == EXCERPT_SHA256


def test_load_ucr_excerpt(reference):
    series = load_ucr(EXCERPT)

    assert series.x.shape == (EXCERPT_ROWS, 140)
    assert series.y.shape == (EXCERPT_ROWS,)
    assert len(series) == EXCERPT_ROWS
    assert series.x.dtype == np.float32
    assert series.y.dtype == np.int64
    np.testing.assert_array_equal(series.y, reference[:, 0].astype(np.int64))
    np.testing.assert_array_equal(series.x, reference[:, 1:].astype(np.float32))


def test_load_ucr_excerpt_labels_normal():
    # The first 20 lines of ECG5000_TRAIN.txt are all class 1 (normal beats).
    series = load_ucr(EXCERPT)

    assert class_counts(series.y) == {1: EXCERPT_ROWS}


def test_load_ucr_excerpt_matches_embedded():
    train, _ = load_ecg5000()
    series = load_ucr(EXCERPT)

    np.testing.assert_array_equal(series.x, train.x[:EXCERPT_ROWS])
    np.testing.assert_array_equal(series.y, train.y[:EXCERPT_ROWS])


def test_load_ucr_accepts_str_path(reference):
    series = load_ucr(str(EXCERPT))

    np.testing.assert_array_equal(series.x, reference[:, 1:].astype(np.float32))


def test_load_ucr_comma_separated(tmp_path, reference):
    path = write_lines(tmp_path / "ECG5000_TRAIN.csv", [",".join(line.split()) for line in excerpt_lines()])

    series = load_ucr(path)

    np.testing.assert_array_equal(series.x, reference[:, 1:].astype(np.float32))
    np.testing.assert_array_equal(series.y, reference[:, 0].astype(np.int64))


def test_load_ucr_tsv(tmp_path, reference):
    path = write_lines(tmp_path / "ECG5000_TRAIN.tsv", ["\t".join(line.split()) for line in excerpt_lines()])

    series = load_ucr(path)

    np.testing.assert_array_equal(series.x, reference[:, 1:].astype(np.float32))
    np.testing.assert_array_equal(series.y, reference[:, 0].astype(np.int64))


def test_load_ucr_gzip(tmp_path, reference):
    path = tmp_path / "ECG5000_TRAIN.txt.gz"
    path.write_bytes(gzip.compress(EXCERPT.read_bytes()))

    series = load_ucr(path)

    np.testing.assert_array_equal(series.x, reference[:, 1:].astype(np.float32))
    np.testing.assert_array_equal(series.y, reference[:, 0].astype(np.int64))


def test_load_ucr_tsv_gzip(tmp_path, reference):
    text = "\n".join("\t".join(line.split()) for line in excerpt_lines()) + "\n"
    path = tmp_path / "ECG5000_TRAIN.tsv.gz"
    path.write_bytes(gzip.compress(text.encode("utf-8")))

    series = load_ucr(path)

    np.testing.assert_array_equal(series.x, reference[:, 1:].astype(np.float32))


def test_load_ucr_crlf_and_blank_lines(tmp_path, reference):
    lines = excerpt_lines()
    text = "\r\n".join(lines[:5] + [""] + lines[5:]) + "\r\n\r\n"
    path = tmp_path / "ECG5000_TRAIN.txt"
    path.write_bytes(text.encode("utf-8"))

    series = load_ucr(path)

    np.testing.assert_array_equal(series.x, reference[:, 1:].astype(np.float32))


def test_load_ucr_field_count_names_line(tmp_path):
    lines = excerpt_lines()
    lines[6] = " ".join(lines[6].split()[:-1])
    path = write_lines(tmp_path / "short.txt", lines)

    expected = re.escape(f"{path}:7: 140 fields, but the first line has 141")
    with pytest.raises(InvalidInputError, match=expected):
        load_ucr(path)


def test_load_ucr_nan_sample(tmp_path):
    lines = excerpt_lines()
    fields = lines[4].split()
    fields[30] = "NaN"
    lines[4] = " ".join(fields)
    path = write_lines(tmp_path / "nan.txt", lines)

    with pytest.raises(InvalidInputError, match=r"series 5 contains NaN samples"):
        load_ucr(path)


def test_load_ucr_non_numeric_field(tmp_path):
    lines = excerpt_lines()
    fields = lines[2].split()
    fields[10] = "abc"
    lines[2] = " ".join(fields)
    path = write_lines(tmp_path / "text.txt", lines)

    expected = re.escape(f"{path}:3: non-numeric field") + r".*'abc'"
    with pytest.raises(InvalidInputError, match=expected):
        load_ucr(path)


def test_load_ucr_non_integer_label(tmp_path):
    lines = excerpt_lines()
    lines[1] = "1.5 " + " ".join(lines[1].split()[1:])
    path = write_lines(tmp_path / "label.txt", lines)

    with pytest.raises(InvalidInputError, match=r"label 1\.5 on series 2 is not an integer"):
        load_ucr(path)


def test_load_ucr_too_few_samples(tmp_path):
    path = write_lines(tmp_path / "tiny.txt", ["1 0.5", "1 0.7"])

    with pytest.raises(InvalidInputError, match=r"tiny.txt:1: a label and at least 2 samples are needed"):
        load_ucr(path)


def test_load_ucr_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")

    with pytest.raises(InvalidInputError, match=r"empty.txt contains no series"):
        load_ucr(path)


def test_load_ucr_blank_file(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\t\n", encoding="utf-8")

    with pytest.raises(InvalidInputError, match=r"blank.txt contains no series"):
        load_ucr(path)


def test_load_ucr_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match=r"UCR file .*ECG5000_TRAIN.txt not found"):
        load_ucr(tmp_path / "ECG5000_TRAIN.txt")


def test_load_ucr_directory(tmp_path):
    with pytest.raises(InvalidInputError, match=r"not found"):
        load_ucr(tmp_path)


def test_pack_ucr_pair_round_trip(tmp_path, reference):
    lines = excerpt_lines()
    train_path = write_lines(tmp_path / "TRAIN.txt", lines[:12])
    test_path = write_lines(tmp_path / "TEST.txt", lines[12:])

    output = pack_ucr_pair(train_path, test_path, tmp_path / "pair.npz")

    with np.load(output) as archive:
        assert archive["train_x"].shape == (12, 140)
        assert archive["test_x"].shape == (8, 140)
        assert archive["train_x"].dtype == np.float32
        assert archive["train_y"].dtype == np.int8
        np.testing.assert_array_equal(archive["train_x"], reference[:12, 1:].astype(np.float32))
        np.testing.assert_array_equal(archive["test_x"], reference[12:, 1:].astype(np.float32))
        np.testing.assert_array_equal(archive["test_y"], reference[12:, 0].astype(np.int8))


@pytest.fixture(scope="module")
def ecg5000():
    return load_ecg5000()


def test_ecg5000_shapes(ecg5000):
    train, test = ecg5000

    assert train.x.shape == (500, 140)
    assert train.y.shape == (500,)
    assert test.x.shape == (4500, 140)
    assert test.y.shape == (4500,)


def test_ecg5000_dtypes(ecg5000):
    train, test = ecg5000

    assert train.x.dtype == np.float32
    assert test.x.dtype == np.float32
    assert train.y.dtype == np.int64
    assert test.y.dtype == np.int64


def test_ecg5000_class_counts(ecg5000):
    train, test = ecg5000

    assert class_counts(train.y) == TRAIN_CLASS_COUNTS
    assert class_counts(test.y) == TEST_CLASS_COUNTS


def test_ecg5000_values_finite_in_range(ecg5000):
    train, test = ecg5000
    samples = np.concatenate([train.x, test.x])

    assert np.all(np.isfinite(samples))
    assert samples.min() == np.float32(-7.0903741)
    assert samples.max() == np.float32(7.4021031)


def test_ecg5000_no_shared_rows(ecg5000):
    train, test = ecg5000
    train_rows = {row.tobytes() for row in train.x}
    test_rows = {row.tobytes() for row in test.x}

    assert len(train_rows) == 500
    assert len(test_rows) == 4500
    assert train_rows.isdisjoint(test_rows)


@needs_full_data
def test_excerpt_is_train_head():
    head = b"".join(FULL_TRAIN.read_bytes().splitlines(keepends=True)[:EXCERPT_ROWS])

    assert EXCERPT.read_bytes() == head


@needs_full_data
def test_ecg5000_train_equals_ucr_file(ecg5000):
    train, _ = ecg5000
    full = load_ucr(FULL_TRAIN)

    np.testing.assert_array_equal(train.x, full.x.astype(np.float32))
    np.testing.assert_array_equal(train.y, full.y)


@needs_full_data
def test_ecg5000_test_equals_ucr_file(ecg5000):
    _, test = ecg5000
    full = load_ucr(FULL_TEST)

    np.testing.assert_array_equal(test.x, full.x.astype(np.float32))
    np.testing.assert_array_equal(test.y, full.y)
