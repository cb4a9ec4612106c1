"""The main job end to end with default settings (one seed for the classifier comparison).

This is the slowest test (about a minute on 2 cores) and the one that checks the figures a
user is promised: autoencoder ROC-AUC, realised false-positive rates, int8 parity and a
lossless serial stream.
"""

from __future__ import annotations

import json

import pytest

from anomalyforge.bundle import load_bundle
from anomalyforge.demo import DemoConfig, format_summary, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import torch

    run_dir = tmp_path_factory.mktemp("demo")
    previous_threads = torch.get_num_threads()
    try:
        metrics = run_demo(DemoConfig(run_dir=run_dir, n_seeds=1))
    finally:
        torch.set_num_threads(previous_threads)
    return run_dir, metrics


def test_demo_writes_metrics_json(demo_run):
    run_dir, metrics = demo_run
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["detectors"].keys() == {"autoencoder", "pca", "classifier_synthetic", "classifier_real"}
    assert written["streaming"]["windows_scored"] == metrics["streaming"]["windows_scored"]


def test_demo_autoencoder_auc(demo_run):
    _, metrics = demo_run
    assert metrics["detectors"]["autoencoder"]["torch"]["roc_auc"] >= 0.98


@pytest.mark.parametrize("name", ["autoencoder", "pca", "classifier_synthetic", "classifier_real"])
def test_demo_realised_fpr(demo_run, name):
    _, metrics = demo_run
    detector = metrics["detectors"][name]
    assert detector["torch"]["fpr"] <= 0.015
    assert detector["threshold"]["n_normals"] == 292


@pytest.mark.parametrize("name", ["autoencoder", "pca", "classifier_synthetic", "classifier_real"])
def test_demo_int8_auc_parity(demo_run, name):
    _, metrics = demo_run
    exported = metrics["detectors"][name]["exported"]
    assert abs(exported["onnx-int8"]["roc_auc_minus_torch"]) <= 0.01
    assert exported["onnx-fp32"]["max_abs_score_diff"] < 1e-4


def test_demo_stream_loses_nothing(demo_run):
    _, metrics = demo_run
    streaming = metrics["streaming"]
    assert streaming["windows_sent"] == 3500
    assert streaming["windows_scored"] == streaming["windows_sent"]
    assert streaming["skipped_lines"] == 0
    assert streaming["max_abs_diff_vs_offline"] < 1e-5


def test_demo_device_calibration(demo_run):
    run_dir, metrics = demo_run
    model = load_bundle(run_dir / "device-bundle").model("autoencoder")
    assert model["threshold"]["source"] == "device"
    assert model["threshold_history"][-1]["source"] == "workstation"
    assert metrics["device_calibration"]["n_normals"] == 1000
    shipped = load_bundle(run_dir / "bundle.zip").model("autoencoder")
    assert shipped["threshold"]["source"] == "workstation"


def test_demo_summary_table(demo_run):
    _, metrics = demo_run
    table = format_summary(metrics)
    assert "autoencoder" in table
    assert "3500 windows scored of 3500 sent" in table
