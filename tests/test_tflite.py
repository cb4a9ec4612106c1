"""TFLite export and the LiteRT device backend on real held-out ECG5000 beats.

The export tests need litert-torch (``pip install 'anomalyforge[tflite-export]'``) and are
skipped without it; the numpy-only helpers are tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from anomalyforge.device.tflite_backend import dequantize, import_tflite_interpreter, quantize
from anomalyforge.errors import MissingDependencyError

HAVE_TFLITE_EXPORT = all(importlib.util.find_spec(name) is not None
                         for name in ("litert_torch", "ai_edge_litert", "tflite_micro"))
needs_tflite_export = pytest.mark.skipif(
    not HAVE_TFLITE_EXPORT,
    reason="litert-torch, ai-edge-litert or tflite-micro is not installed; "
           "install them with pip install 'anomalyforge[tflite-export]'",
)
TFLM_BEATS = 300


class SavedDetector:
    """The attributes of a TrainedDetector that save_run_modules reads."""

    def __init__(self, module, threshold: dict):
        self.module = module
        self.threshold = threshold

    def threshold_record(self) -> dict:
        return self.threshold


@pytest.fixture(scope="module")
def tflite_export(tmp_path_factory):
    """A small trained run exported to ONNX and TFLite with TFLite Micro parity (mcu target)."""
    import torch

    from anomalyforge.export.cli import export_run, save_run_modules
    from anomalyforge.thresholds import calibrate_threshold
    from anomalyforge.training.datasets import load_ecg5000
    from anomalyforge.training.detectors import AutoencoderConfig, fit_autoencoder
    from anomalyforge.training.experiment import prepare
    from anomalyforge.training.fitting import score_windows
    from anomalyforge.training.generators import CVAEConfig, CVAEGenerator
    from anomalyforge.training.splits import few_shot_split

    run_dir = tmp_path_factory.mktemp("tflite_run")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = load_ecg5000()
        split = prepare(few_shot_split(train, test, k=10, seed=0))
        autoencoder = fit_autoencoder(split.normal_train, 0, AutoencoderConfig(epochs=8, channels=16))
        generator = CVAEGenerator(CVAEConfig(epochs=8, channels=16, latent_dim=8)).fit(
            split.normal_train, split.anomalies, split.anomaly_classes, 0)
        threshold = calibrate_threshold(score_windows(autoencoder, split.normal_val), 0.05).to_dict()
        save_run_modules(run_dir, {"autoencoder": SavedDetector(autoencoder, threshold)}, generator,
                         k=10, seed=0, window_length=split.test.x.shape[1])
        report = export_run(run_dir, target="mcu", with_onnx=True, tflm_beats=TFLM_BEATS)
    finally:
        torch.set_num_threads(previous_threads)
    return {"report": report, "bundle": Path(report["bundle"]), "test_x": split.test.x, "test_y": split.test.y,
            "out_dir": run_dir / "export-mcu"}


def rows_by_format(report: dict, model: str) -> dict:
    return {row["format"]: row for row in report["rows"] if row["model"] == model}


def test_quantize_round_trip_within_half_step():
    values = np.linspace(-1.0, 1.0, 101, dtype=np.float32)
    restored = dequantize(quantize(values, 0.01, 3, np.int8), 0.01, 3)
    assert np.max(np.abs(restored - values)) <= 0.005 + 1e-6


def test_quantize_clips_to_int8_range():
    codes = quantize(np.array([-10.0, 10.0], np.float32), 0.01, 0, np.int8)
    assert codes.tolist() == [-128, 127]


def test_tflite_runtime_with_numpy2_rejected(monkeypatch):
    fake_runtime = types.ModuleType("tflite_runtime")
    fake_runtime.__version__ = "2.14.0"
    fake_runtime.interpreter = types.ModuleType("tflite_runtime.interpreter")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake_runtime)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_runtime.interpreter)
    monkeypatch.setattr(np, "__version__", "2.1.0")
    with pytest.raises(MissingDependencyError, match=r"numpy<2"):
        import_tflite_interpreter()


def test_auc_drop_over_limit_listed():
    from anomalyforge.export.cli import check_auc_drops

    rows = [{"model": "autoencoder", "format": "tflite-int8", "roc_auc": 0.90, "roc_auc_torch": 0.95, "auc_drop": 0.05},
            {"model": "autoencoder", "format": "tflite-fp32", "roc_auc": 0.95, "roc_auc_torch": 0.95, "auc_drop": 0.0}]
    failures = check_auc_drops(rows, 0.01)
    assert len(failures) == 1
    assert "tflite-int8" in failures[0]


@needs_tflite_export
def test_every_format_scores_held_out_beats(tflite_export):
    rows = rows_by_format(tflite_export["report"], "autoencoder")
    assert set(rows) == {"torch", "onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8", "tflm-int8"}
    for format_key, row in rows.items():
        assert row["auc_drop"] <= 0.01, format_key
    assert rows["tflite-fp32"]["max_abs_diff_vs_torch"] < 1e-3
    assert rows["tflite-fp32"]["rows"] == 4500
    assert rows["tflm-int8"]["rows"] == TFLM_BEATS


@needs_tflite_export
def test_tflm_close_to_litert_reference_kernels(tflite_export):
    # Both models contain an int8 FULLY_CONNECTED layer, where TFLite Micro and LiteRT's
    # reference kernels differ by one int8 step on a few values (docs/tflite.md), so they
    # are compared with a tolerance. tests/test_mcu.py checks a model without one for
    # bit exactness.
    for model, tolerance in (("autoencoder", 0.01), ("decoder", 0.1)):
        exactness = rows_by_format(tflite_export["report"], model)["tflm-int8"]["vs_litert_reference_kernels"]
        assert exactness["max_abs_diff"] < tolerance, (model, exactness)


@needs_tflite_export
def test_int8_io_quantization_in_manifest(tflite_export):
    manifest = json.loads((tflite_export["bundle"] / "manifest.json").read_text())
    detector_entry = manifest["models"]["autoencoder"]["formats"]["tflite-int8"]
    decoder_entry = manifest["models"]["decoder"]["formats"]["tflite-int8"]
    assert detector_entry["inputs"][0]["dtype"] == "int8"
    assert detector_entry["inputs"][0]["scale"] > 0
    assert detector_entry["outputs"][0]["dtype"] == "float32"
    assert decoder_entry["outputs"][0]["dtype"] == "int8"
    assert isinstance(decoder_entry["outputs"][0]["zero_point"], int)
    assert detector_entry["mcu"]["ram_arena_bytes"] > 0
    assert manifest["metrics"]["held_out_test_parity"]


@needs_tflite_export
def test_report_files_written(tflite_export):
    markdown = (tflite_export["out_dir"] / "export_report.md").read_text()
    assert "tflm-int8" in markdown
    assert (tflite_export["out_dir"] / "export_report.json").is_file()


@needs_tflite_export
def test_litert_detector_matches_export_scores(tflite_export):
    from anomalyforge.device.detector import DeviceDetector
    from anomalyforge.signal import apply_preprocessing

    detector = DeviceDetector.from_bundle(tflite_export["bundle"], precision="int8", backend="litert")
    beats = tflite_export["test_x"][:200]
    scores = detector.score(beats)
    assert detector.backend_name == "litert"
    assert scores.shape == (200,)
    onnx_detector = DeviceDetector.from_bundle(tflite_export["bundle"], precision="fp32", backend="onnxruntime")
    assert np.max(np.abs(onnx_detector.score(beats) - scores)) < 0.05
    assert apply_preprocessing(detector.preprocessing, beats).shape == beats.shape


def tflite_only_copy(bundle: Path, target: Path) -> Path:
    """Copy ``bundle`` and drop every ONNX file and manifest entry."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for model in manifest["models"].values():
        for key in [key for key in model["formats"] if key.startswith("onnx")]:
            (target / model["formats"].pop(key)["file"]).unlink()
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@needs_tflite_export
def test_calibrate_from_tflite_only_bundle(tflite_export, tmp_path):
    from anomalyforge.device.calibrate import calibrate_bundle

    bundle = tflite_only_copy(tflite_export["bundle"], tmp_path / "bundle")
    normals = tflite_export["test_x"][tflite_export["test_y"] == 1][:120]
    report = calibrate_bundle(bundle, normals, precision="int8", n_generated=200, target_fpr=0.05)
    assert report["threshold"]["calibration"]["backend"] == "litert"
    assert report["n_generated"] == 200
    assert 0.0 <= report["detection_rate"] <= 1.0
