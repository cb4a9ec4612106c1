"""Tests for anomalyforge.signal on ECG5000 beats and hand-made windows."""

from pathlib import Path

import numpy as np
import pytest

from anomalyforge.errors import InvalidInputError
from anomalyforge.signal import (
    ZNORM_DDOF,
    apply_preprocessing,
    check_windows,
    preprocessing_spec,
    resample_beat,
    znormalize,
)
from anomalyforge.training.datasets import load_ecg5000, load_ucr

EXCERPT = Path(__file__).resolve().parent / "data" / "ecg5000_train_excerpt.txt"


@pytest.fixture(scope="module")
def ecg5000_train():
    train, _ = load_ecg5000()
    return train


def test_znormalize_mean_zero_std_one(ecg5000_train):
    # Scale and shift the beats so the test does not pass merely because UCR already
    # z-normalised them.
    windows = 3.5 * ecg5000_train.x.astype(np.float64) + 12.0
    result = znormalize(windows).astype(np.float64)

    assert result.shape == windows.shape
    assert np.max(np.abs(result.mean(axis=1))) < 1e-6
    assert np.max(np.abs(result.std(axis=1, ddof=ZNORM_DDOF) - 1.0)) < 1e-6


def test_znormalize_returns_float32(ecg5000_train):
    result = znormalize(ecg5000_train.x[:5].astype(np.float64))

    assert result.dtype == np.float32


def test_znormalize_uses_sample_std():
    window = np.array([1.0, 2.0, 3.0, 4.0])
    expected = (window - 2.5) / np.std(window, ddof=1)

    result = znormalize(window)

    assert result.shape == (1, 4)
    np.testing.assert_allclose(result[0], expected, rtol=1e-6)


def test_znormalize_idempotent_on_ecg5000(ecg5000_train):
    # UCR z-normalised every ECG5000 beat with ddof=1, so normalising again changes
    # each sample by rounding error only.
    beats = ecg5000_train.x
    once = znormalize(beats)
    twice = znormalize(once)

    assert np.max(np.abs(once - beats)) < 1e-6
    assert np.max(np.abs(twice - once)) < 1e-6


def test_znormalize_idempotent_on_excerpt():
    beats = load_ucr(EXCERPT).x

    assert np.max(np.abs(znormalize(beats) - beats)) < 1e-6


@pytest.mark.parametrize("level", [0.0, -3.7, 7.4021031, 1234.5678])
def test_znormalize_flat_window_zeros(level):
    result = znormalize(np.full((2, 140), level))

    assert np.all(np.isfinite(result))
    assert np.all(result == 0.0)


def test_znormalize_single_window_promoted():
    result = znormalize(np.arange(140, dtype=np.float64))

    assert result.shape == (1, 140)


def test_znormalize_nan_names_position(ecg5000_train):
    windows = ecg5000_train.x[:4].copy()
    windows[2, 17] = np.nan

    with pytest.raises(InvalidInputError, match=r"window 2, sample 17"):
        znormalize(windows)


def test_znormalize_inf_names_position(ecg5000_train):
    windows = ecg5000_train.x[:3].copy()
    windows[1, 139] = -np.inf

    with pytest.raises(InvalidInputError, match=r"non-finite value \(-inf\) at window 1, sample 139"):
        znormalize(windows)


def test_znormalize_wrong_ndim_names_shape():
    with pytest.raises(InvalidInputError, match=r"got shape \(2, 3, 140\)"):
        znormalize(np.zeros((2, 3, 140)))


def test_check_windows_wrong_length_names_both():
    with pytest.raises(InvalidInputError, match=r"have 100 samples per window but the model expects 140"):
        check_windows(np.zeros((3, 100)), length=140)


def test_resample_beat_keeps_endpoints(ecg5000_train):
    beat = ecg5000_train.x[0]

    for length in (2, 50, 140, 187, 360):
        result = resample_beat(beat, length)
        assert result.shape == (length,)
        assert result.dtype == np.float32
        assert result[0] == beat[0]
        assert result[-1] == beat[-1]


def test_resample_beat_same_length_identity(ecg5000_train):
    beat = ecg5000_train.x[3]

    np.testing.assert_array_equal(resample_beat(beat, beat.size), beat)


@pytest.mark.parametrize("source_length, target_length", [(2, 140), (140, 187), (360, 140), (11, 21)])
def test_resample_beat_linear_ramp_exact(source_length, target_length):
    # Linear interpolation reproduces a straight line, so the output is the same ramp
    # sampled at the new length.
    ramp = np.linspace(-2.0, 5.0, source_length)
    expected = np.linspace(-2.0, 5.0, target_length)

    result = resample_beat(ramp, target_length)

    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


def test_resample_beat_rejects_2d():
    with pytest.raises(InvalidInputError, match=r"1-D array of at least 2 samples, got shape \(2, 140\)"):
        resample_beat(np.zeros((2, 140)), 140)


def test_resample_beat_rejects_one_sample():
    with pytest.raises(InvalidInputError, match=r"got shape \(1,\)"):
        resample_beat(np.zeros(1), 140)


def test_resample_beat_rejects_short_length():
    with pytest.raises(InvalidInputError, match=r"length must be at least 2, got 1"):
        resample_beat(np.zeros(140), 1)


def test_apply_preprocessing_matches_znormalize(ecg5000_train):
    windows = 2.0 * ecg5000_train.x[:20] - 1.0

    result = apply_preprocessing(preprocessing_spec(), windows)

    np.testing.assert_array_equal(result, znormalize(windows))


def test_apply_preprocessing_empty_spec_identity(ecg5000_train):
    windows = ecg5000_train.x[:5]

    np.testing.assert_array_equal(apply_preprocessing([], windows), windows)


def test_apply_preprocessing_unknown_step():
    spec = preprocessing_spec() + [{"name": "bandpass", "low_hz": 0.5}]

    with pytest.raises(InvalidInputError, match=r"unknown preprocessing step 'bandpass'"):
        apply_preprocessing(spec, np.zeros((1, 140)))


def test_apply_preprocessing_rejects_other_ddof():
    with pytest.raises(InvalidInputError, match=r"znormalize with ddof=0 is not supported"):
        apply_preprocessing([{"name": "znormalize", "ddof": 0}], np.zeros((1, 140)))


def test_preprocessing_spec_records_parameters():
    spec = preprocessing_spec(eps=1e-6)

    assert spec == [{"name": "znormalize", "ddof": 1, "eps": 1e-6}]
