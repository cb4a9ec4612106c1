"""Streaming Pan-Tompkins QRS detection and beat extraction on real MIT-BIH excerpts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalyforge.errors import InvalidInputError
from anomalyforge.signal import (
    StreamingBeatExtractor,
    StreamingQRSDetector,
    beat_window_samples,
    detect_qrs,
    extract_beats,
    qrs_beat_spec,
)
from anomalyforge.training.mitbih import BEAT_SYMBOLS, qrs_scores

EXCERPT = Path(__file__).parent / "data" / "mitbih_first_minute.npz"
FS = 360.0


def load_excerpt(record: str):
    """Return (signal in mV, beat annotation samples, symbols) of the first minute of ``record``."""
    data = np.load(EXCERPT)
    signal = (data[f"adc_{record}"].astype(np.float64) - 1024) / 200.0
    samples, symbols = data[f"ann_sample_{record}"], data[f"ann_symbol_{record}"]
    beats = np.isin(symbols, list(BEAT_SYMBOLS))
    return signal, samples[beats], symbols[beats]


@pytest.mark.parametrize("record", ["100", "208"])
def test_qrs_excerpt_sensitivity(record):
    signal, reference, _ = load_excerpt(record)
    scores = qrs_scores(detect_qrs(signal, FS), reference, FS)

    assert scores["sensitivity"] >= 0.97
    assert scores["positive_predictivity"] >= 0.99


@pytest.mark.parametrize("block_size", [1, 7, 36, 100, 4096])
def test_qrs_block_size_invariance(block_size):
    signal, _, _ = load_excerpt("208")
    whole = detect_qrs(signal, FS)

    assert np.array_equal(detect_qrs(signal, FS, block_size=block_size), whole)


def test_qrs_delay_is_bounded():
    signal, _, _ = load_excerpt("100")
    detector = StreamingQRSDetector(FS)
    reported_late = []
    for start in range(0, len(signal), 50):
        for peak in detector.push(signal[start:start + 50]):
            # Peaks of the 2 s learning phase are all reported when it ends.
            if peak > 2 * FS:
                reported_late.append(detector.samples_seen - int(peak))

    assert reported_late
    assert max(reported_late) <= detector.max_delay_samples
    assert len(detector.mwi) < 10 * FS


def test_qrs_rejects_non_finite():
    detector = StreamingQRSDetector(FS)
    with pytest.raises(InvalidInputError, match="non-finite value at sample 3"):
        detector.push([0.0, 0.1, 0.2, np.nan])


def test_qrs_flat_signal_has_no_beats():
    assert len(detect_qrs(np.full(20 * int(FS), 1.5), FS)) == 0


def test_beat_spec_checks_values():
    with pytest.raises(InvalidInputError, match="polarity must be 1 or -1"):
        qrs_beat_spec(FS, polarity=2)
    with pytest.raises(InvalidInputError, match="sample_rate_hz must be positive"):
        qrs_beat_spec(0.0)


def test_beat_window_puts_r_near_ecg5000_position():
    spec = qrs_beat_spec(FS)
    pre, post = beat_window_samples(spec)
    # ECG5000 puts the main QRS deflection at sample 3 of 140 (median over normal beats).
    assert 2.0 <= pre / (pre + post) * 140 <= 5.0


def test_extracted_beat_peaks_at_r():
    signal, reference, symbols = load_excerpt("100")
    spec = qrs_beat_spec(FS, polarity=1)
    beats, kept = extract_beats(signal, detect_qrs(signal, FS), spec, 140)

    assert beats.shape == (len(kept), 140)
    assert np.median(np.argmax(beats, axis=1)) <= 5


def test_streaming_extractor_matches_offline():
    signal, _, _ = load_excerpt("208")
    spec = qrs_beat_spec(FS)
    offline, kept = extract_beats(signal, detect_qrs(signal, FS), spec, 140)
    extractor = StreamingBeatExtractor(spec, 140)
    streamed = []
    for start in range(0, len(signal), 123):
        streamed.extend(extractor.push(signal[start:start + 123]))
    streamed.extend(extractor.finish())

    assert [peak for peak, _ in streamed] == kept.tolist()
    assert np.array_equal(np.stack([beat for _, beat in streamed]), offline)
