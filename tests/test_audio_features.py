"""Log-mel features: agreement with librosa, stacking, and identical training and device paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalyforge.device.audio import LogMelStream, PcmLineParser, read_audio
from anomalyforge.errors import InvalidInputError
from anomalyforge.signal import (
    apply_preprocessing,
    log_mel_features,
    log_mel_frames,
    log_mel_spec,
    log_mel_window_length,
    mel_filterbank,
    normalise_level,
    preprocessing_spec,
    stack_frames,
)

AUDIO_DIR = Path(__file__).parent / "data" / "audio"
NORMAL_WAV = AUDIO_DIR / "mimii" / "fan" / "id_00" / "normal" / "00000000.wav"
ANOMALY_WAV = AUDIO_DIR / "mimii" / "fan" / "id_00" / "abnormal" / "00000000.wav"
# Largest difference from librosa 0.11 accepted, in dB. The measured difference on the
# excerpts is about 3e-6 dB, the float32 rounding of the output.
LIBROSA_TOLERANCE_DB = 1e-3


@pytest.fixture(scope="module")
def normal_samples():
    return read_audio(NORMAL_WAV)


def test_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128)
    np.testing.assert_allclose(mel_filterbank(16000.0, 1024, 128), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("path", [NORMAL_WAV, ANOMALY_WAV], ids=["normal", "anomaly"])
def test_log_mel_matches_librosa(path):
    librosa = pytest.importorskip("librosa")
    samples = read_audio(path)
    mel = librosa.feature.melspectrogram(y=samples.astype(np.float32).astype(np.float64), sr=16000, n_fft=1024,
                                         hop_length=512, n_mels=128, power=2.0, center=False)
    expected = 10.0 * np.log10(mel + np.finfo(np.float64).eps).T
    frames = log_mel_frames(samples)
    assert frames.shape == expected.shape == (1 + (32000 - 1024) // 512, 128)
    assert np.max(np.abs(frames - expected)) < LIBROSA_TOLERANCE_DB


def test_stack_frames_order():
    frames = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    stacks = stack_frames(frames, 5)
    assert stacks.shape == (3, 15)
    np.testing.assert_array_equal(stacks[1], frames[1:6].reshape(-1))


def test_stack_frames_too_few_frames():
    assert stack_frames(np.zeros((4, 128)), 5).shape == (0, 640)


def test_default_vector_has_640_values(normal_samples):
    features = log_mel_features(normal_samples, log_mel_spec()[0])
    assert features.shape == (61 - 4, 640)
    assert features.dtype == np.float32


def test_spec_records_dcase_settings():
    step = log_mel_spec()[0]
    expected = {"n_fft": 1024, "hop_length": 512, "n_mels": 128, "power": 2.0, "n_stack": 5,
                "sample_rate_hz": 16000.0, "center": False, "fmax": 8000.0}
    for key, value in expected.items():
        assert step[key] == value, key
    assert log_mel_window_length(step) == 3072


def test_apply_preprocessing_log_mel_windows(normal_samples):
    step = log_mel_spec()[0]
    starts = [0, 512 * 3, 512 * 20]
    windows = np.stack([normal_samples[start:start + 3072] for start in starts])
    features = apply_preprocessing([step], windows)
    whole = log_mel_features(normal_samples, step)
    np.testing.assert_array_equal(features, whole[[0, 3, 20]])


def test_znormalize_spec_unchanged():
    assert preprocessing_spec() == [{"name": "znormalize", "ddof": 1, "eps": 1e-8}]


def test_unsupported_window_rejected():
    step = dict(log_mel_spec()[0], window="hamming")
    with pytest.raises(InvalidInputError, match="window='hamming' is not supported"):
        apply_preprocessing([step], np.zeros((1, 3072)))


@pytest.mark.parametrize("normalisation", ["none", "stack_mean"])
def test_stream_features_identical_to_training(normal_samples, normalisation):
    step = log_mel_spec(level_normalisation=normalisation)[0]
    expected = log_mel_features(normal_samples, step)
    stream = LogMelStream(step)
    rng = np.random.default_rng(0)
    parts, start = [], 0
    while start < len(normal_samples):
        size = int(rng.choice([1, 17, 511, 512, 777, 4096]))
        parts.append(stream.push(normal_samples[start:start + size]))
        start += size
    np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_serial_text_features_identical_to_training(normal_samples):
    step = log_mel_spec()[0]
    pcm = np.round(normal_samples * 32768).astype(np.int16)
    text = "".join(f"{value}\n" for value in pcm).encode("ascii")
    parser, stream, parts = PcmLineParser(), LogMelStream(step), []
    for start in range(0, len(text), 1000):
        parts.append(stream.push(parser.feed(text[start:start + 1000])))
    np.testing.assert_array_equal(np.concatenate(parts), log_mel_features(normal_samples, step))


def test_pcm_parser_skips_bad_lines():
    parser = PcmLineParser()
    samples = parser.feed(b"100\nabc\n40000\n-32768\n7")
    np.testing.assert_array_equal(samples * 32768, [100, -32768])
    assert parser.skipped == {"non_numeric": 1, "out_of_range": 1}
    np.testing.assert_array_equal(parser.feed(b"\n") * 32768, [7])


def test_level_normalisation_cancels_gain(normal_samples):
    step = log_mel_spec(level_normalisation="stack_mean")[0]
    plain = log_mel_features(normal_samples, step)
    louder = log_mel_features(normal_samples * 10 ** (6 / 20), step)
    np.testing.assert_allclose(louder, plain, atol=1e-3)


def test_gain_shifts_plain_features_by_gain(normal_samples):
    step = log_mel_spec()[0]
    shift = log_mel_features(normal_samples * 10 ** (6 / 20), step) - log_mel_features(normal_samples, step)
    np.testing.assert_allclose(shift, 6.0, atol=1e-3)


def test_normalise_level_rejects_unknown_mode():
    with pytest.raises(InvalidInputError, match="level_normalisation must be one of"):
        normalise_level(np.zeros((1, 640)), "clip_mean")


def test_short_signal_has_no_frames():
    assert log_mel_frames(np.zeros(1000)).shape == (0, 128)
