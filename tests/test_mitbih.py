"""MIT-BIH readers, QRS scoring and the raw-ECG device path streamed through a pseudo-terminal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalyforge.device.detector import DeviceDetector
from anomalyforge.device.stream import stream_port
from anomalyforge.firmware_bridge import PtySerialDevice
from anomalyforge.signal import detect_qrs, extract_beats, qrs_beat_spec
from anomalyforge.training.mitbih import (
    decode_212,
    match_beats,
    qrs_scores,
    read_record,
    read_record_numpy,
)

EXCERPT = Path(__file__).parent / "data" / "mitbih_first_minute.npz"
FULL_DATA = Path("/work/shared/data/mitbih")
needs_full_data = pytest.mark.skipif(not (FULL_DATA / "208.hea").is_file(),
                                     reason="full MIT-BIH records 100 and 208 are not on this machine")


def test_decode_212_two_signals():
    # Samples 1, -1 (0xFFF) in frame 0 and 2047, -2048 in frame 1.
    data = bytes([0x01, 0xF0, 0xFF, 0xFF, 0x87, 0x00])

    assert decode_212(data, 2).tolist() == [[1, -1], [2047, -2048]]


def test_match_beats_window():
    matches = match_beats([100, 400, 1000], [105, 300, 990], tolerance=54)

    assert matches.tolist() == [0, -1, 2]


def test_qrs_scores_counts():
    scores = qrs_scores([100, 400, 1000], [105, 300, 990], 360.0)

    assert scores["true_positives"] == 2
    assert scores["false_negatives"] == 1
    assert scores["false_positives"] == 1


def test_missing_record_names_fix(tmp_path):
    with pytest.raises(Exception, match="pass --data-dir"):
        read_record("100", tmp_path)


def stream_raw(detector, samples, sample_rate_hz=360.0):
    records = []
    lines = [f"{value:.3f}" for value in samples]
    with PtySerialDevice() as device:
        device.play_lines(lines, close_when_done=True)
        summary = stream_port(detector, device.port, mode="raw-ecg", sample_rate_hz=sample_rate_hz,
                              on_window=records.append, on_open=device.host_opened, summary_stream=None)
    return records, summary


def test_raw_ecg_stream_matches_offline(tiny_bundle):
    data = np.load(EXCERPT)
    signal = np.round((data["adc_208"][:7200].astype(np.float64) - 1024) / 200.0, 3)
    detector = DeviceDetector.from_bundle(tiny_bundle, precision="fp32")
    spec = qrs_beat_spec(360.0)
    beats, kept = extract_beats(signal, detect_qrs(signal, 360.0), spec, detector.window_length)
    offline = detector.score(beats)

    records, summary = stream_raw(detector, signal)

    assert summary.skipped == {}
    assert summary.lines_read == len(signal)
    assert [record["r_peak_sample"] for record in records] == kept.tolist()
    np.testing.assert_allclose([record["score"] for record in records], offline, rtol=1e-5, atol=1e-6)
    assert all(record["is_anomaly"] == (record["score"] > detector.threshold) for record in records)


def test_raw_ecg_stream_needs_sample_rate(tiny_bundle):
    detector = DeviceDetector.from_bundle(tiny_bundle, precision="fp32")
    with pytest.raises(Exception, match="--sample-rate"):
        stream_port(detector, "loop://", mode="raw-ecg", summary_stream=None)


@needs_full_data
@pytest.mark.parametrize("record", ["100", "208"])
def test_numpy_reader_matches_wfdb(record):
    pytest.importorskip("wfdb")
    by_wfdb = read_record(record, FULL_DATA, reader="wfdb")
    by_numpy = read_record_numpy(record, FULL_DATA)

    assert np.array_equal(by_wfdb.signal, by_numpy.signal)
    assert np.array_equal(by_wfdb.annotation_samples, by_numpy.annotation_samples)
    assert np.array_equal(by_wfdb.annotation_symbols, by_numpy.annotation_symbols)


@needs_full_data
@pytest.mark.parametrize("record, min_sensitivity", [("100", 0.995), ("208", 0.97)])
def test_full_record_qrs(record, min_sensitivity):
    data = read_record(record, FULL_DATA, reader="numpy")
    reference, _ = data.beats()
    scores = qrs_scores(detect_qrs(data.signal, data.sample_rate_hz), reference, data.sample_rate_hz)

    assert scores["sensitivity"] >= min_sensitivity
    assert scores["positive_predictivity"] >= 0.995
