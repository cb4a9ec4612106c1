"""Command-line interface: ``anomalyforge demo|report|experiment|export|mitbih-eval``,
``anomalyforge device stream|calibrate|bench|replay`` and ``anomalyforge bridge``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from anomalyforge import __version__
from anomalyforge.errors import AnomalyForgeError, InvalidInputError, MissingDependencyError

logger = logging.getLogger("anomalyforge")


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on the embedded ECG5000 data",
        description=(
            "Few-shot split of ECG5000, CVAE synthetic anomalies, four detectors with calibrated "
            "thresholds, evaluation on the held-out TEST split, ONNX fp32/int8 export into a bundle, "
            "streaming of TEST beats through a simulated serial device, and device calibration. "
            "Writes metrics.json, the bundle and bundle.zip into the run directory."
        ),
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                        help="output directory (default: runs/demo)")
    parser.add_argument("--k", type=int, default=10,
                        help="number of real anomalies available for training (default: 10)")
    parser.add_argument("--synthetic", type=int, default=1000,
                        help="number of synthetic anomalies the CVAE generates (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of seeds for the classifier comparison: --seed, --seed + 1, ... "
                             "(default: 3)")
    parser.add_argument("--target-fpr", type=float, default=0.01,
                        help="false-positive rate the thresholds are set for (default: 0.01)")
    parser.add_argument("--stream-beats", type=int, default=None,
                        help="stream only N of the TEST beats that follow the calibration beats "
                             "(default: all of them, 3500 with the default --calibration-beats)")
    parser.add_argument("--dataset", choices=["ecg5000", "mimii", "dcase", "folder"], default="ecg5000",
                        help="data set: the embedded ECG5000 (default), or machine sounds read from --data-dir")
    parser.add_argument("--data-dir", type=Path,
                        help="folder of MIMII / DCASE 2020 Task 2 / labelled WAV files (machine sounds only)")
    parser.add_argument("--splits", type=int, default=3,
                        help="machine sounds only: train / test splits that hold out whole clips (default: 3)")
    parser.add_argument("--calibration-beats", type=int, default=1000,
                        help="the device calibrates on the normal beats among the first N TEST beats and "
                             "streams the others (default: 1000)")
    parser.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    try:
        from anomalyforge.demo import DemoConfig, format_summary, run_demo
    except ImportError as error:
        raise MissingDependencyError(
            f"the demo trains models and needs the training extras ({error}); install them with "
            "pip install 'anomalyforge[all]'"
        ) from error

    if args.dataset != "ecg5000":
        return run_audio_demo_command(args)
    if args.k < 1 or args.synthetic < 1 or args.seeds < 1:
        raise InvalidInputError(
            f"--k, --synthetic and --seeds must be at least 1 (got {args.k}, {args.synthetic}, {args.seeds})"
        )
    if not 0.0 < args.target_fpr < 1.0:
        raise InvalidInputError(f"--target-fpr must lie in (0, 1), got {args.target_fpr}")
    if args.stream_beats is not None and args.stream_beats < 1:
        raise InvalidInputError(f"--stream-beats must be at least 1, got {args.stream_beats}")
    if not 0 < args.calibration_beats < 4500:
        raise InvalidInputError(
            f"--calibration-beats must lie between 1 and 4499 (ECG5000 TEST has 4500 beats), "
            f"got {args.calibration_beats}"
        )
    metrics = run_demo(DemoConfig(run_dir=args.run_dir, k=args.k, n_synthetic=args.synthetic, seed=args.seed,
                                  n_seeds=args.seeds, target_fpr=args.target_fpr,
                                  stream_beats=args.stream_beats, calibration_beats=args.calibration_beats))
    print(format_summary(metrics))
    print(f"\nMetrics: {args.run_dir / 'metrics.json'}  Bundle: {metrics['bundle']['dir']}")
    return 0


def run_audio_demo_command(args: argparse.Namespace) -> int:
    if args.data_dir is None:
        raise InvalidInputError(f"--dataset {args.dataset} needs --data-dir DIR, the folder holding the WAV files")
    try:
        from anomalyforge.audio_demo import format_audio_summary, run_audio_demo
    except ImportError as error:
        raise MissingDependencyError(
            f"the audio demo needs the training extras ({error}); install them with pip install 'anomalyforge[all]'"
        ) from error
    run_dir = Path("runs/audio-demo") if args.run_dir == Path("runs/demo") else args.run_dir
    if args.splits < 1:
        raise InvalidInputError(f"--splits must be at least 1, got {args.splits}")
    metrics = run_audio_demo(args.dataset, args.data_dir, run_dir, seed=args.seed, n_splits=args.splits)
    print(format_audio_summary(metrics))
    print(f"\nMetrics: {run_dir / 'metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalyforge",
        description="Few-shot anomaly detection for edge devices: synthetic anomalies, int8 export, serial streaming.",
    )
    parser.add_argument("--version", action="version", version=f"anomalyforge {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level written to stderr (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_command(subparsers)

    from anomalyforge.training.report import add_report_command

    add_report_command(subparsers)

    from anomalyforge.training.sweep import add_experiment_command

    add_experiment_command(subparsers)

    from anomalyforge.training.mitbih import add_mitbih_command

    add_mitbih_command(subparsers)

    from anomalyforge.export.cli import add_export_commands

    add_export_commands(subparsers)

    from anomalyforge.device.cli import add_device_commands

    device = subparsers.add_parser("device", help="run a bundle on the device: stream, calibrate or bench",
                                   description="Device-side commands (numpy, onnxruntime and pyserial only).")
    add_device_commands(device.add_subparsers(dest="device_command", required=True))

    from anomalyforge.firmware_bridge.cli import add_bridge_commands

    bridge = subparsers.add_parser(
        "bridge", help="firmware bridge: simulated firmware on a pty, C reference sources",
        description="Binary serial protocol tools (numpy, cobs and the standard library only).",
    )
    add_bridge_commands(bridge.add_subparsers(dest="bridge_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except AnomalyForgeError as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
