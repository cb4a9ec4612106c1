"""Serial streaming through real pseudo-terminals and a real onnxruntime detector."""

from __future__ import annotations

import argparse
import io
import json
import logging
import socket
import threading

import numpy as np
import pytest

from anomalyforge.device import DeviceDetector, stream_port
from anomalyforge.device.cli import add_device_commands
from anomalyforge.device.stream import LineParser, open_port
from anomalyforge.errors import BundleError, SerialPortError
from anomalyforge.firmware_bridge import PtySerialDevice, format_line


@pytest.fixture(scope="module")
def detector(tiny_bundle):
    return DeviceDetector.from_bundle(tiny_bundle, precision="int8")


@pytest.fixture(scope="module")
def test_beats(tiny_bundle_data):
    # Every 15th ECG5000 test beat: 300 beats covering normal and anomalous classes.
    return tiny_bundle_data["test_x"][::15]


def stream_lines(detector, lines, **options):
    """Play ``lines`` on a fresh simulated device, stream them, return (records, summary)."""
    records = []
    with PtySerialDevice() as device:
        device.play_lines(lines, close_when_done=True)
        summary = stream_port(detector, device.port, on_window=records.append,
                              on_open=device.host_opened, summary_stream=None, **options)
    return records, summary


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_stream_beats_match_detector(tiny_bundle, test_beats, precision):
    detector = DeviceDetector.from_bundle(tiny_bundle, precision=precision)
    records, summary = stream_lines(detector, test_beats)

    assert summary.windows == len(test_beats)
    assert summary.lines_read == len(test_beats)
    assert summary.skipped == {}
    assert summary.stop_reason == "disconnected"
    assert [record["index"] for record in records] == list(range(len(test_beats)))
    expected = detector.score(test_beats)
    streamed = np.array([record["score"] for record in records])
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=1e-5)
    flags = np.array([record["is_anomaly"] for record in records])
    np.testing.assert_array_equal(flags, expected > detector.threshold)
    assert summary.anomalies == int(flags.sum())
    assert all(record["threshold"] == detector.threshold for record in records)
    assert all(record["latency_us"] > 0 for record in records)
    assert 0 < summary.latency_p50_us <= summary.latency_p99_us


def test_samples_mode_with_hop(detector, test_beats):
    samples = test_beats[:5].reshape(-1)
    window_length, hop = 140, 35
    records, summary = stream_lines(detector, [[value] for value in samples], mode="samples", hop=hop)

    starts = range(0, len(samples) - window_length + 1, hop)
    expected_windows = np.stack([samples[start:start + window_length] for start in starts])
    assert summary.windows == len(expected_windows)
    assert summary.lines_read == len(samples)
    streamed = np.array([record["score"] for record in records])
    np.testing.assert_allclose(streamed, detector.score(expected_windows), rtol=0, atol=1e-5)


def test_samples_mode_default_hop_from_manifest(detector, test_beats):
    samples = test_beats[:3].reshape(-1)
    records, summary = stream_lines(detector, [[value] for value in samples], mode="samples")

    # The tiny bundle's task.hop equals the window length, so the windows are the beats.
    assert summary.windows == 3
    streamed = np.array([record["score"] for record in records])
    np.testing.assert_allclose(streamed, detector.score(test_beats[:3]), rtol=0, atol=1e-5)


def test_malformed_lines_skipped(detector, test_beats):
    good = test_beats[:6]
    with_nan = good[0].copy()
    with_nan[10] = np.nan
    lines = [
        format_line(good[0]),
        format_line(good[1][:-1]),                                   # 139 values
        format_line(good[2], separator="; "),
        format_line(with_nan),
        b"hello," * 139 + b"world\n",                                # 140 non-numeric fields
        format_line(good[3], separator="\t"),
        b"1," * 5000 + b"1\n",                                       # over the line-length limit
        format_line(good[4]).replace(b"\n", b"\r\n"),
        b"\n",
        format_line(good[5], separator=" "),
    ]
    records, summary = stream_lines(detector, lines)

    assert summary.skipped == {"wrong_count": 1, "non_finite": 1, "non_numeric": 1, "too_long": 1, "empty": 1}
    accepted = good[[0, 2, 3, 4, 5]]
    assert summary.windows == len(accepted)
    assert summary.lines_read == len(lines)
    assert summary.windows + summary.skipped_total == summary.lines_read
    streamed = np.array([record["score"] for record in records])
    np.testing.assert_allclose(streamed, detector.score(accepted), rtol=0, atol=1e-5)


def test_line_parser_any_chunking():
    lines = b"1,2,3\n4;5;6\r\n7 8\n" + b"9" * 600 + b"\n10\t11\t12\n13,14"
    reference = LineParser(3)
    expected = reference.feed(lines)
    rng = np.random.default_rng(0)
    parser = LineParser(3)
    accepted = []
    position = 0
    while position < len(lines):
        size = int(rng.integers(1, 8))
        accepted.extend(parser.feed(lines[position:position + size]))
        position += size
    parser.finish()

    assert [row.tolist() for row in accepted] == [[1, 2, 3], [4, 5, 6], [10, 11, 12]]
    assert [row.tolist() for row in expected] == [[1, 2, 3], [4, 5, 6], [10, 11, 12]]
    assert dict(parser.skipped) == {"wrong_count": 1, "too_long": 1, "incomplete": 1}
    assert parser.lines_read == 5
    assert len(parser.pending) == 0


def test_line_parser_bounds_unterminated_input():
    parser = LineParser(3, max_line_bytes=300)
    for _ in range(100):
        parser.feed(b"7" * 1000)

    assert len(parser.pending) <= 300
    assert parser.skipped["too_long"] == 1
    assert [row.tolist() for row in parser.feed(b"\n1,2,3\n")] == [[1, 2, 3]]


def test_max_windows_stops_stream(detector, test_beats):
    records = []
    with PtySerialDevice(drain_timeout_s=0.5) as device:
        device.play_lines(test_beats[:40])
        summary = stream_port(detector, device.port, max_windows=10, on_window=records.append,
                              on_open=device.host_opened, summary_stream=None)

    assert summary.windows == 10
    assert summary.stop_reason == "done"
    assert len(records) == 10


def test_idle_timeout_stops_stream(detector, test_beats):
    with PtySerialDevice() as device:
        device.play_lines(test_beats[:3])
        summary = stream_port(detector, device.port, idle_timeout_s=0.3,
                              on_open=device.host_opened, summary_stream=None)
        written = device.wait_written(5.0)

    assert written
    assert summary.stop_reason == "idle_timeout"
    assert summary.windows == 3


def test_summary_and_json_lines_written(detector, test_beats):
    output, summary_text = io.StringIO(), io.StringIO()
    with PtySerialDevice() as device:
        device.play_lines(test_beats[:4], close_when_done=True)
        summary = stream_port(detector, device.port, on_window=output, on_open=device.host_opened,
                              summary_stream=summary_text)

    rows = [json.loads(line) for line in output.getvalue().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {"index", "score", "is_anomaly", "threshold", "latency_us"}
    assert "4 windows" in summary_text.getvalue()
    assert summary.to_dict()["windows"] == 4


def test_nonexistent_port_raises():
    with pytest.raises(SerialPortError, match="'/dev/anomalyforge-no-such-port'"):
        open_port("/dev/anomalyforge-no-such-port")


def test_nonexistent_port_in_stream(detector):
    with pytest.raises(SerialPortError, match="/dev/anomalyforge-missing.*dialout"):
        stream_port(detector, "/dev/anomalyforge-missing", summary_stream=None)


def test_tampered_model_file_rejected(bundle_copy):
    path = bundle_copy / "autoencoder.int8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(BundleError, match="checksum mismatch for 'autoencoder.int8.onnx'"):
        DeviceDetector.from_bundle(bundle_copy)


def test_manifest_signature_mismatch_rejected(bundle_copy):
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"]["autoencoder"]["formats"]["onnx-fp32"]["inputs"][0]["shape"] = [None, 128]
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="'window' axis 1 is 140 in the model but 128 in the manifest"):
        DeviceDetector.from_bundle(bundle_copy, precision="fp32")


class StreamStartedHandler(logging.Handler):
    """Sets ``started`` when stream_port logs that the port is open (and its input flushed)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.started = threading.Event()

    def emit(self, record):
        if record.getMessage().startswith("streaming "):
            self.started.set()


def serve_lines_once(server: socket.socket, payload: bytes, started: threading.Event) -> None:
    connection, _ = server.accept()
    with connection:
        # pyserial discards input already received while it opens a socket:// port.
        if started.wait(10.0):
            connection.sendall(payload)


def test_cli_stream_over_socket_url(tiny_bundle, detector, test_beats, tmp_path):
    payload = b"".join(format_line(beat) for beat in test_beats[:20])
    stream_logger = logging.getLogger("anomalyforge.device.stream")
    handler = StreamStartedHandler()
    previous_level = stream_logger.level
    stream_logger.addHandler(handler)
    stream_logger.setLevel(logging.INFO)
    server = socket.create_server(("127.0.0.1", 0))
    sender = threading.Thread(target=serve_lines_once, args=(server, payload, handler.started), daemon=True)
    sender.start()
    parser = argparse.ArgumentParser(prog="anomalyforge device")
    add_device_commands(parser.add_subparsers(dest="command", required=True))
    output = tmp_path / "scores.jsonl"
    args = parser.parse_args([
        "stream", "--bundle", str(tiny_bundle), "--port", f"socket://127.0.0.1:{server.getsockname()[1]}",
        "--output", str(output),
    ])

    try:
        exit_code = args.handler(args)
    finally:
        stream_logger.removeHandler(handler)
        stream_logger.setLevel(previous_level)
        sender.join(5.0)
        server.close()

    assert exit_code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 20
    np.testing.assert_allclose([row["score"] for row in rows], detector.score(test_beats[:20]), atol=1e-5)


def test_parser_empty_field_is_non_numeric():
    parser = LineParser(values_per_line=4)

    accepted = parser.feed(b"1,2,,3\n")

    assert accepted == []
    assert dict(parser.skipped) == {"non_numeric": 1}


def test_parser_text_with_wrong_count_is_non_numeric():
    parser = LineParser(values_per_line=140)

    parser.feed(b"hello world garbage !!\n")

    assert dict(parser.skipped) == {"non_numeric": 1}
