"""Binary serial protocol between firmware and host: COBS frames delimited by 0x00.

Each frame on the wire is ``COBS(header + payload + CRC-32) + b"\\x00"``. All multi-byte
fields are little-endian. The header is 8 bytes: protocol version (u8), message type (u8),
sequence number (u16) and device timestamp in microseconds (u32). The CRC is CRC-32
(IEEE 802.3, as computed by :func:`zlib.crc32`) over header and payload. ``docs/protocol.md``
describes the payloads, the versioning rules and the reasons for each choice.

:class:`FrameEncoder` builds frames; :class:`FrameDecoder` turns any byte stream into
messages and counts everything it rejects in :class:`DecoderStats`. The decoder never
raises on received bytes and never buffers more than :data:`MAX_ENCODED_FRAME` bytes.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np

from anomalyforge.errors import InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DELIMITER = b"\x00"

HEADER = struct.Struct("<BBHI")
CRC = struct.Struct("<I")
MAX_PAYLOAD = 1024
MAX_BODY = HEADER.size + MAX_PAYLOAD + CRC.size
# COBS adds one code byte per started run of 254 data bytes.
MAX_ENCODED_FRAME = MAX_BODY + (MAX_BODY + 253) // 254

MSG_HELLO = 0x01
MSG_SAMPLES = 0x02
MSG_INFERENCE_RESULT = 0x03
MSG_ERROR = 0x04
MSG_HEARTBEAT = 0x05
MESSAGE_NAMES = {
    MSG_HELLO: "hello",
    MSG_SAMPLES: "samples",
    MSG_INFERENCE_RESULT: "inference_result",
    MSG_ERROR: "error",
    MSG_HEARTBEAT: "heartbeat",
}

# Wire code, numpy dtype and bytes per value of each sample format.
SAMPLE_FORMATS = {
    "int16": (1, np.dtype("<i2")),
    "float32": (2, np.dtype("<f4")),
}
SAMPLE_FORMAT_NAMES = {code: name for name, (code, _) in SAMPLE_FORMATS.items()}

HELLO_PAYLOAD = struct.Struct("<BBHfBBH")
SAMPLES_HEADER = struct.Struct("<IBBHf")
INFERENCE_PAYLOAD = struct.Struct("<IfB")
ERROR_HEADER = struct.Struct("<H")
HEARTBEAT_PAYLOAD = struct.Struct("<II")
INFERENCE_FLAG_ANOMALY = 0x01

# Error codes a firmware reports in an error message; receivers show others as numbers.
ERROR_CODES = {1: "tx_overflow", 2: "adc_overrun", 3: "sensor_fault", 4: "internal"}

SEQUENCE_MODULUS = 1 << 16
SAMPLE_INDEX_MODULUS = 1 << 32
# Rejections are logged one by one up to this count, then summarised at most once per
# REJECT_LOG_INTERVAL_S seconds.
REJECT_LOG_FIRST = 10
REJECT_LOG_INTERVAL_S = 10.0


def import_cobs():
    """Import and return the ``cobs.cobs`` module, or raise MissingDependencyError."""
    try:
        from cobs import cobs
    except ImportError as error:
        raise MissingDependencyError(
            f"the cobs package is not installed ({error}); binary serial framing needs it. "
            "Install it with: pip install 'anomalyforge[device]'"
        ) from error
    return cobs


def next_sequence(sequence: int) -> int:
    """Return the sequence number after ``sequence``: 65535 wraps to 1, because 0 marks a boot."""
    return 1 if sequence >= SEQUENCE_MODULUS - 1 else sequence + 1


def check_range(name: str, value: int, low: int, high: int) -> int:
    value = int(value)
    if not low <= value <= high:
        raise InvalidInputError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class Hello:
    """Device description sent after boot and repeated periodically.

    Attributes
    ----------
    firmware_version : tuple of int
        (major, minor, patch); major and minor in [0, 255], patch in [0, 65535].
    sample_rate_hz : float
        Samples per second and channel; 0 when the device has no fixed rate.
    channels : int
        Values per sample instant, in [1, 255].
    sample_format : {"int16", "float32"}
        Encoding of the values in samples messages.
    """

    firmware_version: tuple = (0, 0, 0)
    sample_rate_hz: float = 0.0
    channels: int = 1
    sample_format: str = "float32"

    msg_type = MSG_HELLO

    def encode_payload(self) -> bytes:
        major, minor, patch = self.firmware_version
        if self.sample_format not in SAMPLE_FORMATS:
            raise InvalidInputError(
                f"sample_format must be one of {list(SAMPLE_FORMATS)}, got {self.sample_format!r}"
            )
        if not np.isfinite(self.sample_rate_hz) or self.sample_rate_hz < 0:
            raise InvalidInputError(f"sample_rate_hz must be finite and >= 0, got {self.sample_rate_hz}")
        return HELLO_PAYLOAD.pack(
            check_range("firmware major version", major, 0, 255),
            check_range("firmware minor version", minor, 0, 255),
            check_range("firmware patch version", patch, 0, 65535),
            self.sample_rate_hz,
            check_range("channels", self.channels, 1, 255),
            SAMPLE_FORMATS[self.sample_format][0],
            0,
        )

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Hello | str:
        if len(payload) < HELLO_PAYLOAD.size:
            return f"hello payload of {len(payload)} bytes, expected at least {HELLO_PAYLOAD.size}"
        major, minor, patch, rate, channels, format_code, _ = HELLO_PAYLOAD.unpack_from(payload)
        if format_code not in SAMPLE_FORMAT_NAMES:
            return f"hello with unknown sample format code {format_code}"
        if channels < 1:
            return "hello with 0 channels"
        if not np.isfinite(rate) or rate < 0:
            return f"hello with invalid sample rate {rate}"
        return cls((major, minor, patch), float(rate), channels, SAMPLE_FORMAT_NAMES[format_code])


@dataclass(frozen=True, eq=False)
class Samples:
    """Consecutive samples, channel-interleaved on the wire.

    Attributes
    ----------
    first_index : int
        Device sample counter of the first row, in [0, 2**32 - 1]; it counts sample
        instants since boot and wraps at 2**32.
    data : ndarray of shape (n_samples, channels), int16 or float32
        Raw values as sent.
    scale : float
        Physical value = raw value * scale; 1.0 for float32 data.
    """

    first_index: int
    data: np.ndarray
    scale: float = 1.0

    msg_type = MSG_SAMPLES

    @property
    def sample_format(self) -> str:
        return "int16" if self.data.dtype == np.int16 else "float32"

    def values(self) -> np.ndarray:
        """Return the samples as float32 physical values, shape (n_samples, channels)."""
        values = self.data.astype(np.float32)
        if self.scale != 1.0:
            values *= np.float32(self.scale)
        return values

    def encode_payload(self) -> bytes:
        data = np.asarray(self.data)
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2 or data.shape[0] < 1 or not 1 <= data.shape[1] <= 255:
            raise InvalidInputError(
                f"samples data must have shape (n_samples >= 1, channels in [1, 255]), got {data.shape}"
            )
        if data.dtype == np.int16:
            format_name = "int16"
        elif data.dtype == np.float32:
            format_name = "float32"
        else:
            raise InvalidInputError(
                f"samples data must be int16 or float32, got {data.dtype}; convert it with astype()"
            )
        code, dtype = SAMPLE_FORMATS[format_name]
        header = SAMPLES_HEADER.pack(
            check_range("first_index", self.first_index, 0, SAMPLE_INDEX_MODULUS - 1),
            data.shape[1], code, 0, self.scale,
        )
        return header + data.astype(dtype, copy=False).tobytes()

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Samples | str:
        if len(payload) < SAMPLES_HEADER.size:
            return f"samples payload of {len(payload)} bytes, expected at least {SAMPLES_HEADER.size}"
        first_index, channels, format_code, _, scale = SAMPLES_HEADER.unpack_from(payload)
        if format_code not in SAMPLE_FORMAT_NAMES or channels < 1:
            return f"samples with format code {format_code} and {channels} channels"
        dtype = SAMPLE_FORMATS[SAMPLE_FORMAT_NAMES[format_code]][1]
        data_bytes = len(payload) - SAMPLES_HEADER.size
        row_bytes = channels * dtype.itemsize
        if data_bytes < row_bytes or data_bytes % row_bytes:
            return f"samples data of {data_bytes} bytes is not a whole number of {row_bytes}-byte rows"
        data = np.frombuffer(payload, dtype=dtype, offset=SAMPLES_HEADER.size).reshape(-1, channels)
        return cls(first_index, data, float(scale))


@dataclass(frozen=True)
class InferenceResult:
    """A score computed on the device for the window starting at ``window_start_index``."""

    window_start_index: int
    score: float
    is_anomaly: bool

    msg_type = MSG_INFERENCE_RESULT

    def encode_payload(self) -> bytes:
        flags = INFERENCE_FLAG_ANOMALY if self.is_anomaly else 0
        index = check_range("window_start_index", self.window_start_index, 0, SAMPLE_INDEX_MODULUS - 1)
        return INFERENCE_PAYLOAD.pack(index, self.score, flags)

    @classmethod
    def decode_payload(cls, payload: memoryview) -> InferenceResult | str:
        if len(payload) < INFERENCE_PAYLOAD.size:
            return f"inference payload of {len(payload)} bytes, expected at least {INFERENCE_PAYLOAD.size}"
        index, score, flags = INFERENCE_PAYLOAD.unpack_from(payload)
        return cls(index, float(score), bool(flags & INFERENCE_FLAG_ANOMALY))


@dataclass(frozen=True)
class ErrorMessage:
    """An error the firmware reports: a numeric code and a UTF-8 text."""

    code: int
    text: str = ""

    msg_type = MSG_ERROR

    @property
    def name(self) -> str:
        return ERROR_CODES.get(self.code, f"code_{self.code}")

    def encode_payload(self) -> bytes:
        text = self.text.encode("utf-8")
        if len(text) > MAX_PAYLOAD - ERROR_HEADER.size:
            raise InvalidInputError(
                f"error text of {len(text)} UTF-8 bytes exceeds {MAX_PAYLOAD - ERROR_HEADER.size}; shorten it"
            )
        return ERROR_HEADER.pack(check_range("error code", self.code, 0, 65535)) + text

    @classmethod
    def decode_payload(cls, payload: memoryview) -> ErrorMessage | str:
        if len(payload) < ERROR_HEADER.size:
            return f"error payload of {len(payload)} bytes, expected at least {ERROR_HEADER.size}"
        (code,) = ERROR_HEADER.unpack_from(payload)
        return cls(code, bytes(payload[ERROR_HEADER.size:]).decode("utf-8", errors="replace"))


@dataclass(frozen=True)
class Heartbeat:
    """Liveness report: the next sample index and the frames the device failed to send."""

    next_sample_index: int
    tx_frames_dropped: int = 0

    msg_type = MSG_HEARTBEAT

    def encode_payload(self) -> bytes:
        return HEARTBEAT_PAYLOAD.pack(
            check_range("next_sample_index", self.next_sample_index, 0, SAMPLE_INDEX_MODULUS - 1),
            check_range("tx_frames_dropped", self.tx_frames_dropped, 0, SAMPLE_INDEX_MODULUS - 1),
        )

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Heartbeat | str:
        if len(payload) < HEARTBEAT_PAYLOAD.size:
            return f"heartbeat payload of {len(payload)} bytes, expected at least {HEARTBEAT_PAYLOAD.size}"
        return cls(*HEARTBEAT_PAYLOAD.unpack_from(payload))


Message = Union[Hello, Samples, InferenceResult, ErrorMessage, Heartbeat]
MESSAGE_CLASSES = {cls.msg_type: cls for cls in (Hello, Samples, InferenceResult, ErrorMessage, Heartbeat)}


@dataclass(frozen=True, eq=False)
class Frame:
    """One accepted frame: header fields plus the decoded message."""

    sequence: int
    timestamp_us: int
    message: Message


def build_body(msg_type: int, payload: bytes, sequence: int, timestamp_us: int,
               version: int = PROTOCOL_VERSION) -> bytes:
    """Return header + payload + CRC-32 (the frame before COBS encoding)."""
    if len(payload) > MAX_PAYLOAD:
        raise InvalidInputError(
            f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte maximum; split the "
            "samples over several frames"
        )
    header = HEADER.pack(
        check_range("protocol version", version, 0, 255),
        check_range("message type", msg_type, 0, 255),
        check_range("sequence", sequence, 0, SEQUENCE_MODULUS - 1),
        int(timestamp_us) % SAMPLE_INDEX_MODULUS,
    )
    body = header + payload
    return body + CRC.pack(zlib.crc32(body))


def encode_frame(message: Message, sequence: int, timestamp_us: int = 0) -> bytes:
    """Return the wire bytes of one frame: COBS-encoded body followed by the 0x00 delimiter."""
    body = build_body(message.msg_type, message.encode_payload(), sequence, timestamp_us)
    return import_cobs().encode(body) + DELIMITER


class FrameEncoder:
    """Encode messages with consecutive sequence numbers, as firmware does.

    The first frame after construction (or :meth:`reset`) has sequence number 0, which
    signals to the receiver that the device booted. Later numbers run 1..65535 and wrap to 1.
    """

    def __init__(self):
        self.sequence = 0

    def reset(self) -> None:
        """Start a new boot: the next frame gets sequence number 0."""
        self.sequence = 0

    def encode(self, message: Message, timestamp_us: int = 0) -> bytes:
        frame = encode_frame(message, self.sequence, timestamp_us)
        self.sequence = next_sequence(self.sequence)
        return frame


@dataclass
class DecoderStats:
    """Counters of a :class:`FrameDecoder`.

    Attributes
    ----------
    frames_accepted : int
        Frames with a valid CRC and a well-formed payload of a known type.
    crc_failures, cobs_errors, oversize_frames : int
        Frames rejected for a CRC mismatch, an invalid COBS encoding, or more than
        MAX_ENCODED_FRAME bytes without a delimiter.
    short_frames, malformed_frames : int
        Frames too short for header and CRC, and frames with a valid CRC whose payload
        does not fit their type.
    version_mismatches, unknown_types : int
        Frames with another protocol version (rejected), and valid frames of a type this
        receiver does not know (skipped).
    bytes_received, bytes_discarded : int
        Bytes fed in, and bytes that ended up in no valid frame (rejected frames with
        their delimiter, and the partial frame before the first delimiter).
    sequence_gaps, frames_missed : int
        Jumps in the sequence number, and the frames missing in them.
    sample_gaps, samples_lost : int
        Jumps in the device sample index, and the sample instants missing in them.
    device_restarts : int
        Boots seen after the first frame (sequence 0, or a sample index that went back).
    """

    frames_accepted: int = 0
    crc_failures: int = 0
    cobs_errors: int = 0
    oversize_frames: int = 0
    short_frames: int = 0
    malformed_frames: int = 0
    version_mismatches: int = 0
    unknown_types: int = 0
    bytes_received: int = 0
    bytes_discarded: int = 0
    sequence_gaps: int = 0
    frames_missed: int = 0
    sample_gaps: int = 0
    samples_lost: int = 0
    device_restarts: int = 0

    @property
    def frames_rejected(self) -> int:
        return (self.crc_failures + self.cobs_errors + self.oversize_frames + self.short_frames
                + self.malformed_frames + self.version_mismatches)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RejectLog:
    """Rate limiter for rejection warnings: the first few one by one, then periodic summaries."""

    count: int = 0
    since_log: int = 0
    last_log: float = float("-inf")
    reasons: dict = field(default_factory=dict)

    def warn(self, reason: str, detail: str) -> None:
        self.count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.count <= REJECT_LOG_FIRST:
            logger.warning("rejected frame (%s): %s", reason, detail)
            return
        self.since_log += 1
        now = time.monotonic()
        if now - self.last_log >= REJECT_LOG_INTERVAL_S:
            logger.warning("rejected %d more frames (totals by reason: %s); last (%s): %s",
                           self.since_log, self.reasons, reason, detail)
            self.last_log = now
            self.since_log = 0


class FrameDecoder:
    """Incremental decoder: bytes in, :class:`Frame` objects out.

    :meth:`feed` accepts any chunking of the stream and returns the frames completed by
    it; a partial frame waits in a buffer of at most MAX_ENCODED_FRAME bytes. Bytes that
    form no valid frame are counted in :attr:`stats` and logged (rate-limited), never
    raised. The decoder also tracks sequence numbers and sample indexes to count lost
    frames and samples.

    Parameters
    ----------
    max_encoded_frame : int, optional
        Longest accepted frame on the wire, delimiter excluded; default MAX_ENCODED_FRAME.
    """

    def __init__(self, max_encoded_frame: int = MAX_ENCODED_FRAME):
        if max_encoded_frame < HEADER.size + CRC.size + 1:
            raise InvalidInputError(
                f"max_encoded_frame must be at least {HEADER.size + CRC.size + 1}, got {max_encoded_frame}"
            )
        self.cobs = import_cobs()
        self.max_encoded_frame = max_encoded_frame
        self.stats = DecoderStats()
        self.pending = bytearray()
        self.discarding = False
        # Until the first delimiter the decoder may have started mid-frame, so a failure of
        # the first piece is counted as discarded bytes only, not as a frame error.
        self.synchronised = False
        self.expected_sequence: int | None = None
        self.expected_sample_index: int | None = None
        self.last_hello: Hello | None = None
        self.reject_log = RejectLog()

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data`` and return the frames it completes, oldest first."""
        self.stats.bytes_received += len(data)
        frames: list[Frame] = []
        pieces = bytes(data).split(DELIMITER)
        if len(pieces) == 1:
            self.keep_partial(pieces[0])
            return frames

        first = pieces[0]
        if self.discarding:
            self.stats.bytes_discarded += len(first) + 1
            self.discarding = False
            first = b""
        elif self.pending:
            first = bytes(self.pending) + first
            self.pending.clear()
        self.handle_piece(first, frames)
        for index in range(1, len(pieces) - 1):
            self.handle_piece(pieces[index], frames)
        self.keep_partial(pieces[-1])
        return frames

    def finish(self) -> None:
        """Discard a partial frame left at the end of the stream (counted as discarded bytes)."""
        if self.pending:
            self.stats.bytes_discarded += len(self.pending)
            self.reject_log.warn("incomplete", f"{len(self.pending)} bytes without a final delimiter")
        self.pending.clear()
        self.discarding = False

    def keep_partial(self, tail: bytes) -> None:
        if not tail:
            return
        if self.discarding:
            self.stats.bytes_discarded += len(tail)
            return
        self.pending += tail
        if len(self.pending) > self.max_encoded_frame:
            self.stats.oversize_frames += 1
            self.stats.bytes_discarded += len(self.pending)
            self.reject_log.warn("oversize", f"over {self.max_encoded_frame} bytes without a delimiter")
            self.pending.clear()
            self.discarding = True
            self.synchronised = True

    def reject(self, counter: str, size: int, detail: str) -> None:
        # The delimiter that ended the piece is discarded with it.
        self.stats.bytes_discarded += size + 1
        if not self.synchronised:
            return
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.reject_log.warn(counter, detail)

    def handle_piece(self, piece: bytes, frames: list[Frame]) -> None:
        """Decode one delimiter-terminated piece and append the frame it holds, if valid."""
        try:
            self.decode_piece(piece, frames)
        finally:
            self.synchronised = True

    def decode_piece(self, piece: bytes, frames: list[Frame]) -> None:
        size = len(piece)
        if size == 0:
            return
        if size > self.max_encoded_frame:
            # Counted even before the first delimiter, as when the buffer overflows in keep_partial.
            self.stats.oversize_frames += 1
            self.stats.bytes_discarded += size + 1
            self.reject_log.warn("oversize_frames", f"{size} bytes, limit {self.max_encoded_frame}")
            return
        try:
            body = self.cobs.decode(piece)
        except self.cobs.DecodeError as error:
            self.reject("cobs_errors", size, f"invalid COBS encoding ({error})")
            return
        if len(body) < HEADER.size + CRC.size:
            self.reject("short_frames", size, f"{len(body)} bytes decoded, header and CRC need "
                        f"{HEADER.size + CRC.size}")
            return
        view = memoryview(body)
        crc_offset = len(body) - CRC.size
        (received_crc,) = CRC.unpack_from(view, crc_offset)
        computed_crc = zlib.crc32(view[:crc_offset])
        if received_crc != computed_crc:
            self.reject("crc_failures", size, f"CRC 0x{received_crc:08x}, computed 0x{computed_crc:08x}")
            return
        version, msg_type, sequence, timestamp_us = HEADER.unpack_from(view)
        if version != PROTOCOL_VERSION:
            self.reject("version_mismatches", size,
                        f"protocol version {version}, this receiver speaks {PROTOCOL_VERSION}")
            return

        # From here the frame is authentic, so it counts for sequence tracking.
        self.track_sequence(sequence)
        cls = MESSAGE_CLASSES.get(msg_type)
        if cls is None:
            self.stats.unknown_types += 1
            logger.debug("skipped frame of unknown message type 0x%02x (sequence %d)", msg_type, sequence)
            return
        message = cls.decode_payload(view[HEADER.size:crc_offset])
        if isinstance(message, str):
            self.stats.malformed_frames += 1
            self.stats.bytes_discarded += size + 1
            self.reject_log.warn("malformed", message)
            return
        self.track_samples(message)
        self.stats.frames_accepted += 1
        frames.append(Frame(sequence, timestamp_us, message))

    def track_sequence(self, sequence: int) -> None:
        expected = self.expected_sequence
        self.expected_sequence = next_sequence(sequence)
        if sequence == 0:
            if expected is not None:
                self.restart("sequence number 0")
            return
        if expected is None or sequence == expected:
            return
        # Numbers after boot cycle through 1..65535, a ring of 65535 values.
        missed = (sequence - expected) % (SEQUENCE_MODULUS - 1)
        if missed < (SEQUENCE_MODULUS - 1) // 2:
            self.stats.sequence_gaps += 1
            self.stats.frames_missed += missed
        else:
            # A number far behind the expected one: a reboot whose first frames were lost.
            self.restart(f"sequence number {sequence} after {expected - 1}")

    def restart(self, reason: str) -> None:
        self.stats.device_restarts += 1
        self.expected_sample_index = None
        logger.warning("device restarted (%s); sample counting starts again", reason)

    def track_samples(self, message: Message) -> None:
        if isinstance(message, Hello):
            self.last_hello = message
            return
        if isinstance(message, Samples):
            first, following = message.first_index, message.first_index + len(message.data)
        elif isinstance(message, Heartbeat):
            first = following = message.next_sample_index
        else:
            return
        expected = self.expected_sample_index
        if expected is not None and first != expected:
            missing = (first - expected) % SAMPLE_INDEX_MODULUS
            if missing < SAMPLE_INDEX_MODULUS // 2:
                self.stats.sample_gaps += 1
                self.stats.samples_lost += missing
                logger.debug("lost %d samples before sample index %d", missing, first)
            else:
                self.restart(f"sample index {first} after {expected}")
        self.expected_sample_index = following % SAMPLE_INDEX_MODULUS
