"""Benchmark the MLPerf Tiny anomaly-detection autoencoder shape with ``anomalyforge device bench``.

The MLPerf Tiny v1.0 anomaly-detection model (the DCASE 2020 task 2 baseline on ToyADMOS)
is a dense autoencoder on 640 log-mel features (5 frames x 128 mel bands):
640-128-128-128-128-8-128-128-128-128-640, each hidden Dense layer followed by batch
normalisation and ReLU. Published microcontroller latencies are for this shape, so timing it
here with the same pipeline as the toolkit's detectors puts both on one scale.

This script needs torch, onnx and onnxruntime (the workstation side). It builds the model
with seeded random weights (latency does not depend on the weight values), exports it to
ONNX fp32 and int8 into a bundle under ``--run-dir`` (reused on later runs unless
``--rebuild``), then benchmarks the bundle. The module returns the mean squared
reconstruction error, so the bundle detector has the same interface as the toolkit's.

No ToyADMOS data ship with the toolkit, so the inputs are seeded standard-normal
640-value vectors, saved next to the bundle. The real-time factor assumes the DCASE 2020
baseline features: one new 64 ms frame (1024-sample FFT, hop of 512 samples at 16 kHz)
per window, so each window stands for 512 new samples at 16 kHz (32 ms).

Run::

    python benchmarks/mlperf_tiny_ad.py --run-dir runs/mlperf-tiny-ad --json runs/mlperf-tiny-ad/bench.json

The bundle directory can be copied to a device and timed there without torch::

    anomalyforge device bench --bundle runs/mlperf-tiny-ad/bundle \\
        --input runs/mlperf-tiny-ad/inputs.npy --sample-rate 16000 --samples-per-window 512
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from anomalyforge.device.bench import format_report, run_bench

logger = logging.getLogger("benchmarks.mlperf_tiny_ad")

MODEL_NAME = "mlperf_tiny_ad"
INPUT_SIZE = 640
HIDDEN_SIZE = 128
BOTTLENECK_SIZE = 8
HIDDEN_LAYERS_PER_SIDE = 4
SEED = 0
N_INPUTS = 1000
N_CALIBRATION = 200
SAMPLE_RATE_HZ = 16000.0
SAMPLES_PER_WINDOW = 512


def build_module():
    """Return the reference autoencoder, in eval mode, with a score head (mean squared error)."""
    import torch
    from torch import nn

    def dense(in_features: int, out_features: int) -> list:
        return [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU()]

    sizes = [INPUT_SIZE] + [HIDDEN_SIZE] * HIDDEN_LAYERS_PER_SIDE + [BOTTLENECK_SIZE]
    sizes += [HIDDEN_SIZE] * HIDDEN_LAYERS_PER_SIDE
    layers = []
    for in_features, out_features in zip(sizes[:-1], sizes[1:]):
        layers += dense(in_features, out_features)
    layers.append(nn.Linear(HIDDEN_SIZE, INPUT_SIZE))

    class ReferenceAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*layers)

        def forward(self, window: torch.Tensor) -> torch.Tensor:
            return (window - self.net(window)).pow(2).mean(dim=1)

    torch.manual_seed(SEED)
    module = ReferenceAutoencoder()
    # Non-trivial batch-norm statistics, so the exported graph cannot drop them as identities.
    with torch.no_grad():
        for layer in module.net:
            if isinstance(layer, nn.BatchNorm1d):
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
    return module.eval()


def reference_task() -> dict:
    return {
        "modality": "log-mel-frames",
        "dataset": "none: seeded standard-normal inputs (reference model for latency only)",
        "window_length": INPUT_SIZE,
        "hop": INPUT_SIZE,
        "channels": 1,
        "sample_format": "float32",
        "sample_rate_hz": None,
        "window_description": "5 frames x 128 log-mel bands, flattened (MLPerf Tiny anomaly detection)",
    }


def build_bundle(run_dir: Path) -> tuple[Path, Path, object]:
    """Export the reference model into ``run_dir/bundle``, save its inputs, and return both paths and the module."""
    import torch

    from anomalyforge.export.writer import BundleWriter
    from anomalyforge.thresholds import calibrate_threshold

    module = build_module()
    inputs = np.random.default_rng(SEED).standard_normal((N_INPUTS, INPUT_SIZE)).astype(np.float32)
    calibration = inputs[:N_CALIBRATION]
    with torch.no_grad():
        scores = module(torch.from_numpy(calibration)).numpy()
    threshold = calibrate_threshold(scores, 0.01, source="seeded Gaussian inputs")

    bundle_dir = run_dir / "bundle"
    writer = BundleWriter(bundle_dir, reference_task(), [])
    writer.add_detector(MODEL_NAME, module, calibration[:1], threshold.to_dict(),
                        "mean squared reconstruction error (MLPerf Tiny anomaly-detection shape)", calibration)
    writer.finish(MODEL_NAME)
    inputs_path = run_dir / "inputs.npy"
    np.save(inputs_path, inputs[N_CALIBRATION:])
    return bundle_dir, inputs_path, module


def compare_with_module(module, bundle_dir: Path, inputs_path: Path, windows: int, threads: int) -> dict:
    """Time the original ``nn.Module`` against the module rebuilt from ONNX, interleaved per window.

    The bench's torch baseline is the rebuilt module, so this shows how far it is from the
    module that was exported.
    """
    import torch

    from anomalyforge.bundle import load_bundle
    from anomalyforge.export.torch_baseline import load_torch_baseline

    bundle = load_bundle(bundle_dir)
    rebuilt = load_torch_baseline(bundle.path_of(bundle.file_entry(MODEL_NAME, "onnx-fp32")))
    batch = np.load(inputs_path)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = {"module": [], "rebuilt": []}
    try:
        with torch.inference_mode():
            difference = float((module(torch.from_numpy(batch)) - rebuilt(torch.from_numpy(batch))).abs().max())
        for step in range(windows + 100):
            window = batch[step % len(batch)][np.newaxis, :]
            order = [("module", module), ("rebuilt", rebuilt)]
            for key, model in order if step % 2 == 0 else order[::-1]:
                started = time.perf_counter_ns()
                with torch.inference_mode():
                    model(torch.from_numpy(window)).numpy()
                if step >= 100:
                    times[key].append((time.perf_counter_ns() - started) / 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
    result = {"max_abs_score_diff": difference, "windows": windows}
    for key, values in times.items():
        result[f"{key}_p50_us"] = float(np.percentile(values, 50))
        result[f"{key}_p99_us"] = float(np.percentile(values, 99))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/mlperf-tiny-ad"),
                        help="directory for the bundle, inputs and report (default: %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="export the bundle again even if it exists")
    parser.add_argument("--windows", type=int, default=1000, help="timed windows per format and repeat")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    bundle_dir, inputs_path = args.run_dir / "bundle", args.run_dir / "inputs.npy"
    module = None
    if args.rebuild or not (bundle_dir / "manifest.json").is_file() or not inputs_path.is_file():
        if bundle_dir.exists():
            import shutil

            shutil.rmtree(bundle_dir)
        args.run_dir.mkdir(parents=True, exist_ok=True)
        bundle_dir, inputs_path, module = build_bundle(args.run_dir)
    else:
        logger.info("reusing %s (pass --rebuild to export it again)", bundle_dir)
        module = build_module()

    report = run_bench(bundle_dir, threads=args.threads, windows=args.windows, repeats=args.repeats,
                       input_path=inputs_path, sample_rate_hz=SAMPLE_RATE_HZ,
                       samples_per_window=SAMPLES_PER_WINDOW, torch_baseline="on")
    report["module_vs_rebuilt_baseline"] = compare_with_module(module, bundle_dir, inputs_path,
                                                                args.windows, args.threads)
    print(format_report(report))
    comparison = report["module_vs_rebuilt_baseline"]
    print(f"torch nn.Module vs module rebuilt from ONNX (the baseline): p50 "
          f"{comparison['module_p50_us']:.1f} vs {comparison['rebuilt_p50_us']:.1f} us, p99 "
          f"{comparison['module_p99_us']:.1f} vs {comparison['rebuilt_p99_us']:.1f} us, "
          f"max score difference {comparison['max_abs_score_diff']:.2g}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
