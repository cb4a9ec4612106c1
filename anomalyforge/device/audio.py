"""Machine-sound scoring on the device: WAV reading, streaming log-mel features, segment scores.

numpy and the standard library only; ``soundfile`` is imported when a WAV file is read,
and onnxruntime through :class:`~anomalyforge.device.detector.DeviceDetector`.

An audio bundle's detector scores one stacked log-mel vector (5 frames, 640 values with
the default settings). The device turns a sample stream into those vectors with
:class:`LogMelStream`, which computes every STFT frame exactly once and gives the same
bits as :func:`anomalyforge.signal.log_mel_features` on the whole recording.
:class:`SegmentScorer` averages (or takes the maximum of) the vector scores over a segment
of ``segment_frames`` vectors, by default one training clip, and compares that segment
score with the threshold, which was set on segment scores of the same length.

A sensor whose gain differs from the training microphone shifts every log-mel value by
the gain in dB. Calibration on the device (:func:`calibrate_audio_bundle`) can measure
that shift on local normal audio and store the correcting gain with the new threshold;
streaming then applies it to the samples before the features.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from anomalyforge.bundle import Bundle, set_threshold
from anomalyforge.device.backends import MissingDependencyError
from anomalyforge.errors import BundleError, InvalidInputError
from anomalyforge.signal import (
    LOG_MEL_STEP,
    check_log_mel_step,
    log_mel_frames,
    normalise_level,
    stack_frames,
)
from anomalyforge.thresholds import calibrate_threshold, min_normals_for

logger = logging.getLogger(__name__)

AUDIO_MODALITY = "audio-logmel"
PCM16_FULL_SCALE = 32768.0
PCM16_MIN, PCM16_MAX = -32768, 32767
AGGREGATIONS = ("mean", "max")
# A file is rejected as clipped when more than this fraction of its samples sit at the
# 16-bit limits; a few full-scale samples occur in loud but healthy recordings.
DEFAULT_MAX_CLIPPED_FRACTION = 1e-3
CLIP_LEVEL = (PCM16_FULL_SCALE - 1.0) / PCM16_FULL_SCALE
# Samples fed to the feature stream per call during WAV replay (64 ms at 16 kHz).
REPLAY_BLOCK = 1024
SAMPLE_SKIP_REASONS = ("non_numeric", "out_of_range", "too_long")
MAX_SAMPLE_LINE_BYTES = 64
POWERS_OF_TEN = 10.0 ** np.arange(7)


# ---------------------------------------------------------------------------------------
# WAV files


def import_soundfile():
    """Import and return ``soundfile``, or raise MissingDependencyError with the fix."""
    try:
        import soundfile
    except ImportError as error:
        raise MissingDependencyError(
            f"soundfile is not installed ({error}); reading WAV files needs it. Install it with: "
            "pip install soundfile"
        ) from error
    return soundfile


def read_audio(path, sample_rate_hz: float | None = 16000.0, channel: int | str = 0,
               max_clipped_fraction: float = DEFAULT_MAX_CLIPPED_FRACTION) -> np.ndarray:
    """Read a WAV file as one mono float64 signal in full scale (16-bit PCM / 32768).

    Parameters
    ----------
    path : str or Path
        Audio file readable by libsndfile (WAV, including WAVE_FORMAT_EXTENSIBLE).
    sample_rate_hz : float or None, default=16000.0
        Required sample rate. None accepts any rate.
    channel : int or "mean", default=0
        Channel to keep (0-based), or "mean" to average all channels.
    max_clipped_fraction : float, default=0.001
        Largest accepted fraction of samples at the 16-bit limits, over all channels.

    Returns
    -------
    ndarray of shape (n_samples,), float64

    Raises
    ------
    InvalidInputError
        If the file is missing, unreadable, empty, has another sample rate, lacks the
        channel, or is clipped. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"audio file {path} not found")
    soundfile = import_soundfile()
    try:
        data, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise InvalidInputError(f"cannot read audio file {path}: {error}; pass a PCM WAV file") from error
    if data.shape[0] == 0:
        raise InvalidInputError(f"audio file {path} is empty (0 samples); remove it or record it again")
    if sample_rate_hz is not None and rate != sample_rate_hz:
        raise InvalidInputError(
            f"audio file {path} has a sample rate of {rate} Hz but {sample_rate_hz:g} Hz is required; "
            f"resample it to {sample_rate_hz:g} Hz (for example: sox IN.wav -r {sample_rate_hz:g} OUT.wav)"
        )
    clipped = float(np.mean(np.abs(data) >= CLIP_LEVEL))
    if clipped > max_clipped_fraction:
        raise InvalidInputError(
            f"audio file {path} is clipped: {clipped:.2%} of its samples are at full scale (limit "
            f"{max_clipped_fraction:.2%}); record it again with less input gain, or raise "
            "max_clipped_fraction to accept it"
        )
    return select_channel(data, channel, path)


def select_channel(data: np.ndarray, channel: int | str, source) -> np.ndarray:
    """Return one channel of (n_samples, n_channels) ``data``, or their mean for ``"mean"``."""
    if channel == "mean":
        return data.mean(axis=1)
    if isinstance(channel, str) and channel.isdigit():
        channel = int(channel)
    if not isinstance(channel, (int, np.integer)) or not 0 <= channel < data.shape[1]:
        raise InvalidInputError(
            f"channel {channel!r} is not available in {source}, which has {data.shape[1]} channel(s); "
            f"pass a channel from 0 to {data.shape[1] - 1} or 'mean'"
        )
    return data[:, int(channel)].copy()


def apply_gain_db(samples, gain_db: float) -> np.ndarray:
    """Multiply a signal by ``10 ** (gain_db / 20)``; 0 dB returns it unchanged (as float64)."""
    samples = np.asarray(samples, dtype=np.float64)
    if gain_db == 0.0:
        return samples
    return samples * 10.0 ** (gain_db / 20.0)


# ---------------------------------------------------------------------------------------
# Features and scores


def audio_step(bundle: Bundle) -> dict:
    """Return the bundle's ``log_mel_stack`` preprocessing step, or raise BundleError."""
    steps = bundle.manifest.get("preprocessing", [])
    for step in steps:
        if step.get("name") == LOG_MEL_STEP:
            check_log_mel_step(step)
            return step
    raise BundleError(
        f"bundle {bundle.source} has no {LOG_MEL_STEP!r} preprocessing step (steps: "
        f"{[step.get('name') for step in steps]}), so it is not an audio bundle"
    )


def is_audio_bundle(bundle: Bundle) -> bool:
    """Return True when the bundle's task is machine sound (stacked log-mel features)."""
    return bundle.task.get("modality") == AUDIO_MODALITY


class LogMelStream:
    """Turn blocks of samples into stacked log-mel vectors, computing each frame once.

    Parameters
    ----------
    step : dict
        A ``log_mel_stack`` manifest step (see :func:`anomalyforge.signal.log_mel_spec`).
    gain_db : float, default=0.0
        Gain applied to every sample before the features.
    """

    def __init__(self, step: dict, gain_db: float = 0.0):
        self.frame_options = check_log_mel_step(step)
        self.n_fft = self.frame_options["n_fft"]
        self.hop = self.frame_options["hop_length"]
        self.n_stack = int(step["n_stack"])
        self.level_normalisation = step.get("level_normalisation", "none")
        self.gain_db = float(gain_db)
        self.pending = np.zeros(0, dtype=np.float32)
        self.recent_frames = np.zeros((0, self.frame_options["n_mels"]), dtype=np.float32)
        self.samples_seen = 0

    def push(self, samples) -> np.ndarray:
        """Add full-scale samples and return the vectors they complete, shape (n_new, n_stack * n_mels)."""
        block = apply_gain_db(samples, self.gain_db).astype(np.float32)
        self.samples_seen += len(block)
        buffer = np.concatenate([self.pending, block])
        n_frames = 1 + (len(buffer) - self.n_fft) // self.hop if len(buffer) >= self.n_fft else 0
        if n_frames == 0:
            self.pending = buffer
            return np.zeros((0, self.n_stack * self.recent_frames.shape[1]), dtype=np.float32)
        frames = log_mel_frames(buffer[:(n_frames - 1) * self.hop + self.n_fft], **self.frame_options)
        self.pending = buffer[n_frames * self.hop:]
        frames = np.concatenate([self.recent_frames, frames])
        self.recent_frames = frames[-(self.n_stack - 1):] if self.n_stack > 1 else frames[:0]
        return normalise_level(stack_frames(frames, self.n_stack), self.level_normalisation)


def score_features(detector, features: np.ndarray) -> np.ndarray:
    """Score stacked vectors with the detector's ONNX model (no raw-window preprocessing)."""
    if len(features) == 0:
        return np.zeros(0, dtype=np.float32)
    step = detector.batch_size or len(features)
    parts = [detector.run_model(features[start:start + step]) for start in range(0, len(features), step)]
    return np.concatenate(parts)


def aggregate(scores: np.ndarray, aggregation: str) -> float:
    """Reduce vector scores to one segment score: their mean or their maximum."""
    if aggregation not in AGGREGATIONS:
        raise InvalidInputError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
    return float(np.max(scores) if aggregation == "max" else np.mean(scores))


class SegmentScorer:
    """Score a sample stream per segment of ``segment_frames`` stacked vectors.

    Segment j covers vectors ``[j * hop_frames, j * hop_frames + segment_frames)``. With
    ``segment_frames=None`` the whole stream is one segment, scored by :meth:`finish`.

    Parameters
    ----------
    detector : DeviceDetector
        A detector of an audio bundle.
    segment_frames : int or None
        Vectors per segment; None scores the whole stream once (a clip).
    hop_frames : int, optional
        Vectors between segment starts; default ``segment_frames`` (no overlap).
    aggregation : {"mean", "max"}, default="mean"
    gain_db : float, default=0.0
        Gain applied to the samples before the features.
    """

    def __init__(self, detector, segment_frames: int | None, hop_frames: int | None = None,
                 aggregation: str = "mean", gain_db: float = 0.0):
        if segment_frames is not None and segment_frames < 1:
            raise InvalidInputError(f"segment_frames must be at least 1, got {segment_frames}")
        if hop_frames is not None and hop_frames < 1:
            raise InvalidInputError(f"hop_frames must be at least 1, got {hop_frames}")
        aggregate(np.zeros(1), aggregation)
        self.detector = detector
        self.features = LogMelStream(audio_step(detector.bundle), gain_db)
        self.segment_frames = segment_frames
        self.hop_frames = hop_frames or segment_frames
        self.aggregation = aggregation
        self.scores = np.zeros(0, dtype=np.float32)
        self.first_vector = 0
        self.segments = 0
        self.vectors = 0

    def push(self, samples) -> list[dict]:
        """Add samples and return a record for every segment they complete."""
        vectors = self.features.push(samples)
        if len(vectors) == 0:
            return []
        self.scores = np.concatenate([self.scores, score_features(self.detector, vectors)])
        self.vectors += len(vectors)
        if self.segment_frames is None:
            return []
        records = []
        while len(self.scores) >= self.segment_frames:
            records.append(self.record(self.scores[:self.segment_frames]))
            self.scores = self.scores[self.hop_frames:]
            self.first_vector += self.hop_frames
        return records

    def finish(self) -> list[dict]:
        """Return the whole-stream record in clip mode; in segment mode the partial tail is dropped."""
        if self.segment_frames is not None or len(self.scores) == 0:
            return []
        return [self.record(self.scores)]

    def record(self, scores: np.ndarray) -> dict:
        score = aggregate(scores, self.aggregation)
        hop_s = self.features.hop / self.features.frame_options["sample_rate_hz"]
        threshold = self.detector.threshold
        record = {
            "index": self.segments,
            "start_s": round(self.first_vector * hop_s, 4),
            "vectors": int(len(scores)),
            "score": score,
            "is_anomaly": None if threshold is None else bool(score > threshold),
            "threshold": threshold,
        }
        self.segments += 1
        return record


def bundle_segment_frames(bundle: Bundle) -> int | None:
    """Return the segment length (vectors) the workstation threshold was set on, if recorded."""
    value = bundle.task.get("segment_frames")
    return None if value is None else int(value)


def threshold_gain_db(detector) -> float:
    """Return the input gain stored by the last device calibration (0 dB when none)."""
    calibration = (detector.threshold_info or {}).get("calibration") or {}
    return float(calibration.get("input_gain_db", 0.0))


# ---------------------------------------------------------------------------------------
# WAV replay


@dataclass
class AudioStreamSummary:
    """Totals of an audio stream or replay."""

    source: str
    samples: int = 0
    vectors: int = 0
    segments: int = 0
    anomalies: int = 0
    audio_s: float = 0.0
    duration_s: float = 0.0
    realtime_factor: float | None = None
    skipped: dict = field(default_factory=dict)
    stop_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        factor = "n/a" if self.realtime_factor is None else f"{self.realtime_factor:.1f}x real time"
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        return (
            f"audio summary ({self.source}, stopped: {self.stop_reason}): {self.segments} segments, "
            f"{self.anomalies} anomalies, {self.vectors} feature vectors from {self.samples} samples "
            f"({self.audio_s:.1f} s of audio in {self.duration_s:.2f} s, {factor}), skipped lines: {skipped}"
        )


def replay_wav(detector, path, speed: float | None = None, channel: int | str = 0,
               segment_frames: int | None = None, hop_frames: int | None = None,
               aggregation: str = "mean", gain_db: float | None = None,
               on_segment: Callable[[dict], None] | None = None,
               max_clipped_fraction: float = DEFAULT_MAX_CLIPPED_FRACTION) -> AudioStreamSummary:
    """Play a WAV file through the device feature and scoring path.

    Parameters
    ----------
    detector : DeviceDetector
        A detector of an audio bundle.
    path : str or Path
        WAV file at the bundle's sample rate.
    speed : float or None, default=None
        Playback speed relative to real time (1.0 = real time, 10.0 = ten times faster);
        None plays as fast as the host can.
    channel : int or "mean", default=0
    segment_frames, hop_frames, aggregation
        See :class:`SegmentScorer`. ``segment_frames=None`` scores the whole file once.
    gain_db : float or None, default=None
        Input gain; None uses the gain stored by the last device calibration.
    on_segment : callable, optional
        Called with each segment record.

    Returns
    -------
    AudioStreamSummary
    """
    if speed is not None and not speed > 0:
        raise InvalidInputError(f"speed must be positive (1.0 is real time), got {speed}")
    step = audio_step(detector.bundle)
    rate = step["sample_rate_hz"]
    samples = read_audio(path, rate, channel, max_clipped_fraction)
    gain = threshold_gain_db(detector) if gain_db is None else gain_db
    scorer = SegmentScorer(detector, segment_frames, hop_frames, aggregation, gain)
    summary = AudioStreamSummary(source=str(path))
    started = time.perf_counter()
    for start in range(0, len(samples), REPLAY_BLOCK):
        block = samples[start:start + REPLAY_BLOCK]
        if speed is not None:
            due = started + (start + len(block)) / rate / speed
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        emit_records(scorer.push(block), summary, on_segment)
    emit_records(scorer.finish(), summary, on_segment)
    summary.stop_reason = "done"
    finish_summary(summary, scorer, len(samples), rate, started)
    return summary


def emit_records(records: list[dict], summary: AudioStreamSummary, on_segment) -> None:
    for record in records:
        summary.segments += 1
        summary.anomalies += int(bool(record["is_anomaly"]))
        if on_segment is not None:
            on_segment(record)


def finish_summary(summary: AudioStreamSummary, scorer: SegmentScorer, n_samples: int, rate: float,
                   started: float) -> None:
    summary.duration_s = time.perf_counter() - started
    summary.samples = int(n_samples)
    summary.vectors = scorer.vectors
    summary.audio_s = n_samples / rate
    if summary.duration_s > 0:
        summary.realtime_factor = summary.audio_s / summary.duration_s


# ---------------------------------------------------------------------------------------
# Serial text samples


def parse_integer_lines(data: bytes) -> np.ndarray | None:
    """Parse newline-terminated lines of the form ``-?[0-9]{1,6}`` with numpy alone.

    Returns the float64 values, or None when any line has another form (spaces, ``\r``,
    a decimal point, an empty line, more than 6 digits), so the caller can parse it the
    slow way. Each digit is weighted by 10 to the power of its distance from the end
    of its line, and the weighted digits are summed per line.
    """
    chars = np.frombuffer(data, dtype=np.uint8)
    is_newline = chars == 10
    ends = np.flatnonzero(is_newline)
    if len(ends) == 0:
        return np.zeros(0)
    is_digit = (chars >= 48) & (chars <= 57)
    is_minus = chars == 45
    starts = np.r_[0, ends[:-1] + 1]
    line_lengths = ends - starts
    if not np.all(is_digit | is_minus | is_newline) or line_lengths.min() < 1 or line_lengths.max() > 7:
        return None
    minus_positions = np.flatnonzero(is_minus)
    minus_lines = np.searchsorted(ends, minus_positions)
    if np.any(minus_positions != starts[minus_lines]) or np.any(line_lengths[minus_lines] < 2):
        return None
    line_of_char = np.cumsum(is_newline) - is_newline
    power = ends[line_of_char] - np.arange(len(chars)) - 1
    digits = np.flatnonzero(is_digit)
    weights = (chars[digits] - 48) * POWERS_OF_TEN[power[digits]]
    values = np.bincount(line_of_char[digits], weights=weights, minlength=len(ends))
    values[minus_lines] *= -1.0
    return values


class PcmLineParser:
    """Parse text lines holding one 16-bit PCM sample each into full-scale floats.

    Complete lines of a block are converted in one numpy call; only a block containing a
    malformed line is parsed again line by line to skip and count the bad ones (reasons:
    ``non_numeric``, ``out_of_range`` outside [-32768, 32767], ``too_long``).
    """

    def __init__(self, max_line_bytes: int = MAX_SAMPLE_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self.pending = b""
        self.lines_read = 0
        self.bytes_read = 0
        self.skipped: Counter = Counter()

    def feed(self, data: bytes) -> np.ndarray:
        """Consume bytes and return the samples of every complete valid line, float64 in full scale."""
        self.bytes_read += len(data)
        buffer = self.pending + data
        end = buffer.rfind(b"\n")
        if end < 0:
            self.pending = buffer
            if len(buffer) > self.max_line_bytes:
                self.skip("too_long", f"{len(buffer)} bytes without a newline")
                self.pending = b""
            return np.zeros(0)
        self.pending = buffer[end + 1:]
        lines = buffer[:end].split(b"\n")
        self.lines_read += len(lines)
        values = parse_integer_lines(buffer[:end + 1])
        if values is None:
            try:
                # int() strips spaces and a "\r" and rejects anything but one integer.
                values = np.array(list(map(int, lines)), dtype=np.float64)
            except ValueError:
                values = self.parse_slowly(lines)
        return self.check_range(values)

    def parse_slowly(self, lines: list[bytes]) -> np.ndarray:
        values = []
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if len(text) > self.max_line_bytes:
                self.skip("too_long", f"{len(text)} bytes")
                continue
            try:
                values.append(float(text))
            except ValueError:
                self.skip("non_numeric", repr(text[:30]))
        return np.asarray(values, dtype=np.float64)

    def check_range(self, values: np.ndarray) -> np.ndarray:
        valid = np.isfinite(values) & (values >= PCM16_MIN) & (values <= PCM16_MAX)
        if not np.all(valid):
            bad = values[~valid]
            self.skip("out_of_range", f"{len(bad)} values such as {bad[0]!r} outside [{PCM16_MIN}, {PCM16_MAX}]",
                      count=len(bad))
            values = values[valid]
        return values / PCM16_FULL_SCALE

    def skip(self, reason: str, detail: str, count: int = 1) -> None:
        total = sum(self.skipped.values())
        self.skipped[reason] += count
        if total < 10:
            logger.warning("skipped %d sample line(s) (%s): %s", count, reason, detail)


class AudioPortReader:
    """Reader for :func:`anomalyforge.device.stream.read_port`: bytes in, segment records out."""

    def __init__(self, scorer: SegmentScorer, parser: PcmLineParser):
        self.scorer = scorer
        self.parser = parser
        self.samples = 0
        self.framing = "text"

    def feed(self, data: bytes) -> list[dict]:
        samples = self.parser.feed(data)
        self.samples += len(samples)
        return self.scorer.push(samples) if len(samples) else []

    def finish(self) -> None:
        if self.parser.pending.strip():
            self.parser.skip("non_numeric", "an unterminated last line")
        self.parser.pending = b""


def stream_audio_port(detector, port: str, baudrate: int = 115200, segment_frames: int | None = None,
                      hop_frames: int | None = None, aggregation: str = "mean", gain_db: float | None = None,
                      max_segments: int | None = None, idle_timeout_s: float | None = None,
                      on_segment: Callable[[dict], None] | None = None,
                      on_open: Callable[[], None] | None = None,
                      read_timeout_s: float = 0.1) -> AudioStreamSummary:
    """Score 16-bit PCM samples (one integer per text line) read from a serial port.

    ``segment_frames`` defaults to the bundle's ``task.segment_frames`` (one training clip),
    so the threshold applies to segments of the length it was set on. Stops on
    disconnect, ``idle_timeout_s``, Ctrl-C or after ``max_segments``.
    """
    from anomalyforge.device.stream import open_port, read_port

    step = audio_step(detector.bundle)
    if segment_frames is None:
        segment_frames = bundle_segment_frames(detector.bundle)
    gain = threshold_gain_db(detector) if gain_db is None else gain_db
    reader = AudioPortReader(SegmentScorer(detector, segment_frames, hop_frames, aggregation, gain),
                             PcmLineParser())
    summary = AudioStreamSummary(source=port)

    def on_records(records: list[dict]) -> bool:
        emit_records(records, summary, on_segment)
        return max_segments is None or summary.segments < max_segments

    handle = open_port(port, baudrate, read_timeout_s)
    logger.info("streaming audio samples from %s: segment_frames=%s, aggregation=%s, gain %.2f dB",
                port, segment_frames, aggregation, gain)
    started = time.perf_counter()
    try:
        if on_open is not None:
            on_open()
        summary.stop_reason = read_port(handle, reader, on_records, idle_timeout_s)
    finally:
        handle.close()
        emit_records(reader.scorer.finish(), summary, on_segment)
        summary.skipped = dict(reader.parser.skipped)
        finish_summary(summary, reader.scorer, reader.samples, step["sample_rate_hz"], started)
    return summary


def collect_audio_port(port: str, seconds: float, sample_rate_hz: float, baudrate: int = 115200,
                       idle_timeout_s: float | None = None, on_open: Callable[[], None] | None = None,
                       read_timeout_s: float = 0.1) -> np.ndarray:
    """Record ``seconds`` of 16-bit PCM text samples from a serial port as full-scale floats."""
    from anomalyforge.device.stream import open_port, read_port

    wanted = int(round(seconds * sample_rate_hz))
    if wanted < 1:
        raise InvalidInputError(f"seconds must give at least one sample, got {seconds}")
    parser = PcmLineParser()
    parts: list[np.ndarray] = []

    class Collector:
        def feed(self, data: bytes) -> list[bool]:
            parts.append(parser.feed(data))
            return [True] if sum(len(part) for part in parts) >= wanted else []

        def finish(self) -> None:
            parser.pending = b""

    handle = open_port(port, baudrate, read_timeout_s)
    try:
        if on_open is not None:
            on_open()
        reason = read_port(handle, Collector(), lambda _: False, idle_timeout_s)
    finally:
        handle.close()
    samples = np.concatenate(parts)[:wanted] if parts else np.zeros(0)
    logger.info("recorded %d samples (%.1f s) from %s (%s)", len(samples), len(samples) / sample_rate_hz,
                port, reason)
    return samples


# ---------------------------------------------------------------------------------------
# Calibration on the device


def segment_scores(detector, recordings: Iterable[np.ndarray], segment_frames: int | None,
                   hop_frames: int | None, aggregation: str, gain_db: float) -> np.ndarray:
    """Score every segment of every recording (each recording starts a new stream)."""
    scores = []
    for samples in recordings:
        scorer = SegmentScorer(detector, segment_frames, hop_frames, aggregation, gain_db)
        records = scorer.push(samples) + scorer.finish()
        scores.extend(record["score"] for record in records)
    return np.asarray(scores, dtype=np.float64)


def mean_level_db(recordings: Iterable[np.ndarray], step: dict) -> float:
    """Return the mean log-mel value in dB (before level normalisation) over all frames."""
    options = check_log_mel_step(step)
    means = [log_mel_frames(samples, **options).mean(dtype=np.float64) for samples in recordings]
    return float(np.mean(means))


def calibrate_audio_bundle(bundle_dir, recordings: list[np.ndarray], detector: str | None = None,
                           precision: str = "fp32", target_fpr: float = 0.01,
                           segment_frames: int | None = None, hop_frames: int | None = None,
                           aggregation: str = "mean", match_level: bool = True, n_generated: int = 1000,
                           seed: int = 0, input_description: str = "normal recordings passed by the caller",
                           threads: int = 1) -> dict:
    """Set an audio detector's threshold from normal recordings made on this device.

    Steps: (1) with ``match_level``, estimate the sensor gain as the bundle's reference
    log-mel level minus the level of the local normals and apply it to every sample;
    (2) score the normal segments; (3) set the threshold with the conformal rule; (4)
    score vectors generated by the bundle's decoder, if any, as a sanity check; (5) write
    the threshold, with the gain, into the bundle.

    Parameters
    ----------
    bundle_dir : str or Path
        Audio bundle directory (a zip cannot be written).
    recordings : list of ndarray of shape (n_samples,)
        Normal audio in full scale at the bundle's sample rate, one array per recording.
    target_fpr : float in (0, 1), default=0.01
        Needs at least ``ceil(1 / target_fpr - 1)`` segments (99 for 0.01).
    segment_frames : int, optional
        Vectors per segment; default the bundle's ``task.segment_frames``. Each recording
        shorter than one segment contributes nothing.
    match_level : bool, default=True
        Correct a constant gain difference between this sensor and the training data.
        This assumes the machine runs as loud as during training: it cannot tell a
        quieter sensor from a quieter machine.

    Returns
    -------
    dict
        ``threshold`` (the new record), ``previous_threshold``, ``input_gain_db``,
        ``n_segments``, ``detection_rate`` on generated vectors (None without a decoder or
        with ``n_generated=0``) and ``normal_score_quantiles``.
    """
    from anomalyforge.bundle import load_bundle
    from anomalyforge.device.detector import DeviceDetector

    bundle = load_bundle(bundle_dir)
    if bundle.temporary is not None:
        raise BundleError(f"{bundle_dir} is a zip file; unpack it and calibrate the directory")
    if not 0.0 < target_fpr < 1.0:
        raise InvalidInputError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    scorer = DeviceDetector.from_bundle(bundle, name=detector, precision=precision, threads=threads,
                                        warn_on_threshold_mismatch=False)
    step = audio_step(bundle)
    recordings = [np.asarray(samples, dtype=np.float64) for samples in recordings]
    if segment_frames is None:
        segment_frames = bundle_segment_frames(bundle)

    # 1. Sensor gain from the level of the local normals.
    gain_db = 0.0
    reference = bundle.task.get("reference_level_db")
    if match_level:
        if reference is None:
            raise BundleError(
                f"bundle {bundle.source} records no task.reference_level_db, so the sensor gain cannot "
                "be matched; calibrate with match_level=False (--no-match-level)"
            )
        gain_db = float(reference) - mean_level_db(recordings, step)
        logger.info("sensor gain correction %+.2f dB (reference level %.2f dB)", gain_db, reference)

    # 2. Score the normal segments.
    normal_scores = segment_scores(scorer, recordings, segment_frames, hop_frames, aggregation, gain_db)
    needed = min_normals_for(target_fpr)
    if len(normal_scores) < needed:
        raise InvalidInputError(
            f"{len(normal_scores)} normal segments are too few for a target false-positive rate of "
            f"{target_fpr}: at least {needed} are needed. Record more normal audio, use shorter or "
            "overlapping segments, or raise the target false-positive rate"
        )

    # 3. Threshold from the normal scores alone.
    threshold = calibrate_threshold(normal_scores, target_fpr, source="device")

    # 4. Generated anomalies (feature vectors) scored by the same model.
    detection_rate = None
    if n_generated > 0 and any(model.get("role") == "decoder" for model in bundle.manifest["models"].values()):
        vectors = generate_vectors(bundle, n_generated, seed, threads)
        detection_rate = float(np.mean(score_features(scorer, vectors) > threshold.value))

    # 5. Write it with the gain and segmentation the device must use.
    record = threshold.to_dict()
    record["precision"] = precision
    record["calibration"] = {
        "input": input_description,
        "precision": precision,
        "n_normals": int(len(normal_scores)),
        "n_recordings": len(recordings),
        "segment_frames": segment_frames,
        "hop_frames": hop_frames,
        "aggregation": aggregation,
        "input_gain_db": gain_db,
        "n_generated": int(n_generated) if detection_rate is not None else 0,
        "seed": int(seed),
        "generated_detection_rate": detection_rate,
        "set_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    previous = scorer.threshold_info
    set_threshold(bundle.root, scorer.name, record)
    logger.info("threshold of %s set to %.6g from %d normal segments (gain %+.2f dB)",
                scorer.name, threshold.value, len(normal_scores), gain_db)
    return {
        "bundle": str(bundle.root),
        "detector": scorer.name,
        "precision": precision,
        "threshold": record,
        "previous_threshold": previous,
        "input_gain_db": gain_db,
        "n_segments": int(len(normal_scores)),
        "detection_rate": detection_rate,
        "normal_score_quantiles": {str(q): float(np.quantile(normal_scores, q)) for q in (0.5, 0.9, 0.99)},
    }


def generate_vectors(bundle: Bundle, n_generated: int, seed: int, threads: int = 1) -> np.ndarray:
    """Generate anomalous feature vectors with the bundle's fp32 decoder through onnxruntime.

    z is drawn from N(0, I) with ``numpy.random.default_rng(seed)`` and the conditions
    cycle through the decoder's classes. The decoder of an audio bundle outputs stacked
    log-mel vectors, not raw audio, so they go to the detector model directly.
    """
    from anomalyforge.device.backends import OnnxRuntimeBackend
    from anomalyforge.device.calibrate import find_decoder

    name, model = find_decoder(bundle)
    classes, latent_dim = list(model.get("classes") or []), model.get("latent_dim")
    if not classes or not isinstance(latent_dim, int) or latent_dim < 1:
        raise BundleError(f"decoder {name!r} in {bundle.source} lacks 'classes' or 'latent_dim'; re-export the bundle")
    entry = model["formats"]["onnx-fp32"]
    backend = OnnxRuntimeBackend(bundle.path_of(entry), entry, threads=threads)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_generated, latent_dim)).astype(np.float32)
    conditions = np.eye(len(classes), dtype=np.float32)[np.arange(n_generated) % len(classes)]
    return np.asarray(backend.run({"z": z, "condition": conditions})[0], dtype=np.float32)


def write_json_line(stream) -> Callable[[dict], None]:
    """Return a callback writing each record as one JSON line to ``stream``."""
    def write(record: dict) -> None:
        stream.write(json.dumps(record) + "\n")
        stream.flush()
    return write
