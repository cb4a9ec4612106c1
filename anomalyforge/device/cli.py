"""``anomalyforge device stream``, ``device calibrate`` and ``device bench`` subcommands.

The top-level CLI calls :func:`add_device_commands` on its ``device`` sub-parser and runs
``args.handler(args)``. Each handler returns the process exit code and lets
AnomalyForgeError propagate for the top level to print.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from anomalyforge.argtypes import positive_float, positive_int
from anomalyforge.device.bench import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    DEFAULT_WINDOWS,
    TORCH_MODES,
    format_report,
    run_bench,
)
from anomalyforge.device.audio import AGGREGATIONS, is_audio_bundle
from anomalyforge.device.calibrate import calibrate_bundle
from anomalyforge.device.detector import BACKENDS, PRECISIONS, DeviceDetector
from anomalyforge.device.stream import (
    DEFAULT_BAUDRATE,
    FRAMINGS,
    MODES,
    collect_windows,
    read_windows_file,
    resolve_windowing,
    stream_port,
)
from anomalyforge.device.raw_ecg import RAW_ECG_MODE
from anomalyforge.errors import InvalidInputError

logger = logging.getLogger(__name__)


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by both commands: bundle, detector, precision, port and framing."""
    parser.add_argument("--bundle", required=True, metavar="DIR",
                        help="bundle directory (or .zip for 'stream') written by 'anomalyforge demo'")
    parser.add_argument("--detector", metavar="NAME",
                        help="detector in the bundle (default: the manifest's default_detector)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="which model file to run (default: the precision the detector's threshold "
                             "was set with: fp32 for a workstation threshold)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="runtime: 'onnxruntime' runs the onnx-* files, 'litert' the tflite-* files "
                             "(default: the first of these that is installed and has a file for the "
                             "detector)")
    parser.add_argument("--mode", choices=MODES + (RAW_ECG_MODE,), default="beat",
                        help="'beat': one window of window-length values per line; 'samples': one "
                             "sample per line, cut into windows; 'raw-ecg' (stream only): one raw ECG "
                             "sample per line, beats cut around detected R peaks (default: %(default)s)")
    parser.add_argument("--window-length", type=positive_int, metavar="N",
                        help="samples per received window (default: the bundle's task.window_length); "
                             "another length is linearly resampled to the model's")
    parser.add_argument("--hop", type=positive_int, metavar="N",
                        help="samples between window starts in samples mode (default: the bundle's "
                             "task.hop, else the window length)")
    parser.add_argument("--baudrate", type=positive_int, default=DEFAULT_BAUDRATE,
                        help="serial line speed in bits per second (default: %(default)s; ignored by "
                             "pseudo-terminals and socket:// URLs)")
    parser.add_argument("--idle-timeout", type=positive_float, metavar="S",
                        help="stop after S seconds without received data (default: wait forever)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="intra-op threads of the runtime (default: %(default)s)")


def add_device_commands(subparsers) -> None:
    """Register the ``stream``, ``calibrate`` and ``bench`` subcommands on ``subparsers``."""
    stream = subparsers.add_parser(
        "stream",
        help="score windows read from a serial port",
        description="Read text lines or binary frames from a serial port, score each window with "
                    "the bundle's detector and write one JSON line per window (index, score, "
                    "is_anomaly, threshold, latency_us; with binary frames also sample_index and "
                    "samples_lost). Malformed lines and frames are counted and skipped. Stops on "
                    "Ctrl-C, when the device disconnects, after --max-windows or --idle-timeout, "
                    "and prints a summary to stderr.",
    )
    add_input_options(stream)
    stream.add_argument("--port", required=True,
                        help="serial device (/dev/ttyUSB0, /dev/ttyACM0, COM3) or pyserial URL "
                             "(socket://HOST:PORT, loop://)")
    stream.add_argument("--framing", choices=FRAMINGS, default="auto",
                        help="'text': lines of numbers; 'binary': COBS frames of the firmware protocol "
                             "(docs/protocol.md), whose hello sets the sample rate and whose lost "
                             "samples are counted; 'auto': decide from the first bytes (default: "
                             "%(default)s)")
    stream.add_argument("--max-windows", type=positive_int, metavar="N",
                        help="stop after N windows (default: no limit)")
    stream.add_argument("--output", metavar="FILE",
                        help="write the JSON lines to FILE instead of standard output")
    stream.add_argument("--sample-rate", type=positive_float, metavar="HZ",
                        help="raw-ecg mode: sample rate of the ECG in Hz, for example 360 for MIT-BIH "
                             "(default: the bundle's task.raw_ecg record)")
    stream.set_defaults(handler=run_stream)

    calibrate = subparsers.add_parser(
        "calibrate",
        help="set a detector's threshold from normal windows recorded on this device",
        description="Score normal windows from a serial port or a file, generate anomalies with "
                    "the bundle's decoder, set the threshold for --target-fpr and write it into "
                    "the bundle (the previous one is kept in its threshold_history). Prints a JSON "
                    "report with the detection rate on the generated anomalies.",
    )
    add_input_options(calibrate)
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--port", help="serial device or pyserial URL to record normal windows from")
    source.add_argument("--input", metavar="FILE",
                        help="normal windows: .npy of shape (n, window_length), or text lines in the "
                             "stream format")
    calibrate.add_argument("--windows", type=positive_int, metavar="N",
                           help="normal windows to record from --port (required with --port; at "
                                "least ceil(1 / target-fpr - 1), 99 for 0.01)")
    calibrate.add_argument("--target-fpr", type=float, default=0.01,
                           help="false-positive rate the threshold must not exceed in expectation, "
                                "in (0, 1) (default: %(default)s)")
    calibrate.add_argument("--generated", type=int, default=1000, metavar="N",
                           help="anomalies to generate with the decoder for the detection-rate check; "
                                "0 skips it (default: %(default)s)")
    calibrate.add_argument("--seed", type=int, default=0,
                           help="seed of the generated latent vectors (default: %(default)s)")
    calibrate.set_defaults(handler=run_calibrate)

    add_bench_command(subparsers)
    add_replay_command(subparsers)
    add_segment_options(stream)
    add_audio_calibrate_options(calibrate)


def run_stream(args: argparse.Namespace) -> int:
    """Run ``device stream`` and return the exit code (0 after any normal stop)."""
    detector = DeviceDetector.from_bundle(args.bundle, name=args.detector, precision=args.precision,
                                          threads=args.threads, backend=args.backend)
    if is_audio_bundle(detector.bundle):
        return run_audio_stream(args, detector)
    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    # A service manager stops the stream with SIGTERM: treat it like Ctrl-C so the summary
    # is printed and the output file is closed.
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        stream_port(
            detector, args.port, mode=args.mode, window_length=args.window_length, hop=args.hop,
            baudrate=args.baudrate, max_windows=args.max_windows, idle_timeout_s=args.idle_timeout,
            on_window=output, framing=args.framing, sample_rate_hz=args.sample_rate,
        )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if output is not sys.stdout:
            output.close()
    return 0


def raise_keyboard_interrupt(signal_number, frame) -> None:
    raise KeyboardInterrupt


def run_calibrate(args: argparse.Namespace) -> int:
    """Run ``device calibrate``, print the JSON report and return the exit code."""
    if Path(args.bundle).is_file():
        raise InvalidInputError(
            f"{args.bundle} is a file, but calibrate writes the new threshold into the bundle, so it "
            "needs a bundle directory; unzip the bundle and pass the directory"
        )
    detector = DeviceDetector.from_bundle(args.bundle, name=args.detector, precision=args.precision,
                                          threads=args.threads, warn_on_threshold_mismatch=False,
                                          backend=args.backend)
    if is_audio_bundle(detector.bundle):
        return run_audio_calibrate(args, detector)
    if args.mode == RAW_ECG_MODE:
        raise InvalidInputError(
            "device calibrate does not read raw ECG; cut normal beats first (anomalyforge.signal.extract_beats) "
            "and pass them with --mode beat"
        )
    length, hop = resolve_windowing(detector.bundle.task, args.mode, args.window_length, args.hop)
    if args.port is not None:
        if args.windows is None:
            raise InvalidInputError("--port needs --windows N, the number of normal windows to record")
        windows, summary = collect_windows(
            args.port, args.windows, length, mode=args.mode, hop=hop, baudrate=args.baudrate,
            idle_timeout_s=args.idle_timeout,
        )
        print(summary.format(), file=sys.stderr)
        description = f"serial port {args.port} ({len(windows)} windows, {args.mode} mode)"
    else:
        windows = read_windows_file(args.input, length, mode=args.mode, hop=hop)
        description = f"file {args.input}"
    report = calibrate_bundle(
        args.bundle, windows, detector=detector.name, precision=detector.precision,
        n_generated=args.generated, target_fpr=args.target_fpr, seed=args.seed,
        input_description=description, threads=args.threads, backend=detector.backend_name,
    )
    print(json.dumps(report, indent=2))
    return 0


def add_bench_command(subparsers) -> None:
    """Register the ``bench`` subcommand on ``subparsers``."""
    bench = subparsers.add_parser(
        "bench",
        help="time the device pipeline of a bundle detector on this host",
        description="Time model load, then each stage per window (text-line parsing, "
                    "preprocessing, inference, decision) and end to end, for every ONNX file of "
                    "the detector and, when torch and onnx are installed, a torch eager baseline, "
                    "interleaved window by window. Prints a table with p50 / p90 / p99 / max "
                    "latency, throughput, real-time factor, speed-up over torch and RSS measured "
                    "in a child process without torch.",
    )
    bench.add_argument("--bundle", required=True, metavar="DIR",
                       help="bundle directory or .zip written by 'anomalyforge demo'")
    bench.add_argument("--detector", metavar="NAME",
                       help="detector in the bundle (default: the manifest's default_detector)")
    bench.add_argument("--backend", choices=["onnxruntime"], default="onnxruntime",
                       help="device runtime to time (default: %(default)s, the only one)")
    bench.add_argument("--threads", type=positive_int, default=1,
                       help="intra-op threads of onnxruntime and torch (default: %(default)s)")
    bench.add_argument("--windows", type=positive_int, default=DEFAULT_WINDOWS, metavar="N",
                       help="timed windows per format and repeat (default: %(default)s)")
    bench.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, metavar="N",
                       help="untimed windows per format before each repeat (default: %(default)s)")
    bench.add_argument("--repeats", type=positive_int, default=DEFAULT_REPEATS, metavar="N",
                       help="timed passes; the spread of their p50 is reported (default: %(default)s)")
    bench.add_argument("--input", metavar="FILE",
                       help="windows to time: .npy of shape (n, window_length) or text lines with one "
                            "window each (default: 1000 ECG5000 TEST beats from the package data)")
    bench.add_argument("--sample-rate", type=positive_float, metavar="HZ",
                       help="sample rate for the real-time factor (default: the bundle's "
                            "task.sample_rate_hz, else 360 Hz as on MIT-BIH)")
    bench.add_argument("--samples-per-window", type=positive_int, metavar="N",
                       help="new samples each window stands for (default: the bundle's task.hop)")
    bench.add_argument("--torch", choices=TORCH_MODES, default="auto",
                       help="torch eager baseline: 'auto' adds it when torch and onnx are installed, "
                            "'on' requires it (default: %(default)s)")
    bench.add_argument("--no-rss-probe", action="store_true",
                       help="skip the RSS measurement in a child process without torch")
    bench.add_argument("--json", metavar="FILE", help="also write the full report as JSON to FILE")
    bench.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    """Run ``device bench``, print the table (and write the JSON report) and return the exit code."""
    if args.warmup < 0:
        raise InvalidInputError(f"--warmup must be 0 or more, got {args.warmup}")
    report = run_bench(
        args.bundle, detector=args.detector, threads=args.threads, windows=args.windows,
        warmup=args.warmup, repeats=args.repeats, input_path=args.input,
        sample_rate_hz=args.sample_rate, samples_per_window=args.samples_per_window,
        torch_baseline=args.torch, rss_probe=not args.no_rss_probe,
    )
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        logger.info("wrote the benchmark report to %s", args.json)
    return 0


# ---------------------------------------------------------------------------------------
# Audio bundles: WAV replay, serial PCM samples and calibration from WAV files.


def channel_option(text: str) -> int | str:
    if text == "mean":
        return text
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a channel index >= 0 or 'mean', got {text}")
    return value


def add_segment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segment-frames", type=positive_int, metavar="N",
                        help="audio bundles: feature vectors per scored segment (one vector per 512 "
                             "samples; default: the bundle's task.segment_frames)")
    parser.add_argument("--segment-hop", type=positive_int, metavar="N",
                        help="audio bundles: vectors between segment starts (default: --segment-frames, "
                             "no overlap)")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="mean",
                        help="audio bundles: segment score = mean or max of the vector scores "
                             "(default: %(default)s)")


def add_replay_command(subparsers) -> None:
    """Register ``device replay``: score a WAV file with an audio bundle."""
    replay = subparsers.add_parser(
        "replay",
        help="score a WAV file with an audio bundle, at real speed or faster",
        description="Read a WAV file, compute the bundle's log-mel features block by block as a "
                    "stream would, and write one JSON line per segment (index, start_s, vectors, "
                    "score, is_anomaly, threshold). Without --segment-frames the whole file is one "
                    "clip. Prints a summary with the real-time factor to stderr.",
    )
    replay.add_argument("--bundle", required=True, metavar="DIR", help="audio bundle directory or .zip")
    replay.add_argument("--detector", metavar="NAME",
                        help="detector in the bundle (default: the manifest's default_detector)")
    replay.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="model precision (default: the precision of the detector's threshold)")
    replay.add_argument("--wav", required=True, metavar="FILE", help="WAV file at the bundle's sample rate")
    replay.add_argument("--speed", type=positive_float, metavar="X",
                        help="playback speed relative to real time, 1 = real time (default: as fast as "
                             "possible)")
    replay.add_argument("--channel", type=channel_option, default=0,
                        help="channel of a multi-channel file, or 'mean' (default: %(default)s)")
    replay.add_argument("--gain-db", type=float, metavar="DB",
                        help="gain applied to the samples (default: the gain stored by the last device "
                             "calibration, else 0)")
    replay.add_argument("--threads", type=positive_int, default=1,
                        help="intra-op threads of the runtime (default: %(default)s)")
    add_segment_options(replay)
    replay.add_argument("--output", metavar="FILE", help="write the JSON lines to FILE instead of standard output")
    replay.set_defaults(handler=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    """Run ``device replay`` and return the exit code."""
    from anomalyforge.device.audio import replay_wav, write_json_line

    detector = DeviceDetector.from_bundle(args.bundle, name=args.detector, precision=args.precision,
                                          threads=args.threads)
    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        summary = replay_wav(detector, args.wav, speed=args.speed, channel=args.channel,
                             segment_frames=args.segment_frames, hop_frames=args.segment_hop,
                             aggregation=args.aggregation, gain_db=args.gain_db,
                             on_segment=write_json_line(output))
    finally:
        if output is not sys.stdout:
            output.close()
    print(summary.format(), file=sys.stderr)
    return 0


def run_audio_stream(args: argparse.Namespace, detector) -> int:
    """Run ``device stream`` for an audio bundle: one 16-bit PCM sample per text line."""
    from anomalyforge.device.audio import stream_audio_port, write_json_line

    if args.mode != "samples":
        raise InvalidInputError(
            f"an audio bundle reads one 16-bit PCM sample per line; pass --mode samples (got --mode {args.mode})"
        )
    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        summary = stream_audio_port(
            detector, args.port, baudrate=args.baudrate, segment_frames=getattr(args, "segment_frames", None),
            hop_frames=getattr(args, "segment_hop", None), aggregation=getattr(args, "aggregation", "mean"),
            max_segments=args.max_windows, idle_timeout_s=args.idle_timeout, on_segment=write_json_line(output),
        )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if output is not sys.stdout:
            output.close()
    print(summary.format(), file=sys.stderr)
    return 0


def add_audio_calibrate_options(calibrate: argparse.ArgumentParser) -> None:
    """Options of ``device calibrate`` that only audio bundles use."""
    add_segment_options(calibrate)
    calibrate.add_argument("--channel", type=channel_option, default=0,
                           help="audio bundles: channel of multi-channel WAV files, or 'mean' "
                                "(default: %(default)s)")
    calibrate.add_argument("--no-match-level", action="store_true",
                           help="audio bundles: do not correct the sensor gain from the level of the "
                                "normal recordings (by default the gain that brings their mean log-mel "
                                "level to the training level is stored and applied)")


def run_audio_calibrate(args: argparse.Namespace, detector) -> int:
    """Run ``device calibrate`` for an audio bundle from WAV files (--input) or a serial port."""
    from anomalyforge.device.audio import (
        audio_step,
        bundle_segment_frames,
        calibrate_audio_bundle,
        collect_audio_port,
        read_audio,
    )

    rate = audio_step(detector.bundle)["sample_rate_hz"]
    if args.port is not None:
        if args.windows is None:
            raise InvalidInputError("--port needs --windows N, the number of normal segments to record")
        segment = args.segment_frames or bundle_segment_frames(detector.bundle) or 1
        seconds = (args.windows * segment + 6) * 512 / rate
        recordings = [collect_audio_port(args.port, seconds, rate, baudrate=args.baudrate,
                                         idle_timeout_s=args.idle_timeout)]
        description = f"serial port {args.port} ({len(recordings[0]) / rate:.1f} s of audio)"
    else:
        source = Path(args.input)
        paths = sorted(source.glob("*.wav")) if source.is_dir() else [source]
        if not paths:
            raise InvalidInputError(f"no .wav files in {source}; pass a WAV file or a folder of WAV files")
        recordings = [read_audio(path, rate, args.channel) for path in paths]
        description = f"{len(paths)} WAV file(s) from {source}"
    report = calibrate_audio_bundle(
        args.bundle, recordings, detector=detector.name, precision=detector.precision,
        target_fpr=args.target_fpr, segment_frames=args.segment_frames, hop_frames=args.segment_hop,
        aggregation=args.aggregation, match_level=not args.no_match_level, n_generated=args.generated,
        seed=args.seed, input_description=description, threads=args.threads,
    )
    print(json.dumps(report, indent=2))
    return 0
