"""The main job end to end on the embedded ECG5000 data.

``run_demo`` goes through every stage a user would: few-shot split, CVAE generator, four
detectors with calibrated thresholds, held-out evaluation, ONNX fp32 / int8 export with
parity checks, the model bundle, streaming held-out beats through a simulated serial device
on a real pseudo-terminal, and on-device threshold calibration with decoder-generated
anomalies. Every figure goes to ``metrics.json`` in the run directory.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from anomalyforge import __version__
from anomalyforge.signal import preprocessing_spec
from anomalyforge.training.datasets import ECG5000_NORMAL_CLASS, ecg5000_task, load_ecg5000
from anomalyforge.training.experiment import (
    DETECTOR_OUTPUTS, ExperimentConfig, prepare, train_classifiers, train_generator, train_unsupervised,
)
from anomalyforge.training.fitting import score_windows
from anomalyforge.training.generators import one_hot_conditions
from anomalyforge.training.report import REPORT_DIR, build_report, save_report_inputs
from anomalyforge.training.splits import few_shot_split

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR = "autoencoder"
CLASSIFIERS = ("classifier_synthetic", "classifier_real")
DECODER_NAME = "decoder"
SEED_METRICS = ("roc_auc", "pr_auc", "recall", "fpr")
DEMO_OUTPUTS = ("bundle", "device-bundle", "bundle.zip", "metrics.json", "local_normals.txt",
                "report_inputs.npz", "report", "modules", "export-onnx", "export-tflite", "export-mcu")


@dataclass
class DemoConfig:
    run_dir: Path
    k: int = 10
    n_synthetic: int = 1000
    seed: int = 0
    n_seeds: int = 3
    target_fpr: float = 0.01
    stream_beats: int | None = None
    calibration_beats: int = 1000
    torch_threads: int = 1


class StepTimer:
    """Log each demo step with its number and duration."""

    def __init__(self, n_steps: int):
        self.n_steps = n_steps
        self.step = 0
        self.durations: dict[str, float] = {}

    def run(self, title: str, function, *args, **kwargs):
        self.step += 1
        logger.info("[%d/%d] %s", self.step, self.n_steps, title)
        started = time.perf_counter()
        result = function(*args, **kwargs)
        self.durations[title] = round(time.perf_counter() - started, 2)
        logger.info("[%d/%d] %s done in %.1f s", self.step, self.n_steps, title, self.durations[title])
        return result


def summarise_seeds(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Mean and standard deviation over seeds of each classifier's held-out metrics."""
    summary = {}
    for name in CLASSIFIERS:
        rows = [per_seed[seed][name] for seed in per_seed]
        entry = {}
        for metric in SEED_METRICS:
            values = np.array([row[metric] for row in rows])
            entry[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=0)),
                             "values": values.tolist()}
        classes = rows[0]["recall_per_class"].keys()
        entry["recall_per_class"] = {
            label: {"mean": float(np.mean([row["recall_per_class"][label] for row in rows])),
                    "std": float(np.std([row["recall_per_class"][label] for row in rows]))}
            for label in classes
        }
        diagnostic = np.array([row["diagnostic_recall_at_test_fpr"]["recall"] for row in rows])
        entry["diagnostic_recall_at_test_fpr"] = {"mean": float(diagnostic.mean()), "std": float(diagnostic.std())}
        summary[name] = entry
    return summary


def run_seed_comparison(train, test, config: DemoConfig, experiment: ExperimentConfig, first: dict) -> dict:
    """Repeat split, generator and both classifiers for the remaining seeds; return per-seed metrics."""
    per_seed = {config.seed: {name: first[name].evaluation for name in CLASSIFIERS}}
    for offset in range(1, config.n_seeds):
        seed = config.seed + offset
        logger.info("seed comparison: seed %d (%d of %d)", seed, offset + 1, config.n_seeds)
        split = prepare(few_shot_split(train, test, config.k, seed=seed))
        _, synthetic, _ = train_generator(split, experiment, seed)
        trained = train_classifiers(split, synthetic, experiment, seed)
        per_seed[seed] = {name: trained[name].evaluation for name in CLASSIFIERS}
    return per_seed


def export_bundle(bundle_dir: Path, split, detectors: dict, generator, seed: int):
    """Export every detector and the decoder into a bundle; return the writer and file paths."""
    from anomalyforge.export.writer import BundleWriter

    writer = BundleWriter(bundle_dir, ecg5000_task(split.test.x.shape[1]), preprocessing_spec())
    paths = {}
    for name, detector in detectors.items():
        paths[name] = writer.add_detector(
            name, detector.module, split.normal_val[:1], detector.threshold_record(),
            DETECTOR_OUTPUTS[name], split.normal_val,
        )
    rng = np.random.default_rng(seed)
    n_calibration = 256
    labels = generator.class_schedule(n_calibration)
    calibration_inputs = {
        "z": rng.standard_normal((n_calibration, generator.latent_dim)).astype(np.float32),
        "condition": one_hot_conditions(labels, generator.classes_),
    }
    paths[DECODER_NAME] = writer.add_decoder(DECODER_NAME, generator.decoder, generator.latent_dim,
                                             generator.classes_, calibration_inputs)
    return writer, paths, calibration_inputs


def evaluate_exports(paths: dict, detectors: dict, split, generator, decoder_inputs: dict) -> dict:
    """Score the held-out test set with every exported file; compare with torch."""
    import torch

    from anomalyforge.export.onnx_export import run_onnx
    from anomalyforge.training.evaluation import evaluate_scores

    results = {}
    for name, detector in detectors.items():
        results[name] = {"torch": {"roc_auc": detector.evaluation["roc_auc"]}}
        for format_key, path in paths[name].items():
            scores = run_onnx(path, {"window": split.test.x}, threads=1)[0].astype(np.float64)
            evaluation = evaluate_scores(scores, split.test.y, split.normal_class, detector.threshold.value)
            results[name][format_key] = {
                "roc_auc": evaluation["roc_auc"],
                "roc_auc_minus_torch": evaluation["roc_auc"] - detector.evaluation["roc_auc"],
                "recall": evaluation["recall"],
                "fpr": evaluation["fpr"],
                "max_abs_score_diff": float(np.max(np.abs(scores - detector.test_scores))),
                "file_bytes": Path(path).stat().st_size,
            }
    with torch.no_grad():
        reference = generator.decoder(torch.from_numpy(decoder_inputs["z"]),
                                      torch.from_numpy(decoder_inputs["condition"])).numpy()
    results[DECODER_NAME] = {}
    for format_key, path in paths[DECODER_NAME].items():
        generated = run_onnx(path, decoder_inputs, threads=1)[0]
        results[DECODER_NAME][format_key] = {
            "max_abs_diff": float(np.max(np.abs(generated - reference))),
            "mean_abs_diff": float(np.mean(np.abs(generated - reference))),
            "file_bytes": Path(path).stat().st_size,
        }
    return results


def stream_test_beats(bundle_dir: Path, beats: np.ndarray, labels: np.ndarray, workstation_threshold: float,
                      precision: str = "int8") -> dict:
    """Play beats as text lines on a pseudo-terminal and score them with the device runtime.

    The device uses the threshold currently in ``bundle_dir``; the labels let the demo
    report the false-positive rate and recall that threshold gives on the streamed beats,
    beside what the workstation threshold would have given on the same scores.
    """
    from anomalyforge.bundle import load_bundle
    from anomalyforge.device.detector import DeviceDetector
    from anomalyforge.device.stream import stream_port
    from anomalyforge.firmware_bridge.simulator import PtySerialDevice

    detector = DeviceDetector.from_bundle(load_bundle(bundle_dir), precision=precision)
    records: list[dict] = []
    with PtySerialDevice() as device:
        device.play_lines(beats, wait_for_host=True, close_when_done=True)
        summary = stream_port(detector, device.port, mode="beat", on_window=records.append,
                              on_open=device.host_opened, idle_timeout_s=30.0, summary_stream=None)
        device.wait_written(timeout=30.0)
        sent = device.lines_written
    streamed_scores = np.array([record["score"] for record in records], dtype=np.float64)
    offline_scores = detector.score(beats)
    result = {
        "detector": detector.name,
        "precision": precision,
        "port": summary.port,
        "windows_sent": sent,
        "windows_scored": summary.windows,
        "anomalies_flagged": summary.anomalies,
        "skipped_lines": summary.skipped_total,
        "latency_p50_us": summary.latency_p50_us,
        "latency_p99_us": summary.latency_p99_us,
        "duration_s": summary.duration_s,
        "stop_reason": summary.stop_reason,
    }
    if len(beats) == 0 or len(streamed_scores) != len(beats):
        logger.error("streaming lost windows: %d scored of %d sent", len(streamed_scores), len(beats))
        return result
    result["max_abs_diff_vs_offline"] = float(np.max(np.abs(streamed_scores - offline_scores)))
    is_anomaly = labels != ECG5000_NORMAL_CLASS
    for name, threshold in (("device_threshold", detector.threshold), ("workstation_threshold", workstation_threshold)):
        flagged = streamed_scores > threshold
        # None (JSON null) where the streamed beats hold no normals or no anomalies.
        result[name] = {
            "value": float(threshold),
            "fpr": float(flagged[~is_anomaly].mean()) if (~is_anomaly).any() else None,
            "recall": float(flagged[is_anomaly].mean()) if is_anomaly.any() else None,
        }
    return result


def calibrate_on_device(bundle_dir: Path, local_normals: np.ndarray, config: DemoConfig) -> dict:
    """Run the device calibration from a text file of local normal beats, as the CLI would."""
    from anomalyforge.device.calibrate import calibrate_bundle
    from anomalyforge.device.stream import read_windows_file
    from anomalyforge.firmware_bridge.simulator import format_line

    normals_path = Path(bundle_dir).parent / "local_normals.txt"
    normals_path.write_bytes(b"".join(format_line(beat) for beat in local_normals))
    windows = read_windows_file(normals_path, local_normals.shape[1])
    return calibrate_bundle(bundle_dir, windows, precision="int8", n_generated=config.n_synthetic,
                            target_fpr=config.target_fpr, seed=config.seed,
                            input_description=f"file {normals_path.name} ({len(windows)} normal beats)")


def remove_previous_outputs(run_dir: Path) -> None:
    """Delete what an earlier demo wrote into ``run_dir`` (only the demo's own file names)."""
    for name in DEMO_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        logger.info("removed %s from an earlier run", path)


def bundle_size(bundle_dir: Path) -> int:
    return sum(path.stat().st_size for path in Path(bundle_dir).iterdir() if path.is_file())


def run_demo(config: DemoConfig) -> dict:
    """Run the main job into ``config.run_dir`` and return the metrics written to metrics.json."""
    import torch

    started = time.perf_counter()
    # These models are tiny: one intra-op thread is as fast as two on an idle machine and
    # many times faster when other processes compete for the cores (OpenMP spin-waiting).
    torch.set_num_threads(config.torch_threads)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_previous_outputs(run_dir)
    bundle_dir = run_dir / "bundle"
    experiment = ExperimentConfig(n_synthetic=config.n_synthetic, target_fpr=config.target_fpr)
    timer = StepTimer(n_steps=10)

    train, test = timer.run("load embedded ECG5000", load_ecg5000)
    split = timer.run("few-shot split", lambda: prepare(few_shot_split(train, test, config.k, seed=config.seed)))
    detectors = timer.run("autoencoder and PCA baseline", train_unsupervised, split, experiment, config.seed)
    generator, synthetic, synthetic_classes = timer.run("CVAE generator", train_generator, split, experiment,
                                                        config.seed)
    detectors.update(timer.run("classifiers with and without synthetic anomalies", train_classifiers,
                               split, synthetic, experiment, config.seed))
    save_report_inputs(
        run_dir, normals=split.normal_all, anomalies=split.anomalies, anomaly_classes=split.anomaly_classes,
        synthetic={"cvae": (synthetic, synthetic_classes)}, test_x=split.test.x, test_y=split.test.y,
        normal_class=split.normal_class,
        detector_test_scores={name: detector.test_scores for name, detector in detectors.items()},
        detector_thresholds={name: detector.threshold.value for name, detector in detectors.items()},
        detector_synthetic_scores={"cvae": {name: score_windows(detector.module, synthetic)
                                            for name, detector in detectors.items()}},
    )
    per_seed = timer.run(f"classifier comparison over {config.n_seeds} seeds", run_seed_comparison,
                         train, test, config, experiment, detectors)

    writer, paths, decoder_inputs = timer.run("export ONNX fp32 / int8", export_bundle, bundle_dir, split,
                                              detectors, generator, config.seed)
    from anomalyforge.export.cli import save_run_modules

    save_run_modules(run_dir, detectors, generator, k=config.k, seed=config.seed,
                     window_length=split.test.x.shape[1])
    exported = evaluate_exports(paths, detectors, split, generator, decoder_inputs)
    writer.finish(DEFAULT_DETECTOR, metrics={"held_out_test": exported})

    from anomalyforge.bundle import zip_bundle

    zip_path = zip_bundle(bundle_dir, run_dir / "bundle.zip")

    # The device's copy of the bundle: calibrated on the normal beats among the first
    # calibration_beats of TEST ("the first minutes on this sensor"), then streaming the rest,
    # so no streamed beat was used for calibration.
    device_dir = run_dir / "device-bundle"
    if device_dir.exists():
        shutil.rmtree(device_dir)
    shutil.copytree(bundle_dir, device_dir)
    local = test.x[:config.calibration_beats]
    local_normals = local[test.y[:config.calibration_beats] == ECG5000_NORMAL_CLASS]
    calibration = timer.run("device calibration with decoder-generated anomalies", calibrate_on_device,
                            device_dir, local_normals, config)

    stream_end = len(test.x) if config.stream_beats is None else config.calibration_beats + config.stream_beats
    streaming = timer.run(
        "stream held-out beats over a pseudo-terminal", stream_test_beats, device_dir,
        test.x[config.calibration_beats:stream_end], test.y[config.calibration_beats:stream_end],
        detectors[DEFAULT_DETECTOR].threshold.value,
    )

    quality_report = timer.run("synthetic-data quality report", build_report, run_dir)
    metrics = {
        "anomalyforge_version": __version__,
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "split": split.summary(),
        "detectors": {
            name: {
                "torch": detector.evaluation,
                "threshold": detector.threshold_record(),
                "fit_seconds": round(detector.fit_seconds, 2),
                "exported": exported[name],
            }
            for name, detector in detectors.items()
        },
        "decoder": exported[DECODER_NAME],
        "classifier_seeds": {"per_seed": {str(seed): rows for seed, rows in per_seed.items()},
                             "summary": summarise_seeds(per_seed)},
        "bundle": {"dir": str(bundle_dir), "zip": str(zip_path), "bytes": bundle_size(bundle_dir),
                   "zip_bytes": zip_path.stat().st_size, "device_copy": str(device_dir)},
        "streaming": streaming,
        "device_calibration": calibration,
        "quality_report": {
            "dir": str(run_dir / REPORT_DIR),
            "flags": {name: entry["flags"] for name, entry in quality_report["generators"].items()},
        },
        "step_seconds": timer.durations,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", run_dir / "metrics.json")
    return metrics


def format_summary(metrics: dict) -> str:
    """Render the demo's headline figures as a plain-text table."""
    lines = []
    header = (f"{'detector':<22}{'AUC torch':>10}{'AUC fp32':>10}{'AUC int8':>10}{'int8 diff':>11}"
              f"{'PR-AUC':>8}{'recall':>8}{'FPR':>8}{'n cal':>7}{'rec@1%':>8}")
    lines.append("Held-out ECG5000 TEST (4500 real beats); thresholds for 1 % FPR set on training normals only")
    lines.append(header)
    lines.append("-" * len(header))
    for name, entry in metrics["detectors"].items():
        torch_metrics, exported = entry["torch"], entry["exported"]
        lines.append(
            f"{name:<22}{torch_metrics['roc_auc']:>10.4f}{exported['onnx-fp32']['roc_auc']:>10.4f}"
            f"{exported['onnx-int8']['roc_auc']:>10.4f}{exported['onnx-int8']['max_abs_score_diff']:>11.4f}"
            f"{torch_metrics['pr_auc']:>8.4f}{torch_metrics['recall']:>8.3f}{torch_metrics['fpr']:>8.4f}"
            f"{entry['threshold']['n_normals']:>7d}"
            f"{torch_metrics['diagnostic_recall_at_test_fpr']['recall']:>8.3f}"
        )
    threshold = next(iter(metrics["detectors"].values()))["threshold"]
    lines.append(
        f"Thresholds: {threshold['method']} on {threshold['n_normals']} normal scores per detector "
        f"(rank {threshold['rank']}): expected FPR <= {threshold['expected_fpr_bound']:.4f}, "
        f"95 % upper bound {threshold['fpr_upper_95']:.4f}. FPR = rate realised on TEST normals."
    )
    lines.append("rec@1% = recall at exactly 1 % of TEST normals: a diagnostic of ranking, never used to choose.")
    lines.append("")
    lines.append("Recall per anomaly class at the calibrated threshold (torch):")
    for name, entry in metrics["detectors"].items():
        per_class = "  ".join(f"class {label}: {value:.3f}" for label, value in entry["torch"]["recall_per_class"].items())
        lines.append(f"  {name:<22}{per_class}")
    lines.append("")
    seeds = metrics["classifier_seeds"]["summary"]
    n_seeds = len(metrics["classifier_seeds"]["per_seed"])
    lines.append(f"Classifier with vs without synthetic anomalies, mean +- std over {n_seeds} seeds:")
    for name, entry in seeds.items():
        lines.append(
            f"  {name:<22}AUC {entry['roc_auc']['mean']:.4f} +- {entry['roc_auc']['std']:.4f}   "
            f"recall {entry['recall']['mean']:.3f} +- {entry['recall']['std']:.3f}   "
            f"FPR {entry['fpr']['mean']:.4f} +- {entry['fpr']['std']:.4f}"
        )
    lines.append("")
    streaming = metrics["streaming"]
    calibration = metrics["device_calibration"]
    lines.append(
        f"Bundle: {metrics['bundle']['bytes'] / 1024:.0f} KiB ({metrics['bundle']['zip_bytes'] / 1024:.0f} KiB zipped); "
        f"decoder int8 max abs diff {metrics['decoder']['onnx-int8']['max_abs_diff']:.4f}"
    )
    previous = calibration["previous_threshold"]["value"] if calibration.get("previous_threshold") else float("nan")
    lines.append(
        f"Device calibration ({calibration['detector']}, {calibration['precision']}): threshold "
        f"{previous:.4f} -> {calibration['threshold']['value']:.4f} from {calibration['n_normals']} local normals; "
        f"{calibration['detection_rate']:.3f} of {calibration['n_generated']} decoder-generated anomalies detected"
    )
    lines.append(
        f"Streaming ({streaming['detector']}, {streaming['precision']}, pty {streaming['port']}): "
        f"{streaming['windows_scored']} windows scored of {streaming['windows_sent']} sent, "
        f"{streaming['skipped_lines']} lines skipped, latency p50 {streaming['latency_p50_us']:.0f} us, "
        f"p99 {streaming['latency_p99_us']:.0f} us"
    )
    device_fpr = streaming.get("device_threshold", {}).get("fpr")
    bound = calibration["threshold"].get("fpr_upper_95")
    if device_fpr is not None and bound is not None and device_fpr > bound:
        lines.append(
            f"  NOTE: the streamed FPR {device_fpr:.4f} is above the calibration's 95 % bound {bound:.4f}. "
            "The bound assumes the calibration and streamed normals are exchangeable; here they come "
            "from different parts of one recording."
        )
    for key in ("device_threshold", "workstation_threshold"):
        if key in streaming:
            entry = streaming[key]
            fpr = "n/a" if entry["fpr"] is None else f"{entry['fpr']:.4f}"
            recall = "n/a" if entry["recall"] is None else f"{entry['recall']:.3f}"
            lines.append(f"  streamed beats with the {key.replace('_', ' ')} {entry['value']:.4f}: "
                         f"FPR {fpr}, recall {recall}")
    report = metrics["quality_report"]
    flags = "; ".join(f"{name}: {', '.join(found) or 'none'}" for name, found in report["flags"].items())
    lines.append(f"Synthetic-data quality report: {report['dir']}/report.html (flags: {flags})")
    lines.append(f"Total time {metrics['total_seconds']:.0f} s")
    return "\n".join(lines)
