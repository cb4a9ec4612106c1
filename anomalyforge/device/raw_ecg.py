"""Score a raw single-lead ECG stream beat by beat on the device (numpy, onnxruntime, pyserial).

The device receives one sample per text line. :class:`RawECGScorer` finds R peaks with the
streaming Pan-Tompkins detector of :mod:`anomalyforge.signal`, cuts a beat around each
one, resamples it to the model's window length and scores it with the bundle detector,
so it computes exactly what :func:`anomalyforge.signal.extract_beats` gives offline.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Callable, TextIO

import numpy as np

from anomalyforge.device.stream import (
    DEFAULT_BAUDRATE,
    DEFAULT_READ_TIMEOUT_S,
    LATENCY_HISTORY,
    LineParser,
    StreamSummary,
    finish_summary,
    make_emitter,
    open_port,
    read_port,
    record_reader_totals,
)
from anomalyforge.errors import BundleError, InvalidInputError
from anomalyforge.signal import QRS_STEP, StreamingBeatExtractor, qrs_beat_spec

logger = logging.getLogger(__name__)

RAW_ECG_MODE = "raw-ecg"


def raw_ecg_spec(task: dict, sample_rate_hz: float | None) -> dict:
    """Return the beat-extraction record: the bundle's ``task.raw_ecg`` if present, else the defaults.

    ``sample_rate_hz`` overrides the recorded rate; one of the two must be given.
    """
    recorded = task.get("raw_ecg")
    if recorded is not None:
        if recorded.get("name") != QRS_STEP:
            raise BundleError(f"task.raw_ecg must be a {QRS_STEP!r} record, got {recorded.get('name')!r}")
        spec = dict(recorded)
        if sample_rate_hz is not None and float(sample_rate_hz) != float(spec["sample_rate_hz"]):
            spec = qrs_beat_spec(sample_rate_hz, spec["beat_pre_s"], spec["beat_post_s"], spec.get("polarity", 1))
        return spec
    if sample_rate_hz is None:
        raise InvalidInputError(
            "raw-ecg mode needs the sample rate of the ECG; pass --sample-rate HZ (360 for MIT-BIH)"
        )
    return qrs_beat_spec(sample_rate_hz)


class RawSampleParser(LineParser):
    """A :class:`LineParser` for one value per line with a vectorised path for clean blocks.

    When every complete line in a block is a plain number, the block is converted with one
    numpy call; otherwise the block goes through the line-by-line parser, which counts and
    skips the malformed lines the same way as in ``samples`` mode.
    """

    def __init__(self, max_line_bytes: int | None = None):
        super().__init__(1, max_line_bytes)

    def feed_samples(self, data: bytes) -> np.ndarray:
        """Consume ``data`` and return the samples of its complete valid lines, float64."""
        if self.discarding:
            return self.to_array(self.feed(data))
        newline = data.rfind(b"\n")
        if newline < 0:
            return self.to_array(self.feed(data))
        complete = bytes(self.pending) + data[:newline]
        lines = complete.split(b"\n")
        try:
            values = np.array(lines, dtype=np.float64)
        except ValueError:
            return self.to_array(self.feed(data))
        if not np.all(np.isfinite(values)) or max(map(len, lines)) > self.max_line_bytes:
            return self.to_array(self.feed(data))
        self.pending.clear()
        self.bytes_read += len(data)
        self.lines_read += len(lines)
        self.keep_partial(data[newline + 1:])
        return values

    @staticmethod
    def to_array(rows: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(rows) if rows else np.zeros(0)


class RawECGReader:
    """Reader for :func:`anomalyforge.device.stream.read_port`: bytes in, sample blocks out."""

    framing = "text"

    def __init__(self, max_line_bytes: int | None = None):
        self.parser = RawSampleParser(max_line_bytes)

    def feed(self, data: bytes) -> list[np.ndarray]:
        samples = self.parser.feed_samples(data)
        return [samples] if len(samples) else []

    def finish(self) -> None:
        self.parser.finish()


class RawECGScorer:
    """Detect, cut and score beats of a raw ECG stream with a device detector.

    Parameters
    ----------
    detector : DeviceDetector
    spec : dict
        A :func:`anomalyforge.signal.qrs_beat_spec` record.

    Attributes
    ----------
    beats : int
        Beats scored so far.
    """

    def __init__(self, detector, spec: dict):
        self.detector = detector
        self.spec = spec
        self.extractor = StreamingBeatExtractor(spec, detector.window_length)
        self.beats = 0

    def push(self, samples) -> list[dict]:
        """Consume raw samples and return one record per completed beat (``r_peak_sample``, ``score``)."""
        return self.score(self.extractor.push(samples))

    def finish(self) -> list[dict]:
        """Flush the QRS detector at the end of the stream and score the last beats."""
        return self.score(self.extractor.finish())

    def score(self, beats: list[tuple[int, np.ndarray]]) -> list[dict]:
        if not beats:
            return []
        scores = self.detector.score(np.stack([beat for _, beat in beats]))
        records = []
        for (peak, _), score in zip(beats, scores):
            records.append({"index": self.beats, "r_peak_sample": int(peak), "score": float(score)})
            self.beats += 1
        return records


def stream_raw_ecg_port(detector, port: str, sample_rate_hz: float | None = None,
                        baudrate: int = DEFAULT_BAUDRATE, max_windows: int | None = None,
                        idle_timeout_s: float | None = None, on_window=None,
                        on_open: Callable[[], None] | None = None, max_line_bytes: int | None = None,
                        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                        summary_stream: TextIO | None = sys.stderr) -> StreamSummary:
    """Score every beat of a raw ECG read from a serial port, one sample per text line.

    Each beat gives one record: ``index``, ``r_peak_sample`` (index of the R peak from the
    first received sample, counting accepted lines only), ``score``, ``is_anomaly``,
    ``threshold`` and ``latency_us`` (time to score the block that completed the beat,
    divided by its beats). Other parameters as in :func:`anomalyforge.device.stream.stream_port`.
    """
    if detector.threshold is None:
        raise BundleError(
            f"detector {detector.name!r} in {detector.bundle.source} has no threshold; set one "
            "with 'anomalyforge device calibrate'"
        )
    if max_windows is not None and max_windows < 1:
        raise InvalidInputError(f"max_windows must be at least 1, got {max_windows}")
    spec = raw_ecg_spec(detector.bundle.task, sample_rate_hz)
    scorer = RawECGScorer(detector, spec)
    reader = RawECGReader(max_line_bytes)
    emit = make_emitter(on_window)
    summary = StreamSummary(port=port, mode=RAW_ECG_MODE)
    latencies: deque = deque(maxlen=LATENCY_HISTORY)

    def handle(records: list[dict], elapsed_ns: int) -> bool:
        for record in records:
            latency_us = elapsed_ns / 1000.0 / len(records)
            latencies.append(latency_us)
            is_anomaly = record["score"] > detector.threshold
            summary.anomalies += int(is_anomaly)
            record.update(is_anomaly=bool(is_anomaly), threshold=detector.threshold,
                          latency_us=round(latency_us, 1))
            if emit is not None:
                emit(record)
            summary.windows += 1
            if max_windows is not None and summary.windows >= max_windows:
                return False
        return True

    def on_samples(blocks: list[np.ndarray]) -> bool:
        started = time.perf_counter_ns()
        records = scorer.push(np.concatenate(blocks))
        return handle(records, time.perf_counter_ns() - started)

    handle_port = open_port(port, baudrate, read_timeout_s)
    logger.info("streaming %s in raw-ecg mode: %s Hz, beats %.3f s before to %.3f s after the R peak, detector %s (%s)",
                port, spec["sample_rate_hz"], spec["beat_pre_s"], spec["beat_post_s"], detector.name,
                detector.precision)
    started = time.monotonic()
    try:
        if on_open is not None:
            on_open()
        summary.stop_reason = read_port(handle_port, reader, on_samples, idle_timeout_s)
        if summary.stop_reason != "done":
            begun = time.perf_counter_ns()
            records = scorer.finish()
            handle(records, time.perf_counter_ns() - begun)
    finally:
        handle_port.close()
        record_reader_totals(summary, reader)
        finish_summary(summary, latencies, started, summary_stream)
    return summary
