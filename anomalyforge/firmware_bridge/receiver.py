"""Host side of the binary protocol: decode frames and cut their samples into windows.

Windows are placed on the device's sample index: window ``k`` covers samples
``[k * hop, k * hop + window_length)`` of the current boot. A window that would span lost
samples is skipped instead of being stitched across the gap, so windows stay aligned with
the device's time base (for ECG5000, one window per beat) after any loss.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from anomalyforge.errors import InvalidInputError
from anomalyforge.firmware_bridge.protocol import (
    SAMPLE_INDEX_MODULUS,
    FrameDecoder,
    Hello,
    Samples,
)

logger = logging.getLogger(__name__)


class IndexedWindower:
    """Cut samples tagged with a device sample index into windows aligned to multiples of ``hop``.

    Parameters
    ----------
    window_length : int
        Samples per window, at least 2.
    hop : int
        Samples between window starts, at least 1.
    """

    def __init__(self, window_length: int, hop: int):
        if window_length < 2:
            raise InvalidInputError(f"window_length must be at least 2, got {window_length}")
        if hop < 1:
            raise InvalidInputError(f"hop must be at least 1 sample, got {hop}")
        self.window_length = window_length
        self.hop = hop
        self.buffer = np.empty(0, dtype=np.float64)
        self.buffer_start: int | None = None
        self.next_start = 0
        self.windows_skipped = 0

    def restart(self, first_index: int) -> None:
        """Drop buffered samples and continue at ``first_index`` (after a gap or a reboot)."""
        if self.buffer_start is not None and len(self.buffer) > 0:
            # Windows already begun before the gap can never be completed.
            end = self.buffer_start + len(self.buffer)
            while self.next_start < end:
                self.windows_skipped += 1
                self.next_start += self.hop
        self.buffer = np.empty(0, dtype=np.float64)
        self.buffer_start = first_index
        self.next_start = -(-first_index // self.hop) * self.hop

    def push(self, first_index: int, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add samples starting at ``first_index``; return (start index, window) pairs they complete."""
        expected = None if self.buffer_start is None else self.buffer_start + len(self.buffer)
        if expected is None or first_index != expected:
            if expected is not None and first_index < expected:
                # The index went back: the device rebooted, so no window is skipped.
                self.buffer = np.empty(0, dtype=np.float64)
            self.restart(first_index)
        self.buffer = np.concatenate([self.buffer, np.asarray(samples, dtype=np.float64)])
        windows = []
        end = self.buffer_start + len(self.buffer)
        while self.next_start + self.window_length <= end:
            offset = self.next_start - self.buffer_start
            windows.append((self.next_start, self.buffer[offset:offset + self.window_length].copy()))
            self.next_start += self.hop
        keep_from = min(self.next_start, end) - self.buffer_start
        if keep_from > 0:
            self.buffer = self.buffer[keep_from:]
            self.buffer_start += keep_from
        return windows


class FrameWindowReader:
    """Turn received bytes in the binary protocol into windows of one channel.

    Has the interface of :class:`anomalyforge.device.stream.WindowReader`: :meth:`feed`
    returns windows and :meth:`finish` ends the stream. For each window returned it
    appends a dict with ``sample_index`` and the running ``samples_lost`` total to
    :attr:`window_records`, which the caller pops in the same order.

    Parameters
    ----------
    window_length : int
        Samples per window at the model's sample rate.
    hop : int
        Samples between window starts at the model's sample rate.
    model_sample_rate_hz : float, optional
        Sample rate the model was trained at. If the device's hello reports another rate,
        window length and hop are scaled to the device rate, so windows cover the same time.
        The caller then resamples each window to the model length. When None (ECG5000
        beats have no fixed rate), windows are taken as they are.
    """

    framing = "binary"

    def __init__(self, window_length: int, hop: int, model_sample_rate_hz: float | None = None):
        self.window_length = window_length
        self.hop = hop
        self.model_sample_rate_hz = model_sample_rate_hz
        self.decoder = FrameDecoder()
        self.windower: IndexedWindower | None = None
        self.hello: Hello | None = None
        self.window_records: deque = deque()
        self.restarts_seen = 0
        self.messages: dict = {}

    @property
    def stats(self):
        return self.decoder.stats

    def feed(self, data: bytes) -> list[np.ndarray]:
        windows: list[np.ndarray] = []
        for frame in self.decoder.feed(data):
            message = frame.message
            name = type(message).__name__
            self.messages[name] = self.messages.get(name, 0) + 1
            if isinstance(message, Hello):
                self.handle_hello(message)
            elif isinstance(message, Samples):
                windows.extend(self.handle_samples(message))
            else:
                logger.debug("received %s (sequence %d)", message, frame.sequence)
        return windows

    def finish(self) -> None:
        self.decoder.finish()

    def handle_hello(self, hello: Hello) -> None:
        if hello != self.hello:
            logger.info(
                "device hello: firmware %s, %g Hz, %d channel(s), %s samples",
                ".".join(str(part) for part in hello.firmware_version), hello.sample_rate_hz,
                hello.channels, hello.sample_format,
            )
        self.hello = hello
        if hello.channels != 1:
            raise InvalidInputError(
                f"the device reports {hello.channels} channels, but the detector takes one; "
                "configure the firmware to send a single channel"
            )

    def make_windower(self) -> IndexedWindower:
        length, hop = self.window_length, self.hop
        device_rate = self.hello.sample_rate_hz if self.hello is not None else 0.0
        if self.model_sample_rate_hz and device_rate > 0 and device_rate != self.model_sample_rate_hz:
            ratio = device_rate / self.model_sample_rate_hz
            length, hop = max(2, round(length * ratio)), max(1, round(hop * ratio))
            logger.info("device rate %g Hz, model rate %g Hz: windows of %d samples every %d",
                        device_rate, self.model_sample_rate_hz, length, hop)
        return IndexedWindower(length, hop)

    def handle_samples(self, message: Samples) -> list[np.ndarray]:
        if message.data.shape[1] != 1:
            raise InvalidInputError(
                f"samples frame with {message.data.shape[1]} channels, but the detector takes "
                "one; configure the firmware to send a single channel"
            )
        if self.windower is None:
            self.windower = self.make_windower()
        if self.stats.device_restarts != self.restarts_seen:
            self.restarts_seen = self.stats.device_restarts
            self.windower.restart(message.first_index)
        pairs = self.windower.push(message.first_index, message.values()[:, 0])
        windows = []
        for start, window in pairs:
            self.window_records.append({
                "sample_index": start % SAMPLE_INDEX_MODULUS,
                "samples_lost": self.stats.samples_lost,
            })
            windows.append(window)
        return windows
