"""Binary frames through real pseudo-terminals: simulated firmware, fault injection, stream_port."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from anomalyforge.device import DeviceDetector, stream_port
from anomalyforge.device.cli import add_device_commands
from anomalyforge.device.stream import detect_framing
from anomalyforge.firmware_bridge import PtySerialDevice
from anomalyforge.firmware_bridge.cli import add_bridge_commands
from anomalyforge.firmware_bridge.firmware import FaultPlan, build_transmission, inject_faults

WINDOW = 140
SPEEDUP = 2000.0


@pytest.fixture(scope="module")
def detector(tiny_bundle):
    return DeviceDetector.from_bundle(tiny_bundle, precision="fp32")


@pytest.fixture(scope="module")
def beats(tiny_bundle_data):
    return tiny_bundle_data["test_x"][:40]


def play_and_stream(detector, items, **options):
    """Play a firmware schedule on a fresh pty, stream it, return (records, summary)."""
    records = []
    with PtySerialDevice() as device:
        device.play_chunks([item.data for item in items], [item.time_s / SPEEDUP for item in items],
                           close_when_done=True)
        summary = stream_port(detector, device.port, on_window=records.append, on_open=device.host_opened,
                              summary_stream=None, **options)
    return records, summary


@pytest.mark.parametrize("framing", ["binary", "auto"])
def test_binary_stream_scores_every_beat(detector, beats, framing):
    items = build_transmission(beats.reshape(-1), 140.0)
    records, summary = play_and_stream(detector, items, framing=framing)

    assert summary.framing == "binary"
    assert summary.stop_reason == "disconnected"
    assert summary.windows == len(beats)
    assert summary.samples_lost == 0
    assert summary.link["crc_failures"] == 0
    assert summary.device == {"firmware_version": "1.0.0", "sample_rate_hz": 140.0, "channels": 1,
                              "sample_format": "float32"}
    assert [record["sample_index"] for record in records] == [WINDOW * number for number in range(len(beats))]
    assert all(record["samples_lost"] == 0 for record in records)
    np.testing.assert_allclose([record["score"] for record in records], detector.score(beats), atol=1e-5)


def test_int16_samples_scaled(detector, beats):
    items = build_transmission(beats[:10].reshape(-1), 140.0, sample_format="int16")
    records, summary = play_and_stream(detector, items, framing="binary")

    assert summary.windows == 10
    assert summary.device["sample_format"] == "int16"
    # One int16 step is max(|signal|) / 32767, a quantisation error of about 1e-4 per sample.
    np.testing.assert_allclose([record["score"] for record in records], detector.score(beats[:10]),
                               rtol=0.02, atol=1e-3)


def test_dropped_frames_counted_exactly(detector, beats):
    items = build_transmission(beats.reshape(-1), 140.0)
    items, ledger = inject_faults(items, FaultPlan(drop_frames=7, seed=11))
    records, summary = play_and_stream(detector, items, framing="binary")

    assert ledger.samples_dropped == 7 * 35
    assert summary.samples_lost == ledger.samples_dropped
    assert summary.link["frames_missed"] == 7
    assert summary.link["crc_failures"] == 0
    assert records[-1]["samples_lost"] <= summary.samples_lost
    # A dropped 35-sample frame spoils the beat window it falls in; every other beat is scored.
    spoiled = {first // WINDOW for _, first in ledger.dropped_ranges}
    scored_beats = [number for number in range(len(beats)) if number not in spoiled]
    assert [record["sample_index"] for record in records] == [WINDOW * number for number in scored_beats]
    assert summary.windows == len(scored_beats)
    np.testing.assert_allclose([record["score"] for record in records], detector.score(beats[scored_beats]),
                               atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_faults_match_ledger(detector, beats, seed):
    items = build_transmission(beats.reshape(-1), 140.0, reset_after=60)
    items, ledger = inject_faults(items, FaultPlan(flip_bits=6, drop_bytes=4, drop_frames=3, seed=seed))
    records, summary = play_and_stream(detector, items, framing="binary")

    assert ledger.resets == 1
    assert summary.link["device_restarts"] == 1
    assert summary.samples_lost == ledger.samples_lost_detectable
    rejected = (summary.link["crc_failures"] + summary.link["cobs_errors"] + summary.link["short_frames"])
    assert rejected >= 1
    assert summary.link["bytes_discarded"] > 0
    assert summary.windows > 0


def test_disconnect_after_stops_stream(detector, beats):
    items = build_transmission(beats.reshape(-1), 140.0, disconnect_after=8)
    records, summary = play_and_stream(detector, items, framing="binary")

    # 8 frames of 35 samples hold two whole beats.
    assert summary.windows == 2
    assert summary.stop_reason == "disconnected"


def test_detect_framing_rules():
    assert detect_framing(b"1.0,2.0\n") == "text"
    assert detect_framing(b"1.0,2.0") is None
    assert detect_framing(b"\x00\x05\x01") == "binary"
    assert detect_framing(b"\x93\x01garbage\x00") == "binary"
    assert detect_framing(b"\x93\x01\n\x00") == "binary"
    assert detect_framing(b"7" * 4096) == "text"


def test_device_cli_framing_option(tiny_bundle):
    parser = argparse.ArgumentParser(prog="anomalyforge device")
    add_device_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["stream", "--bundle", str(tiny_bundle), "--port", "loop://", "--framing", "binary"])

    assert args.framing == "binary"
    assert parser.parse_args(["stream", "--bundle", "b", "--port", "p"]).framing == "auto"


def test_bridge_cli_c_sources(tmp_path):
    parser = argparse.ArgumentParser(prog="anomalyforge bridge")
    add_bridge_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["c-sources", "--out", str(tmp_path / "out")])

    assert args.handler(args) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["af_frame.c", "af_frame.h"]


def test_bridge_cli_rejects_negative_fault_count():
    parser = argparse.ArgumentParser(prog="anomalyforge bridge")
    add_bridge_commands(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--drop-frames", "-1"])


def test_bridge_cli_simulate_process(detector):
    process = subprocess.Popen(
        [sys.executable, "-m", "anomalyforge.firmware_bridge.cli", "simulate", "--beats", "6",
         "--speedup", "4", "--drop-frames", "2", "--seed", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = process.stdout.readline().strip()
        assert port.startswith("/dev/")
        summary = stream_port(detector, port, summary_stream=None, idle_timeout_s=5.0)
        report = json.loads(process.stdout.readline())
    finally:
        process.wait(timeout=30)
        process.stderr.close()
        process.stdout.close()

    assert summary.framing == "binary"
    assert summary.frames > 0
    assert report["frames_dropped"] == 2
    # The host may miss the first frames while it opens the port; losses it sees are the injected ones.
    assert summary.samples_lost <= report["samples_dropped"]
    assert summary.stop_reason == "disconnected"


def test_reset_resumes_on_beat_boundary(detector, beats):
    # The reset cuts frame 41 of 35 samples, mid-beat: later windows must still be whole beats.
    items = build_transmission(beats.reshape(-1), 140.0, reset_after=41, restart_alignment=140)
    records, summary = play_and_stream(detector, items, framing="binary")

    assert summary.link["device_restarts"] == 1
    offline = detector.score(beats)
    streamed = np.array([record["score"] for record in records])
    distance_to_a_beat = np.min(np.abs(streamed[:, None] - offline[None, :]), axis=1)
    assert len(streamed) > 10
    assert np.all(distance_to_a_beat < 1e-4)
