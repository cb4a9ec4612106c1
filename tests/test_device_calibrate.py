"""On-device threshold calibration with the tiny bundle's real detector and decoder."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime
import pytest

from anomalyforge.bundle import load_bundle
from anomalyforge.device import DeviceDetector, calibrate_bundle, collect_windows, read_windows_file
from anomalyforge.device.cli import add_device_commands
from anomalyforge.errors import InvalidInputError
from anomalyforge.firmware_bridge import PtySerialDevice, format_line
from anomalyforge.thresholds import calibrate_threshold


@pytest.fixture(scope="module")
def test_normals(tiny_bundle_data):
    return tiny_bundle_data["test_x"][tiny_bundle_data["test_y"] == 1][:200]


def generate_reference(bundle_dir, n_generated, seed):
    """Run the decoder in a separate onnxruntime session with the documented sampling rule."""
    session = onnxruntime.InferenceSession(str(bundle_dir / "decoder.fp32.onnx"))
    z = np.random.default_rng(seed).standard_normal((n_generated, 8)).astype(np.float32)
    condition = np.eye(4, dtype=np.float32)[np.arange(n_generated) % 4]
    return session.run(["beat"], {"z": z, "condition": condition})[0]


def run_cli(arguments):
    parser = argparse.ArgumentParser(prog="anomalyforge device")
    add_device_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(arguments)
    return args.handler(args)


def test_calibrate_from_npy_writes_threshold(bundle_copy, test_normals, tmp_path):
    original = load_bundle(bundle_copy).model("autoencoder")["threshold"]
    path = tmp_path / "normals.npy"
    np.save(path, test_normals)

    report = calibrate_bundle(bundle_copy, read_windows_file(path, 140), n_generated=200,
                              target_fpr=0.02, seed=3, input_description=f"file {path}")

    model = load_bundle(bundle_copy).model("autoencoder")
    detector = DeviceDetector.from_bundle(bundle_copy, precision="int8")
    expected = calibrate_threshold(detector.score(test_normals), 0.02, source="device")
    assert model["threshold"]["value"] == pytest.approx(expected.value, abs=1e-7)
    assert model["threshold"]["source"] == "device"
    assert model["threshold_history"] == [original]
    calibration = model["threshold"]["calibration"]
    assert calibration["input"] == f"file {path}"
    assert calibration["n_normals"] == 200
    assert calibration["n_generated"] == 200
    assert calibration["set_at"].endswith("+00:00")

    generated_scores = detector.score(generate_reference(bundle_copy, 200, seed=3))
    flagged = generated_scores > expected.value
    assert report["detection_rate"] == pytest.approx(float(flagged.mean()))
    assert calibration["generated_detection_rate"] == report["detection_rate"]
    assert set(report["detection_rate_per_class"]) == {"2", "3", "4", "5"}
    for index, label in enumerate(["2", "3", "4", "5"]):
        assert report["detection_rate_per_class"][label] == pytest.approx(float(flagged[index::4].mean()))
    assert report["previous_threshold"] == original


def test_calibrate_cli_text_file_keeps_history(bundle_copy, test_normals, tmp_path, capsys):
    path = tmp_path / "normals.txt"
    path.write_bytes(b"".join(format_line(beat) for beat in test_normals[:120]) + b"not,a,beat\n")

    reports = []
    for seed in (0, 1):
        exit_code = run_cli(["calibrate", "--bundle", str(bundle_copy), "--input", str(path),
                             "--generated", "40", "--seed", str(seed)])
        assert exit_code == 0
        reports.append(json.loads(capsys.readouterr().out))

    model = load_bundle(bundle_copy).model("autoencoder")
    assert len(model["threshold_history"]) == 2
    assert model["threshold_history"][0]["source"] == "workstation"
    assert model["threshold_history"][1]["source"] == "device"
    assert model["threshold"]["n_normals"] == 120
    assert model["threshold"]["calibration"]["seed"] == 1
    assert reports[1]["threshold"] == model["threshold"]
    assert reports[1]["previous_threshold"] == model["threshold_history"][1]
    assert 0.0 <= reports[1]["detection_rate"] <= 1.0


def test_calibrate_too_few_normals(bundle_copy, test_normals):
    with pytest.raises(InvalidInputError, match="50 normal windows are too few.*at least 99 are needed"):
        calibrate_bundle(bundle_copy, test_normals[:50], target_fpr=0.01, n_generated=10)
    assert load_bundle(bundle_copy).model("autoencoder").get("threshold_history", []) == []


def test_collect_windows_from_port(test_normals):
    with PtySerialDevice(drain_timeout_s=0.5) as device:
        device.play_lines(test_normals[:30])
        windows, summary = collect_windows(device.port, 25, 140, on_open=device.host_opened)

    assert windows.shape == (25, 140)
    assert summary.stop_reason == "done"
    np.testing.assert_array_equal(windows, test_normals[:25])
