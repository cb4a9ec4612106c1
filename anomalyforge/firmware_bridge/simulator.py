"""A simulated serial device on a Linux / macOS pseudo-terminal (standard library only).

The simulator owns the pty master; the host opens :attr:`PtySerialDevice.port` (the slave
path) with pyserial as if it were a USB serial adapter. Two pty properties shape the
design, both checked on Linux 6.18 with pyserial 3.5:

* Opening the port with pyserial flushes its pending input, so bytes written before the
  host opened it are lost. :meth:`PtySerialDevice.play_lines` therefore waits, by default,
  until the host calls :meth:`PtySerialDevice.host_opened` (pass it as ``on_open`` to
  :func:`anomalyforge.device.stream.stream_port`).
* Closing the master hangs up the slave and discards the bytes the host has not read yet;
  the host's next read raises ``SerialException("device reports readiness to read but
  returned no data ...")``. :meth:`PtySerialDevice.close` therefore first waits until the
  slave's input queue is empty (``FIONREAD`` on the simulator's own slave descriptor), so
  every line written reaches the host before it sees the disconnect.

:meth:`PtySerialDevice.play_lines` writes text lines; :meth:`PtySerialDevice.play_chunks`
writes arbitrary byte chunks (binary frames) on a time schedule.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
import tty
from typing import Iterable

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 10.0
DEFAULT_HOST_TIMEOUT_S = 30.0
# Poll interval while waiting for the host to read everything. The queue must be seen
# empty twice in a row because bytes written to the master reach the slave's queue through
# the kernel's tty buffer work, which runs shortly after the write.
DRAIN_POLL_S = 0.005
WRITE_POLL_S = 0.1


def format_line(values, separator: str = ",") -> bytes:
    """Format numbers as one wire-format text line ending in ``\\n``.

    Nine significant digits round-trip any float32 exactly, so the host parses the same
    values the simulator was given.
    """
    return (separator.join(f"{float(value):.9g}" for value in values) + "\n").encode("ascii")


def as_line(line) -> bytes:
    if isinstance(line, str):
        line = line.encode("ascii")
    elif not isinstance(line, (bytes, bytearray)):
        return format_line(line)
    return bytes(line) if line.endswith(b"\n") else bytes(line) + b"\n"


class PtySerialDevice:
    """A simulated serial device: a pty pair whose slave is in raw mode (no echo, no CR/LF mapping).

    Use it as a context manager; leaving the block calls :meth:`close`.

    Parameters
    ----------
    drain_timeout_s : float, default=10.0
        How long :meth:`close` waits for the host to read the bytes still queued before it
        closes the pty anyway (and logs how many were lost).

    Attributes
    ----------
    port : str
        Slave path for the host, for example ``/dev/pts/7``.
    lines_written, bytes_written : int
        Items (lines or chunks) and bytes written to the pty so far.
    chunks_skipped : int
        Chunks :meth:`play_chunks` skipped with ``overflow="drop"`` because the host was
        not reading.
    """

    def __init__(self, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S):
        self.master_fd, self.slave_fd = os.openpty()
        # Raw mode: bytes pass unchanged, nothing is echoed back to the device side.
        tty.setraw(self.slave_fd, termios.TCSANOW)
        os.set_blocking(self.master_fd, False)
        self.port = os.ttyname(self.slave_fd)
        self.drain_timeout_s = drain_timeout_s
        self.lines_written = 0
        self.bytes_written = 0
        self.chunks_skipped = 0
        self.host_ready = threading.Event()
        self.finished_writing = threading.Event()
        self.finished_writing.set()
        self.stop_writing = threading.Event()
        self.writer: threading.Thread | None = None
        self.write_error: BaseException | None = None
        self.lock = threading.Lock()
        self.closed = False
        logger.info("simulated serial device on %s", self.port)

    def __enter__(self) -> PtySerialDevice:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def host_opened(self) -> None:
        """Signal that the host has opened the port, so queued playback may start."""
        self.host_ready.set()

    def play_lines(self, lines: Iterable, interval_s: float = 0.0, wait_for_host: bool = True,
                   host_timeout_s: float = DEFAULT_HOST_TIMEOUT_S, close_when_done: bool = False) -> None:
        """Write text lines from a background thread.

        Parameters
        ----------
        lines : iterable of str, bytes or sequences of numbers
            Each item is one line; ``\\n`` is appended when missing, and numbers are
            formatted with :func:`format_line`.
        interval_s : float, default=0.0
            Pause between lines in seconds, to mimic a device's output rate.
        wait_for_host : bool, default=True
            Start writing only after :meth:`host_opened` is called, because opening the
            port flushes whatever was written before.
        host_timeout_s : float, default=30.0
            How long to wait for :meth:`host_opened` before giving up without writing.
        close_when_done : bool, default=False
            Call :meth:`close` after the last line, which waits until the host has read
            everything and then disconnects: the host sees the end of the stream.
        """
        encoded = [as_line(line) for line in lines]
        send_times = [number * interval_s for number in range(len(encoded))]
        self.start_writer(encoded, send_times, wait_for_host, host_timeout_s, close_when_done, "wait")

    def play_chunks(self, chunks: Iterable[bytes], send_times_s: Iterable[float] | None = None,
                    wait_for_host: bool = True, host_timeout_s: float = DEFAULT_HOST_TIMEOUT_S,
                    close_when_done: bool = False, overflow: str = "wait") -> None:
        """Write byte chunks (for example binary frames) from a background thread.

        Parameters
        ----------
        chunks : iterable of bytes
            Written unchanged, in order.
        send_times_s : iterable of float, optional
            Time of each chunk in seconds after playback starts, non-decreasing; a chunk
            that is due is written at once. Default: all at once.
        wait_for_host, host_timeout_s, close_when_done
            As for :meth:`play_lines`.
        overflow : {"wait", "drop"}, default="wait"
            What to do when the pty cannot take a chunk because the host is not reading:
            wait, or skip the chunk after one poll interval the way firmware with a full
            transmit buffer drops a frame (counted in :attr:`chunks_skipped`).
        """
        if overflow not in ("wait", "drop"):
            raise ValueError(f"overflow must be 'wait' or 'drop', got {overflow!r}")
        chunks = [bytes(chunk) for chunk in chunks]
        send_times = [0.0] * len(chunks) if send_times_s is None else [float(time_s) for time_s in send_times_s]
        if len(send_times) != len(chunks):
            raise ValueError(f"got {len(send_times)} send times for {len(chunks)} chunks; pass one per chunk")
        self.start_writer(chunks, send_times, wait_for_host, host_timeout_s, close_when_done, overflow)

    def start_writer(self, chunks: list[bytes], send_times: list[float], wait_for_host: bool,
                     host_timeout_s: float, close_when_done: bool, overflow: str) -> None:
        if self.writer is not None and self.writer.is_alive():
            raise RuntimeError(f"{self.port}: a playback is still running; wait_written() first")
        if self.closed:
            raise RuntimeError(f"{self.port}: the simulated device is closed")
        self.finished_writing.clear()
        self.write_error = None
        self.writer = threading.Thread(
            target=self.write_all,
            args=(chunks, send_times, wait_for_host, host_timeout_s, close_when_done, overflow),
            name=f"pty-device-{os.path.basename(self.port)}",
            daemon=True,
        )
        self.writer.start()

    def write_all(self, chunks: list[bytes], send_times: list[float], wait_for_host: bool,
                  host_timeout_s: float, close_when_done: bool, overflow: str) -> None:
        try:
            if wait_for_host and not self.host_ready.wait(host_timeout_s):
                logger.error("%s: the host did not open the port within %.1f s; nothing written",
                             self.port, host_timeout_s)
                return
            if self.stop_writing.is_set():
                return
            # Send times are kept relative to the start, so pauses do not accumulate drift.
            started = time.monotonic()
            for chunk, send_time in zip(chunks, send_times):
                delay = started + send_time - time.monotonic()
                if delay > 0 and self.stop_writing.wait(delay):
                    break
                if overflow == "drop" and not self.writable_now():
                    self.chunks_skipped += 1
                    continue
                if not self.write_bytes(chunk):
                    break
                self.lines_written += 1
        except OSError as error:
            self.write_error = error
            logger.error("%s: writing to the pty failed after %d lines: %s", self.port, self.lines_written, error)
        finally:
            self.finished_writing.set()
            if close_when_done:
                self.close()

    def writable_now(self) -> bool:
        _, writable, _ = select.select([], [self.master_fd], [], WRITE_POLL_S)
        return bool(writable)

    def write_bytes(self, data: bytes) -> bool:
        """Write all of ``data`` to the master; return False if playback was stopped first."""
        view = memoryview(data)
        while view:
            if self.stop_writing.is_set():
                return False
            # The master is non-blocking so a host that stops reading cannot wedge this thread.
            _, writable, _ = select.select([], [self.master_fd], [], WRITE_POLL_S)
            if not writable:
                continue
            try:
                count = os.write(self.master_fd, view)
            except BlockingIOError:
                continue
            self.bytes_written += count
            view = view[count:]
        return True

    def wait_written(self, timeout: float | None = None) -> bool:
        """Block until the current playback has written every line; return False on timeout."""
        return self.finished_writing.wait(timeout)

    def pending_bytes(self) -> int:
        """Return the number of bytes written but not yet read by the host."""
        result = fcntl.ioctl(self.slave_fd, termios.FIONREAD, struct.pack("i", 0))
        return struct.unpack("i", result)[0]

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the host has read every byte written; return False on timeout."""
        deadline = time.monotonic() + timeout
        empty_polls = 0
        while time.monotonic() < deadline:
            empty_polls = empty_polls + 1 if self.pending_bytes() == 0 else 0
            if empty_polls >= 2:
                return True
            time.sleep(DRAIN_POLL_S)
        return False

    def close(self) -> None:
        """Finish playback, wait until the host has read everything, then disconnect.

        Waits up to ``drain_timeout_s`` in total; after that the pty is closed anyway and
        the number of lines not written and bytes not read is logged.
        """
        with self.lock:
            if self.closed:
                return
            self.closed = True
        deadline = time.monotonic() + self.drain_timeout_s
        if threading.current_thread() is not self.writer and not self.wait_written(self.drain_timeout_s):
            logger.warning("%s: closing before playback finished; stopping the writer", self.port)
            self.stop_writing.set()
            # Wake a writer still waiting for the host, so it checks stop_writing and returns.
            self.host_ready.set()
            self.writer.join()
        remaining_s = max(0.0, deadline - time.monotonic())
        try:
            if not self.wait_drained(remaining_s):
                logger.warning("%s: the host left %d bytes unread; they are lost on close",
                               self.port, self.pending_bytes())
        except OSError as error:
            if error.errno not in (errno.EIO, errno.EBADF):
                raise
        os.close(self.master_fd)
        os.close(self.slave_fd)
        logger.info("%s closed after %d lines (%d bytes)", self.port, self.lines_written, self.bytes_written)
