"""Read windows from a serial port (or a file in the same text format) and score them.

Wire format: ASCII text lines ending in ``\\n`` (a trailing ``\\r`` is ignored) holding
numbers separated by commas, spaces, tabs or semicolons. Two modes:

``beat``
    One window per line with exactly ``window_length`` values.
``samples``
    One sample per line. A windower cuts windows of ``window_length`` samples every
    ``hop`` samples.

Binary framing (``framing="binary"``, or ``"auto"`` when the first bytes show it) reads
COBS frames of :mod:`anomalyforge.firmware_bridge.protocol` instead of lines; windows
are then cut by the device's sample index, and lost samples are counted.

A malformed line (wrong number of values, a non-numeric field, NaN / inf, or longer than
``max_line_bytes``) is logged (rate-limited), counted by reason and skipped. The windows
already accepted are kept and the stream goes on. A line longer than the limit is
discarded up to its newline, so a sender that never sends a newline cannot make the
reader buffer without bound.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from anomalyforge.device.backends import MissingDependencyError
from anomalyforge.errors import BundleError, InvalidInputError, SerialPortError
from anomalyforge.signal import check_windows, resample_beat

logger = logging.getLogger(__name__)

MODES = ("beat", "samples")
FRAMINGS = ("text", "binary", "auto")
# Auto framing decides on the first bytes: a 0x00 before any complete printable line means
# binary frames, a complete line of printable ASCII means text. Without either after this
# many bytes it chooses text, whose parser then rejects the over-long line.
AUTO_DETECT_MAX_BYTES = 2048
TEXT_BYTES = bytes(range(0x20, 0x7F)) + b"\t\r\n"
SKIP_REASONS = ("wrong_count", "non_numeric", "non_finite", "too_long", "incomplete")
# A comma or semicolon (with optional spaces around it) or a run of whitespace separates two
# values, so "1,,2" keeps its empty field and is rejected instead of read as two values.
FIELD_SEPARATORS = re.compile(r"\s*[,;]\s*|\s+")
# Bytes allowed per value when the line limit is derived from the values per line: enough
# for "-1.2345678901234567e-05," with room to spare.
BYTES_PER_VALUE = 32
MIN_MAX_LINE_BYTES = 256
DEFAULT_BAUDRATE = 115200
DEFAULT_READ_TIMEOUT_S = 0.1
# Malformed lines are logged one by one up to this count, then summarised at most once per
# SKIP_LOG_INTERVAL_S seconds.
SKIP_LOG_FIRST = 10
SKIP_LOG_INTERVAL_S = 10.0
# Latency percentiles cover at most this many of the most recent windows.
LATENCY_HISTORY = 100_000


def import_pyserial():
    """Import and return the pyserial ``serial`` module, or raise MissingDependencyError."""
    try:
        import serial
    except ImportError as error:
        raise MissingDependencyError(
            f"pyserial is not installed ({error}); the device runtime needs it to read serial "
            "ports. Install it with: pip install 'anomalyforge[device]'"
        ) from error
    return serial


def default_max_line_bytes(values_per_line: int) -> int:
    return max(MIN_MAX_LINE_BYTES, BYTES_PER_VALUE * values_per_line)


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class LineParser:
    """Split a byte stream into text lines and each line into a float64 array of values.

    Parameters
    ----------
    values_per_line : int
        Number of values a valid line holds.
    max_line_bytes : int, optional
        Longest accepted line in bytes, newline excluded. Default ``max(256, 32 * values_per_line)``.
    """

    def __init__(self, values_per_line: int, max_line_bytes: int | None = None):
        if values_per_line < 1:
            raise InvalidInputError(f"values_per_line must be at least 1, got {values_per_line}")
        self.values_per_line = values_per_line
        self.max_line_bytes = max_line_bytes or default_max_line_bytes(values_per_line)
        self.pending = bytearray()
        self.discarding = False
        self.lines_read = 0
        self.bytes_read = 0
        self.skipped: Counter = Counter()
        self.last_skip_log = float("-inf")
        self.skips_since_log = 0

    def feed(self, data: bytes) -> list[np.ndarray]:
        """Consume ``data`` and return the values of every complete valid line in it."""
        self.bytes_read += len(data)
        accepted = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                self.keep_partial(data[start:])
                return accepted
            piece = data[start:newline]
            start = newline + 1
            self.lines_read += 1
            if self.discarding:
                # This newline ends a line already counted as too long.
                self.discarding = False
                continue
            line = bytes(self.pending) + piece
            self.pending.clear()
            if len(line) > self.max_line_bytes:
                self.reject("too_long", f"{len(line)} bytes, limit {self.max_line_bytes}")
                continue
            values = self.parse(line)
            if values is not None:
                accepted.append(values)

    def keep_partial(self, tail: bytes) -> None:
        if self.discarding or not tail:
            return
        self.pending += tail
        if len(self.pending) > self.max_line_bytes:
            # The line has no newline yet, so it is the one after the last complete line.
            self.reject("too_long", f"over {self.max_line_bytes} bytes without a newline",
                        line_number=self.lines_read + 1)
            self.pending.clear()
            self.discarding = True

    def finish(self) -> None:
        """Count an unterminated last line as incomplete (the sender stopped mid-line)."""
        if self.pending.strip():
            self.reject("incomplete", f"{len(self.pending)} bytes without a final newline")
        self.pending.clear()
        self.discarding = False

    def parse(self, line: bytes) -> np.ndarray | None:
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            self.reject("non_numeric", f"non-ASCII bytes {line[:40]!r}")
            return None
        if not text:
            self.reject("empty", "no values")
            return None
        fields = FIELD_SEPARATORS.split(text)
        try:
            values = np.array(fields, dtype=np.float64)
        except ValueError:
            bad = next(index for index, field in enumerate(fields) if not is_number(field))
            self.reject("non_numeric", f"field {bad + 1} is {fields[bad][:30]!r} in {text[:60]!r}")
            return None
        if len(values) != self.values_per_line:
            self.reject("wrong_count", f"{len(values)} values, expected {self.values_per_line}")
            return None
        if not np.all(np.isfinite(values)):
            self.reject("non_finite", f"NaN or inf at value {int(np.argmax(~np.isfinite(values))) + 1}")
            return None
        return values

    def reject(self, reason: str, detail: str, line_number: int | None = None) -> None:
        """Count a skipped line; ``line_number`` (1-based) defaults to the last complete line."""
        line_number = self.lines_read if line_number is None else line_number
        self.skipped[reason] += 1
        total = sum(self.skipped.values())
        if total <= SKIP_LOG_FIRST:
            logger.warning("skipped malformed line %d (%s): %s", line_number, reason, detail)
            return
        self.skips_since_log += 1
        now = time.monotonic()
        if now - self.last_skip_log >= SKIP_LOG_INTERVAL_S:
            logger.warning(
                "skipped %d more malformed lines (totals by reason: %s); last at line %d (%s): %s",
                self.skips_since_log, dict(self.skipped), line_number, reason, detail,
            )
            self.last_skip_log = now
            self.skips_since_log = 0


class SampleWindower:
    """Cut a sample stream into windows of ``window_length`` samples every ``hop`` samples."""

    def __init__(self, window_length: int, hop: int):
        if window_length < 2:
            raise InvalidInputError(f"window_length must be at least 2, got {window_length}")
        if hop < 1:
            raise InvalidInputError(f"hop must be at least 1 sample, got {hop}")
        self.window_length = window_length
        self.hop = hop
        self.buffer: list[float] = []
        self.to_skip = 0

    def push(self, samples) -> list[np.ndarray]:
        """Add samples and return the windows they complete, oldest first."""
        windows = []
        for sample in samples:
            if self.to_skip:
                # A hop longer than the window skips the samples between windows.
                self.to_skip -= 1
                continue
            self.buffer.append(float(sample))
            if len(self.buffer) == self.window_length:
                windows.append(np.asarray(self.buffer, dtype=np.float64))
                if self.hop < self.window_length:
                    del self.buffer[: self.hop]
                else:
                    self.buffer.clear()
                    self.to_skip = self.hop - self.window_length
        return windows


class WindowReader:
    """Turn received bytes into windows in ``beat`` or ``samples`` mode.

    Parameters
    ----------
    mode : {"beat", "samples"}
        One window per line, or one sample per line.
    window_length : int
        Samples per window as received (before any resampling to the model length).
    hop : int, optional
        Samples between window starts in ``samples`` mode; ignored in ``beat`` mode.
        Default ``window_length``.
    max_line_bytes : int, optional
        Longest accepted line; see :class:`LineParser`.
    """

    def __init__(self, mode: str, window_length: int, hop: int | None = None,
                 max_line_bytes: int | None = None):
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.window_length = window_length
        if mode == "beat":
            self.parser = LineParser(window_length, max_line_bytes)
            self.windower = None
        else:
            # NOTE: a skipped line drops one sample, so the window around it is one sample
            # short of real time; windows are not restarted, so no accepted sample is lost.
            self.parser = LineParser(1, max_line_bytes)
            self.windower = SampleWindower(window_length, hop or window_length)

    def feed(self, data: bytes) -> list[np.ndarray]:
        rows = self.parser.feed(data)
        if self.windower is None:
            return rows
        if not rows:
            return []
        return self.windower.push(np.concatenate(rows))

    def finish(self) -> None:
        self.parser.finish()


def detect_framing(prefix: bytes) -> str | None:
    """Return "text", "binary" or None (undecided yet) for the first bytes of a stream."""
    newline = prefix.find(b"\n")
    zero = prefix.find(b"\x00")
    if newline >= 0 and (zero < 0 or newline < zero) and not prefix[:newline].translate(None, TEXT_BYTES):
        return "text"
    if zero >= 0:
        return "binary"
    if len(prefix) >= AUTO_DETECT_MAX_BYTES:
        return "text"
    return None


class AutoFramingReader:
    """Buffer the first bytes until :func:`detect_framing` decides, then delegate to that reader.

    Parameters
    ----------
    make_text_reader, make_binary_reader : callable
        Build the reader for each framing, with no arguments.
    """

    def __init__(self, make_text_reader: Callable[[], object], make_binary_reader: Callable[[], object]):
        self.make_text_reader = make_text_reader
        self.make_binary_reader = make_binary_reader
        self.active = None
        self.prefix = bytearray()

    @property
    def framing(self) -> str:
        return "undecided" if self.active is None else self.active.framing

    def feed(self, data: bytes) -> list[np.ndarray]:
        if self.active is not None:
            return self.active.feed(data)
        self.prefix += data
        framing = detect_framing(bytes(self.prefix))
        if framing is None:
            return []
        return self.start(framing)

    def start(self, framing: str) -> list[np.ndarray]:
        logger.info("auto framing: the stream carries %s", "binary frames" if framing == "binary" else "text lines")
        self.active = self.make_binary_reader() if framing == "binary" else self.make_text_reader()
        buffered = bytes(self.prefix)
        self.prefix.clear()
        return self.active.feed(buffered)

    def finish(self) -> None:
        if self.active is None:
            self.start("text")
        self.active.finish()


def make_reader(framing: str, mode: str, window_length: int, hop: int, max_line_bytes: int | None = None,
                model_sample_rate_hz: float | None = None):
    """Return the reader for ``framing``: WindowReader, FrameWindowReader or AutoFramingReader."""
    if framing not in FRAMINGS:
        raise InvalidInputError(f"framing must be one of {list(FRAMINGS)}, got {framing!r}")

    def make_text_reader():
        return WindowReader(mode, window_length, hop, max_line_bytes)

    def make_binary_reader():
        # Imported here so text streaming works without the cobs package.
        from anomalyforge.firmware_bridge.receiver import FrameWindowReader

        # Binary frames carry samples, so beat mode takes one window per window_length samples.
        return FrameWindowReader(window_length, hop if mode == "samples" else window_length,
                                 model_sample_rate_hz)

    if framing == "text":
        return make_text_reader()
    if framing == "binary":
        return make_binary_reader()
    return AutoFramingReader(make_text_reader, make_binary_reader)


def record_reader_totals(summary: StreamSummary, reader) -> None:
    """Copy the counters of a text, binary or auto reader into ``summary``."""
    reader = getattr(reader, "active", reader)
    if reader is None:
        summary.framing = "undecided"
        return
    summary.framing = getattr(reader, "framing", "text")
    if summary.framing == "text":
        summary.lines_read = reader.parser.lines_read
        summary.bytes_read = reader.parser.bytes_read
        summary.skipped = dict(reader.parser.skipped)
        return
    stats = reader.stats
    summary.bytes_read = stats.bytes_received
    summary.frames = stats.frames_accepted
    summary.samples_lost = stats.samples_lost
    summary.link = stats.to_dict()
    summary.link["windows_skipped"] = reader.windower.windows_skipped if reader.windower is not None else 0
    summary.link["messages"] = dict(reader.messages)
    if reader.hello is not None:
        summary.device = {
            "firmware_version": ".".join(str(part) for part in reader.hello.firmware_version),
            "sample_rate_hz": reader.hello.sample_rate_hz,
            "channels": reader.hello.channels,
            "sample_format": reader.hello.sample_format,
        }


@dataclass
class StreamSummary:
    """Totals of one streaming run, with latencies in microseconds (preprocessing + inference)."""

    port: str
    mode: str
    windows: int = 0
    anomalies: int = 0
    lines_read: int = 0
    skipped: dict = field(default_factory=dict)
    bytes_read: int = 0
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    stop_reason: str = ""
    duration_s: float = 0.0
    # Binary framing only: accepted frames, lost sample instants, the decoder's counters
    # and the device's hello.
    framing: str = "text"
    frames: int = 0
    samples_lost: int = 0
    link: dict = field(default_factory=dict)
    device: dict | None = None

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Return a one-paragraph human-readable summary."""
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        latency = "n/a"
        if self.latency_p50_us is not None:
            latency = f"p50 {self.latency_p50_us:.0f} us, p99 {self.latency_p99_us:.0f} us"
        if self.framing == "binary":
            link = self.link
            return (
                f"stream summary ({self.port}, binary frames, stopped: {self.stop_reason}): "
                f"{self.windows} windows, {self.anomalies} anomalies, {self.frames} frames accepted, "
                f"{link.get('frames_missed', 0)} frames and {self.samples_lost} samples lost, "
                f"{link.get('crc_failures', 0)} CRC failures, {link.get('bytes_discarded', 0)} bytes "
                f"discarded, {link.get('device_restarts', 0)} device restarts, {self.bytes_read} bytes "
                f"in {self.duration_s:.1f} s, latency {latency}"
            )
        return (
            f"stream summary ({self.port}, {self.mode} mode, stopped: {self.stop_reason}): "
            f"{self.windows} windows, {self.anomalies} anomalies, {self.lines_read} lines read, "
            f"skipped lines: {skipped}, {self.bytes_read} bytes in {self.duration_s:.1f} s, "
            f"latency {latency}"
        )


def open_port(port: str, baudrate: int = DEFAULT_BAUDRATE, timeout: float = DEFAULT_READ_TIMEOUT_S):
    """Open a serial device path or pyserial URL (``loop://``, ``socket://HOST:PORT``, ...).

    Raises
    ------
    SerialPortError
        If the port does not exist, is busy or cannot be configured.
    """
    serial = import_pyserial()
    try:
        return serial.serial_for_url(port, baudrate=baudrate, timeout=timeout)
    except (serial.SerialException, ValueError, OSError) as error:
        raise SerialPortError(
            f"cannot open serial port {port!r}: {error}. Check that the device is connected and "
            "the path is right (for example /dev/ttyUSB0 or /dev/ttyACM0), that your user may "
            "open it (the 'dialout' group on Linux), or pass a pyserial URL such as socket://HOST:PORT"
        ) from error


def read_port(handle, reader: WindowReader, on_windows: Callable[[list[np.ndarray]], bool],
              idle_timeout_s: float | None) -> str:
    """Read from an open port into ``reader`` until ``on_windows`` returns False or the port stops.

    ``on_windows`` gets each batch of new windows and returns False to stop. Returns the
    stop reason: "done", "disconnected", "idle_timeout" or "interrupted".
    """
    serial = import_pyserial()
    last_data = time.monotonic()
    try:
        while True:
            try:
                data = handle.read(handle.in_waiting or 1)
            except (serial.SerialException, OSError) as error:
                # On Linux a pty whose device side closed reports readiness and then returns
                # no data, which pyserial raises as SerialException.
                logger.info("serial port %s stopped delivering data: %s", handle.port, error)
                return "disconnected"
            now = time.monotonic()
            if data:
                last_data = now
                windows = reader.feed(data)
                if windows and not on_windows(windows):
                    return "done"
            elif idle_timeout_s is not None and now - last_data >= idle_timeout_s:
                logger.info("no data on %s for %.1f s, so the stream stops", handle.port, idle_timeout_s)
                return "idle_timeout"
    except KeyboardInterrupt:
        logger.info("interrupted while reading %s", handle.port)
        return "interrupted"
    finally:
        reader.finish()


def make_emitter(on_window) -> Callable[[dict], None] | None:
    """Wrap ``on_window`` (None, a callable taking a dict, or a text stream) as a callable."""
    if on_window is None:
        return None
    if hasattr(on_window, "write"):
        def write_line(record: dict) -> None:
            on_window.write(json.dumps(record) + "\n")
            on_window.flush()
        return write_line
    if callable(on_window):
        return on_window
    raise InvalidInputError(
        f"on_window must be a callable or a text stream with write(), got {type(on_window).__name__}"
    )


def stream_port(detector, port: str, mode: str = "beat", window_length: int | None = None,
                hop: int | None = None, baudrate: int = DEFAULT_BAUDRATE, max_windows: int | None = None,
                idle_timeout_s: float | None = None, on_window=None, on_open: Callable[[], None] | None = None,
                max_line_bytes: int | None = None, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                summary_stream: TextIO | None = sys.stderr, framing: str = "auto",
                sample_rate_hz: float | None = None) -> StreamSummary:
    """Score every window read from a serial port until the stream stops, and return the totals.

    Parameters
    ----------
    detector : DeviceDetector
        Scores windows. It must have a threshold.
    port : str
        Device path (``/dev/ttyUSB0``) or pyserial URL (``loop://``, ``socket://HOST:PORT``).
    mode : {"beat", "samples"}, default="beat"
        One window per line, or one sample per line cut into windows.
    window_length : int, optional
        Samples per received window; default the bundle's ``task.window_length``. A length
        other than the model's is linearly resampled to it, the way ECG5000 beats were.
    hop : int, optional
        Samples between window starts in ``samples`` mode; default the bundle's
        ``task.hop``, else ``window_length``.
    baudrate : int, default=115200
        Line speed in bits per second (ignored by pseudo-terminals and network URLs).
    max_windows : int, optional
        Stop after this many windows.
    idle_timeout_s : float, optional
        Stop after this many seconds without a received byte.
    on_window : callable or text stream, optional
        Called with a dict (``index``, ``score``, ``is_anomaly``, ``threshold``,
        ``latency_us``) for each window; a text stream gets it as one JSON line.
    on_open : callable, optional
        Called once the port is open and its input was flushed, for example to tell a
        simulated device it may start sending.
    max_line_bytes : int, optional
        Longest accepted line; see :class:`LineParser`.
    read_timeout_s : float, default=0.1
        Serial read timeout: the granularity of ``idle_timeout_s``.
    summary_stream : text stream or None, default=sys.stderr
        Where the summary is printed at the end; None prints nothing.
    framing : {"auto", "text", "binary"}, default="auto"
        Text lines, binary COBS frames, or detect which from the first bytes. With binary
        frames each window record also contains ``sample_index`` (the device sample index of
        its first sample) and ``samples_lost`` (the running total), windows are cut every
        ``hop`` samples of the device index (every ``window_length`` in beat mode), and
        the device's hello sets the sample rate.

    sample_rate_hz : float, optional
        Sample rate of the raw ECG in ``raw-ecg`` mode (one sample per line, beats cut
        around detected R peaks; see :mod:`anomalyforge.device.raw_ecg`). Other modes
        ignore it.

    Returns
    -------
    StreamSummary

    Raises
    ------
    SerialPortError
        If the port cannot be opened.
    BundleError
        If the detector has no threshold.
    """
    if mode == "raw-ecg":
        from anomalyforge.device.raw_ecg import stream_raw_ecg_port

        return stream_raw_ecg_port(detector, port, sample_rate_hz, baudrate=baudrate, max_windows=max_windows,
                                   idle_timeout_s=idle_timeout_s, on_window=on_window, on_open=on_open,
                                   max_line_bytes=max_line_bytes, read_timeout_s=read_timeout_s,
                                   summary_stream=summary_stream)
    if detector.threshold is None:
        raise BundleError(
            f"detector {detector.name!r} in {detector.bundle.source} has no threshold; set one "
            "with 'anomalyforge device calibrate'"
        )
    if max_windows is not None and max_windows < 1:
        raise InvalidInputError(f"max_windows must be at least 1, got {max_windows}")
    received_length, hop = resolve_windowing(detector.bundle.task, mode, window_length, hop)
    # An explicit window length is in device samples, so it is not rescaled by the hello's rate.
    model_rate = detector.bundle.task.get("sample_rate_hz") if window_length is None else None
    reader = make_reader(framing, mode, received_length, hop, max_line_bytes, model_rate)
    emit = make_emitter(on_window)
    summary = StreamSummary(port=port, mode=mode)
    latencies: deque = deque(maxlen=LATENCY_HISTORY)

    def score_windows(windows: list[np.ndarray]) -> bool:
        for window in windows:
            started = time.perf_counter_ns()
            if len(window) != detector.window_length:
                window = resample_beat(window, detector.window_length)
            score = float(detector.score(window)[0])
            latency_us = (time.perf_counter_ns() - started) / 1000.0
            latencies.append(latency_us)
            is_anomaly = score > detector.threshold
            summary.anomalies += int(is_anomaly)
            record = {
                "index": summary.windows,
                "score": score,
                "is_anomaly": bool(is_anomaly),
                "threshold": detector.threshold,
                "latency_us": round(latency_us, 1),
            }
            window_records = getattr(getattr(reader, "active", reader), "window_records", None)
            if window_records:
                record.update(window_records.popleft())
            if emit is not None:
                emit(record)
            summary.windows += 1
            if max_windows is not None and summary.windows >= max_windows:
                return False
        return True

    handle = open_port(port, baudrate, read_timeout_s)
    logger.info(
        "streaming %s in %s mode (%s framing): window_length=%d, hop=%s, detector %s (%s)",
        port, mode, framing, received_length, hop if mode == "samples" else "-", detector.name,
        detector.precision,
    )
    started = time.monotonic()
    try:
        if on_open is not None:
            on_open()
        summary.stop_reason = read_port(handle, reader, score_windows, idle_timeout_s)
    finally:
        handle.close()
        record_reader_totals(summary, reader)
        finish_summary(summary, latencies, started, summary_stream)
    return summary


def finish_summary(summary: StreamSummary, latencies, started: float, summary_stream: TextIO | None) -> None:
    """Fill in duration, latency percentiles and a stop reason, then print the summary if asked."""
    summary.duration_s = time.monotonic() - started
    if latencies:
        values = np.fromiter(latencies, dtype=np.float64)
        summary.latency_p50_us = float(np.percentile(values, 50))
        summary.latency_p99_us = float(np.percentile(values, 99))
    if summary.stop_reason == "":
        # The reading loop ended by an exception, which propagates after this summary.
        summary.stop_reason = "error"
    if summary_stream is not None:
        print(summary.format(), file=summary_stream, flush=True)


def resolve_windowing(task: dict, mode: str, window_length: int | None, hop: int | None) -> tuple[int, int]:
    """Return (window_length, hop) from the overrides, else the manifest task, with checks."""
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {list(MODES)}, got {mode!r}")
    channels = int(task.get("channels", 1))
    if channels != 1:
        raise InvalidInputError(
            f"the bundle task has {channels} channels; the serial reader handles single-channel "
            "signals only"
        )
    length = int(window_length if window_length is not None else task["window_length"])
    if length < 2:
        raise InvalidInputError(f"window length must be at least 2 samples, got {length}")
    if hop is None:
        hop = task.get("hop") or length
    hop = int(hop)
    if hop < 1:
        raise InvalidInputError(f"hop must be at least 1 sample, got {hop}")
    return length, hop


def collect_windows(port: str, n_windows: int, window_length: int, mode: str = "beat",
                    hop: int | None = None, baudrate: int = DEFAULT_BAUDRATE,
                    idle_timeout_s: float | None = None, on_open: Callable[[], None] | None = None,
                    max_line_bytes: int | None = None,
                    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> tuple[np.ndarray, StreamSummary]:
    """Read up to ``n_windows`` windows from a serial port without scoring them.

    Stops early on disconnect, ``idle_timeout_s`` or Ctrl-C; the caller checks the count.

    Returns
    -------
    windows : ndarray of shape (n_collected, window_length), float32
    summary : StreamSummary
        Lines, bytes and skipped lines; ``windows`` is the number collected.
    """
    if n_windows < 1:
        raise InvalidInputError(f"n_windows must be at least 1, got {n_windows}")
    reader = WindowReader(mode, window_length, hop, max_line_bytes)
    collected: list[np.ndarray] = []

    def keep(windows: list[np.ndarray]) -> bool:
        collected.extend(windows[: n_windows - len(collected)])
        return len(collected) < n_windows

    handle = open_port(port, baudrate, read_timeout_s)
    started = time.monotonic()
    summary = StreamSummary(port=port, mode=mode)
    try:
        if on_open is not None:
            on_open()
        summary.stop_reason = read_port(handle, reader, keep, idle_timeout_s)
    finally:
        handle.close()
    summary.duration_s = time.monotonic() - started
    summary.windows = len(collected)
    summary.lines_read = reader.parser.lines_read
    summary.bytes_read = reader.parser.bytes_read
    summary.skipped = dict(reader.parser.skipped)
    logger.info("collected %d windows from %s (%s)", len(collected), port, summary.stop_reason)
    array = np.asarray(collected, dtype=np.float32).reshape(len(collected), window_length)
    return array, summary


def read_windows_file(path, window_length: int, mode: str = "beat", hop: int | None = None,
                      max_line_bytes: int | None = None) -> np.ndarray:
    """Read windows from a ``.npy`` file of shape (n, window_length) or a text file in the wire format.

    Malformed text lines are skipped and counted the same way as on a serial port.

    Returns
    -------
    ndarray of shape (n_windows, window_length), float32
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"window file {path} not found; pass a .npy file or a text file of lines")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise InvalidInputError(f"{path} is not a plain numeric .npy array ({error})") from error
        return check_windows(array, window_length, name=f"windows in {path}")

    reader = WindowReader(mode, window_length, hop, max_line_bytes)
    windows: list[np.ndarray] = []
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            windows.extend(reader.feed(block))
    reader.finish()
    skipped = dict(reader.parser.skipped)
    if skipped:
        logger.warning("%s: skipped %d malformed lines %s", path, sum(skipped.values()), skipped)
    logger.info("read %d windows from %s (%d lines)", len(windows), path, reader.parser.lines_read)
    return np.asarray(windows, dtype=np.float32).reshape(len(windows), window_length)
