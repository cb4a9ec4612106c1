"""The ``anomalyforge`` command line, run as a subprocess the way a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DETECTORS = {"autoencoder", "pca", "classifier_synthetic", "classifier_real"}


def run_cli(*args: str, cwd=None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anomalyforge", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )


@pytest.mark.parametrize("command", [
    [],
    ["demo"],
    ["device"],
    ["device", "stream"],
    ["device", "calibrate"],
])
def test_help_prints_usage(command):
    result = run_cli(*command, "--help")

    assert result.returncode == 0
    assert result.stdout.startswith(" ".join(["usage: anomalyforge", *command]))


def test_stream_missing_bundle(tmp_path):
    result = run_cli("device", "stream", "--bundle", "/nonexistent", "--port", "/dev/nonexistent", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 2
    assert len(lines) == 1
    assert "ERROR" in lines[0]
    assert "bundle /nonexistent not found" in lines[0]


def test_stream_missing_port(tiny_bundle, tmp_path):
    result = run_cli("--log-level", "ERROR", "device", "stream", "--bundle", str(tiny_bundle),
                     "--port", "/dev/nonexistent", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 2
    assert len(lines) == 1
    assert "cannot open serial port '/dev/nonexistent'" in lines[0]


@pytest.mark.parametrize("option", ["--k", "--synthetic", "--seeds"])
def test_demo_rejects_zero(option, tmp_path):
    result = run_cli("demo", "--run-dir", str(tmp_path / "run"), option, "0", cwd=tmp_path)

    assert result.returncode == 2
    assert "--k, --synthetic and --seeds must be at least 1" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    # 47 to 56 s measured on a 2-core machine, because the detectors still train with the
    # demo's full epoch counts and the CLI has no option to shorten them.
    run_dir = tmp_path / "run"
    result = run_cli("--log-level", "WARNING", "demo", "--run-dir", str(run_dir), "--seeds", "1",
                     "--synthetic", "50", "--stream-beats", "50", cwd=tmp_path, timeout=600.0)

    assert result.returncode == 0, result.stderr
    assert "Held-out ECG5000 TEST" in result.stdout
    assert (run_dir / "bundle.zip").is_file()
    assert (run_dir / "bundle" / "manifest.json").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["detectors"]) == DETECTORS
    assert metrics["streaming"]["windows_sent"] == 50
    assert metrics["streaming"]["windows_scored"] == 50
    assert metrics["device_calibration"]["n_generated"] == 50
    assert list(metrics["classifier_seeds"]["per_seed"]) == ["0"]
