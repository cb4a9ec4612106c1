"""Simulated firmware: the byte stream a sensor node sends in the binary protocol, with faults.

:func:`build_transmission` turns a signal into a schedule of frames (hello, samples,
heartbeats) and :func:`inject_faults` corrupts it the way a noisy UART, a full transmit
buffer, a reboot or a pulled cable would. The :class:`FaultLedger` records what was
injected, including the samples a receiver can detect as lost, so tests can compare the
receiver's counters with the truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from anomalyforge.errors import InvalidInputError
from anomalyforge.firmware_bridge.protocol import (
    DELIMITER,
    FrameEncoder,
    Heartbeat,
    Hello,
    Samples,
)

logger = logging.getLogger(__name__)

# ECG5000 beats were resampled to 140 samples, so they have no true rate. 140 Hz plays one
# beat per second, a plausible heart rate.
ECG5000_NOMINAL_RATE_HZ = 140.0
DEFAULT_SAMPLES_PER_FRAME = 35
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_HELLO_INTERVAL_S = 5.0
FIRMWARE_VERSION = (1, 0, 0)


@dataclass
class Transmission:
    """One item the firmware writes: the bytes, when (device seconds), and what they hold.

    Attributes
    ----------
    data : bytes
        The frame with its delimiter, a lone delimiter, or a truncated frame.
    time_s : float
        Device time at which the item is sent, from the start of the playback.
    kind : str
        "delimiter", "hello", "samples", "heartbeat" or "truncated".
    samples : int
        Sample instants in a samples frame, else 0.
    first_index : int
        Device sample index of the first sample in a samples frame, else 0.
    boot : int
        Boot number (0 for the first boot); frames of different boots cannot reveal each
        other's losses.
    """

    data: bytes
    time_s: float
    kind: str
    samples: int = 0
    boot: int = 0
    first_index: int = 0


@dataclass
class FaultPlan:
    """Faults to inject, all counts at least 0.

    Attributes
    ----------
    flip_bits : int
        Single bits inverted at random positions of the stream.
    drop_bytes : int
        Single bytes removed at random positions.
    drop_frames : int
        Samples frames never sent. Only frames that a later samples frame or heartbeat of
        the same boot follows are chosen, so the receiver can detect every one.
    reset_after : int or None
        Reboot after this many samples frames: the next frame is cut in half, then the
        firmware sends a delimiter, a hello with sequence 0 and samples from index 0.
    disconnect_after : int or None
        Stop after this many samples frames (the simulator then closes the port).
    seed : int
        Seed of the random positions.
    """

    flip_bits: int = 0
    drop_bytes: int = 0
    drop_frames: int = 0
    reset_after: int | None = None
    disconnect_after: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("flip_bits", "drop_bytes", "drop_frames"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be at least 0, got {getattr(self, name)}")
        for name in ("reset_after", "disconnect_after"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInputError(f"{name} must be at least 1 frame, got {value}")


@dataclass
class FaultLedger:
    """Record of the faults :func:`inject_faults` injected.

    Attributes
    ----------
    frames_dropped, samples_dropped : int
        Samples frames removed by ``drop_frames`` and the sample instants they held.
    dropped_ranges : list of (int, int)
        (boot, first sample index) of each dropped frame, in stream order.
    bits_flipped, bytes_dropped : int
        Stream faults injected.
    damaged_items : list of int
        Indexes (in the original schedule) of items that flipped or removed bytes spoil.
    samples_lost_detectable : int
        Sample instants in dropped or damaged samples frames that a later intact frame of
        the same boot reveals: what a receiver should count as lost.
    resets : int
        Reboots simulated.
    """

    frames_dropped: int = 0
    samples_dropped: int = 0
    dropped_ranges: list = field(default_factory=list)
    bits_flipped: int = 0
    bytes_dropped: int = 0
    damaged_items: list = field(default_factory=list)
    samples_lost_detectable: int = 0
    resets: int = 0


def build_transmission(signal: np.ndarray, sample_rate_hz: float, samples_per_frame: int = DEFAULT_SAMPLES_PER_FRAME,
                       sample_format: str = "float32", int16_scale: float | None = None,
                       heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
                       hello_interval_s: float = DEFAULT_HELLO_INTERVAL_S, reset_after: int | None = None,
                       disconnect_after: int | None = None, restart_alignment: int = 1) -> list[Transmission]:
    """Return the firmware's schedule for a one-channel signal.

    Parameters
    ----------
    signal : ndarray of shape (n_samples,)
        Physical values, sent in order.
    sample_rate_hz : float
        Samples per second; sets the send times and the hello.
    samples_per_frame : int, default=35
        Sample instants per samples frame (the last frame may hold fewer).
    sample_format : {"float32", "int16"}, default="float32"
        Wire format of the samples.
    int16_scale : float, optional
        Physical value of one int16 step; default max(|signal|) / 32767.
    heartbeat_interval_s, hello_interval_s : float
        Device seconds between heartbeats and between repeated hellos; a heartbeat always
        ends the stream unless ``disconnect_after`` cuts it first.
    reset_after, disconnect_after : int, optional
        See :class:`FaultPlan`.
    restart_alignment : int, default=1
        After a reset the signal resumes at the next multiple of this many samples, for
        example the beat length, so sample index 0 of the new boot starts a whole beat.
    """
    signal = np.asarray(signal, dtype=np.float32).reshape(-1)
    if sample_rate_hz <= 0:
        raise InvalidInputError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    if samples_per_frame < 1:
        raise InvalidInputError(f"samples_per_frame must be at least 1, got {samples_per_frame}")
    if restart_alignment < 1:
        raise InvalidInputError(f"restart_alignment must be at least 1, got {restart_alignment}")
    if sample_format not in ("float32", "int16"):
        raise InvalidInputError(f"sample_format must be 'float32' or 'int16', got {sample_format!r}")
    scale = 1.0
    if sample_format == "int16":
        peak = float(np.max(np.abs(signal))) if len(signal) else 1.0
        scale = int16_scale or (peak / 32767.0 if peak > 0 else 1.0)

    encoder = FrameEncoder()
    hello = Hello(FIRMWARE_VERSION, sample_rate_hz, 1, sample_format)
    items: list[Transmission] = []
    boot = 0
    boot_time_s = 0.0

    def send(message, time_s: float, kind: str, samples: int = 0, first_index: int = 0) -> None:
        timestamp_us = round((time_s - boot_time_s) * 1e6)
        items.append(Transmission(encoder.encode(message, timestamp_us), time_s, kind, samples, boot, first_index))

    def boot_up(time_s: float) -> None:
        # A leading delimiter ends whatever partial frame the receiver holds.
        items.append(Transmission(DELIMITER, time_s, "delimiter", 0, boot))
        send(hello, time_s, "hello")

    boot_up(0.0)
    position = 0
    index = 0
    frames_sent = 0
    next_heartbeat = heartbeat_interval_s
    next_hello = hello_interval_s
    while position < len(signal):
        chunk = signal[position:position + samples_per_frame]
        time_s = (position + len(chunk)) / sample_rate_hz
        if sample_format == "int16":
            data = np.clip(np.round(chunk / scale), -32768, 32767).astype(np.int16)
        else:
            data = chunk
        message = Samples(index, data[:, None], scale)
        if reset_after is not None and frames_sent == reset_after:
            # Reboot in the middle of sending this frame. The next boot resumes at the next
            # beat boundary, with sample index 0 and sequence number 0.
            frame = encoder.encode(message, 0)
            items.append(Transmission(frame[: len(frame) // 2], time_s, "truncated", 0, boot))
            boot += 1
            boot_time_s = time_s
            encoder.reset()
            boot_up(time_s)
            reset_after = None
            index = 0
            position += samples_per_frame
            position = -(-position // restart_alignment) * restart_alignment
            continue
        send(message, time_s, "samples", len(chunk), index)
        frames_sent += 1
        position += len(chunk)
        index += len(chunk)
        if disconnect_after is not None and frames_sent >= disconnect_after:
            return items
        if time_s >= next_heartbeat:
            send(Heartbeat(index), time_s, "heartbeat")
            next_heartbeat += heartbeat_interval_s
        if time_s >= next_hello:
            send(hello, time_s, "hello")
            next_hello += hello_interval_s
    send(Heartbeat(index), len(signal) / sample_rate_hz, "heartbeat")
    return items


def revealed(items: list[Transmission], position: int, spoiled: set) -> bool:
    """Return True if an intact samples frame or heartbeat of the same boot follows ``position``."""
    boot = items[position].boot
    for later in range(position + 1, len(items)):
        item = items[later]
        if item.boot != boot:
            return False
        if later not in spoiled and item.kind in ("samples", "heartbeat"):
            return True
    return False


def inject_faults(items: list[Transmission], plan: FaultPlan) -> tuple[list[Transmission], FaultLedger]:
    """Return the schedule with ``plan``'s stream faults applied, and the ledger.

    ``reset_after`` and ``disconnect_after`` are applied by :func:`build_transmission`;
    this function drops frames, flips bits and removes bytes.
    """
    rng = np.random.default_rng(plan.seed)
    ledger = FaultLedger()
    ledger.resets = sum(item.kind == "truncated" for item in items)

    # Choose dropped frames among samples frames whose loss a later frame reveals.
    candidates = [position for position, item in enumerate(items)
                  if item.kind == "samples" and revealed(items, position, set())]
    if plan.drop_frames > len(candidates):
        raise InvalidInputError(
            f"drop_frames={plan.drop_frames} exceeds the {len(candidates)} samples frames that can be "
            "dropped detectably; send a longer signal or drop fewer frames"
        )
    dropped = set(rng.choice(candidates, size=plan.drop_frames, replace=False).tolist())
    ledger.frames_dropped = len(dropped)
    ledger.samples_dropped = sum(items[position].samples for position in dropped)
    ledger.dropped_ranges = [(items[position].boot, items[position].first_index) for position in sorted(dropped)]

    # Flip bits and remove bytes in the remaining items, recording which items they spoil.
    data = [bytearray(item.data) if position not in dropped else bytearray()
            for position, item in enumerate(items)]
    damaged: set = set()
    for fault_number in range(plan.flip_bits + plan.drop_bytes):
        flip = fault_number < plan.flip_bits
        sizes = np.array([len(chunk) for chunk in data])
        total = int(sizes.sum())
        if total == 0:
            break
        offset = int(rng.integers(total))
        position = int(np.searchsorted(np.cumsum(sizes), offset, side="right"))
        within = offset - int(sizes[:position].sum())
        was_delimiter = data[position][within] == 0
        if flip:
            data[position][within] ^= 1 << int(rng.integers(8))
            ledger.bits_flipped += 1
        else:
            del data[position][within]
            ledger.bytes_dropped += 1
        damaged.add(position)
        if was_delimiter:
            # Without this delimiter the item merges with the next item that has bytes.
            following = next((later for later in range(position + 1, len(data)) if data[later]), None)
            if following is not None:
                damaged.add(following)
    ledger.damaged_items = sorted(damaged)

    spoiled = dropped | damaged
    ledger.samples_lost_detectable = sum(
        items[position].samples for position in sorted(spoiled)
        if items[position].kind == "samples" and revealed(items, position, spoiled)
    )
    result = [Transmission(bytes(chunk), item.time_s, item.kind, item.samples, item.boot, item.first_index)
              for chunk, item in zip(data, items) if chunk]
    logger.info("injected faults: %s", ledger)
    return result, ledger

