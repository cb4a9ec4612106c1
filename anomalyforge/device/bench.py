"""Benchmark a bundle detector on this host: load time, per-stage latency, throughput, RSS, real-time factor.

Each timed window goes through the steps ``anomalyforge device stream`` runs for one beat:

``parse``
    :class:`~anomalyforge.device.stream.LineParser` splits one text line in the wire format
    (the bytes a serial port delivers) into values.
``features``
    ``check_windows`` and the manifest preprocessing (:func:`anomalyforge.signal.apply_preprocessing`).
``inference``
    One model call on a batch of one window.
``decision``
    The score compared with the manifest threshold.
``end_to_end``
    The four steps above, timed as one span.

Every ONNX file of the detector and, when torch and onnx are installed, a torch eager fp32
module rebuilt from the fp32 ONNX file (the baseline) run in one process. They are
interleaved window by window, and the order rotates every window, so clock-frequency drift
and background load reach every format alike. Percentiles pool the timed windows of all
repeats, and each repeat's p50 is kept so the spread between repeats can be stated.

The peak RSS of this process includes torch once the baseline is loaded. The device figure
therefore comes from a child process that blocks torch and runs one ONNX file at a time.

This module imports numpy and the device runtime only. The torch baseline lives in
``anomalyforge.export.torch_baseline`` and is imported by name only when it is requested
or when torch and onnx are installed, so a device without torch runs the same benchmark.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from anomalyforge import __version__
from anomalyforge.bundle import Bundle, load_bundle
from anomalyforge.device.backends import import_onnxruntime
from anomalyforge.device.detector import PRECISIONS, DeviceDetector, as_bundle, resolve_detector_name
from anomalyforge.device.stream import LineParser, read_windows_file
from anomalyforge.errors import BundleError, InvalidInputError, MissingDependencyError
from anomalyforge.signal import apply_preprocessing, check_windows, resample_beat

logger = logging.getLogger(__name__)

SCHEMA = "anomalyforge.bench/1"
STAGES = ("parse", "features", "inference", "decision", "end_to_end")
BASELINE_FORMAT = "torch-fp32"
TORCH_BASELINE_MODULE = "anomalyforge.export.torch_baseline"
TORCH_MODES = ("auto", "on", "off")

DEFAULT_WINDOWS = 1000
DEFAULT_WARMUP = 100
DEFAULT_REPEATS = 2
# Windows of the RSS child process: enough for onnxruntime's arenas to reach their steady size.
RSS_PROBE_WINDOWS = 500
RSS_PROBE_TIMEOUT_S = 300

# ECG5000 beats were resampled to 140 samples and have no sample rate. The default assumes a
# beat every 140 samples at 360 Hz, the MIT-BIH Arrhythmia Database rate: 0.39 s per beat,
# about 154 beats per minute, so the real-time factor is a conservative one for heart beats.
DEFAULT_SAMPLE_RATE_HZ = 360.0
EMBEDDED_DATA_PACKAGE = "anomalyforge.data"
EMBEDDED_DATA_FILE = "ecg5000.npz"
# Distinct TEST beats timed by default, evenly spaced over the TEST split (sorted by class),
# so normal beats and every anomaly class are included.
EMBEDDED_BEATS = 1000
EMBEDDED_SHUFFLE_SEED = 0


@dataclass
class Runner:
    """One model file (or the torch baseline) ready to score a batch of preprocessed windows."""

    format_key: str
    runtime: str
    precision: str
    file: str | None
    size_bytes: int | None
    load_s: float
    infer: Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- input windows

def load_embedded_beats(window_length: int, count: int = EMBEDDED_BEATS) -> tuple[np.ndarray, str]:
    """Return ``count`` ECG5000 TEST beats from the package data, resampled to ``window_length``.

    TEST is held out from every model the toolkit trains, so these are real unseen windows.
    """
    with resources.as_file(resources.files(EMBEDDED_DATA_PACKAGE) / EMBEDDED_DATA_FILE) as path:
        with np.load(path, allow_pickle=False) as archive:
            test_x = np.asarray(archive["test_x"], dtype=np.float32)
    indices = np.linspace(0, len(test_x) - 1, min(count, len(test_x))).round().astype(int)
    # TEST is sorted by class, so a fixed shuffle makes any prefix (a short run) a mix of classes.
    beats = test_x[np.random.default_rng(EMBEDDED_SHUFFLE_SEED).permutation(indices)]
    description = (f"{len(beats)} evenly spaced ECG5000 TEST beats from the package data, "
                   f"shuffled with seed {EMBEDDED_SHUFFLE_SEED}")
    if beats.shape[1] != window_length:
        logger.warning(
            "the bundle's window length is %d but ECG5000 beats have %d samples, so the beats are "
            "resampled; pass --input with windows of the bundle's task for representative inputs",
            window_length, beats.shape[1],
        )
        beats = np.stack([resample_beat(beat, window_length) for beat in beats])
        description += f", resampled from {test_x.shape[1]} to {window_length} samples"
    return beats, description


def load_input_windows(window_length: int, input_path=None) -> tuple[np.ndarray, str]:
    """Return the windows to time, from ``input_path`` (.npy or text lines) or the embedded beats."""
    if input_path is None:
        return load_embedded_beats(window_length)
    windows = read_windows_file(input_path, window_length, mode="beat")
    if len(windows) == 0:
        raise InvalidInputError(f"{input_path} contains no valid window of {window_length} values; check its format")
    return windows, f"{len(windows)} windows from {input_path}"


def encode_line(window: np.ndarray) -> bytes:
    """Format one window as a wire-format text line, as the serial simulator sends it."""
    return (",".join(f"{float(value):.9g}" for value in window) + "\n").encode("ascii")


# ---------------------------------------------------------------------------- runners

def onnx_format_keys(bundle: Bundle, name: str) -> list[str]:
    """Return the detector's ONNX format keys that the device runtime can load, in name order."""
    keys = [key for key in sorted(bundle.model(name)["formats"]) if key.startswith("onnx-")]
    usable = [key for key in keys if key.split("-", 1)[1] in PRECISIONS]
    for key in sorted(set(keys) - set(usable)):
        logger.warning("format %s of %s is not benchmarked: the device runtime loads only %s",
                       key, name, [f"onnx-{precision}" for precision in PRECISIONS])
    if not usable:
        raise BundleError(f"model {name!r} in {bundle.source} has no onnx-fp32 or onnx-int8 file to benchmark")
    return usable


def load_onnx_runner(bundle: Bundle, name: str, format_key: str, threads: int) -> Runner:
    """Load one ONNX file through DeviceDetector, the way the device does, and time the load."""
    started = time.perf_counter()
    # Timing only: the threshold's precision does not matter here, so no mismatch warning.
    detector = DeviceDetector.from_bundle(bundle, name=name, precision=format_key.split("-", 1)[1],
                                          threads=threads, warn_on_threshold_mismatch=False)
    load_s = time.perf_counter() - started
    onnxruntime = sys.modules["onnxruntime"]
    entry = bundle.file_entry(name, format_key)
    return Runner(format_key, f"onnxruntime {onnxruntime.__version__}", entry.get("precision", ""),
                  entry["file"], int(entry["size_bytes"]), load_s, detector.run_model)


def torch_available() -> bool:
    """Return True when torch and onnx can be imported (without importing them)."""
    try:
        return all(importlib.util.find_spec(package) is not None for package in ("torch", "onnx"))
    except (ImportError, ValueError):
        # An import hook that blocks the package raises instead of returning None.
        return False


def load_torch_runner(bundle: Bundle, name: str, threads: int) -> tuple[Runner, dict]:
    """Build the torch eager baseline from the detector's fp32 ONNX file.

    Returns the runner and a record with the import time of torch and onnx and the thread
    count it replaced, so the caller can restore it.
    """
    started = time.perf_counter()
    # Imported by name, so no import statement under anomalyforge/device names torch or the
    # export package. This line runs only when the baseline is requested or available.
    baseline = importlib.import_module(TORCH_BASELINE_MODULE)
    baseline.import_onnx()
    import_s = time.perf_counter() - started
    torch = sys.modules["torch"]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    entry = bundle.file_entry(name, "onnx-fp32")
    started = time.perf_counter()
    module = baseline.load_torch_baseline(bundle.path_of(entry))
    load_s = time.perf_counter() - started

    def infer(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(features)).numpy().reshape(-1)

    runner = Runner(BASELINE_FORMAT, f"torch {torch.__version__} eager", "float32", entry["file"],
                    int(entry["size_bytes"]), load_s, infer)
    return runner, {"torch_and_onnx_import_s": import_s, "previous_threads": previous_threads}


# ---------------------------------------------------------------------------- timing

def time_window(runner: Runner, parser: LineParser, line: bytes, preprocessing: list[dict],
                window_length: int, threshold: float, row: np.ndarray) -> bool:
    """Run one line through parse, features, inference and decision, writing the stage times in ns."""
    clock = time.perf_counter_ns
    started = clock()
    values = parser.feed(line)[0]
    parsed = clock()
    features = apply_preprocessing(preprocessing, check_windows(values, window_length))
    featured = clock()
    scores = runner.infer(features)
    inferred = clock()
    is_anomaly = float(scores[0]) > threshold
    decided = clock()
    row[0] = parsed - started
    row[1] = featured - parsed
    row[2] = inferred - featured
    row[3] = decided - inferred
    row[4] = decided - started
    return is_anomaly


def run_interleaved(runners: list[Runner], lines: list[bytes], preprocessing: list[dict],
                    window_length: int, threshold: float, windows: int, warmup: int,
                    repeats: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Time every runner on the same lines, round-robin per window, order rotated each window.

    Returns the stage times in ns of shape (repeats, windows, len(STAGES)) per format, and
    the anomaly count per format over the timed windows.
    """
    parsers = {runner.format_key: LineParser(window_length) for runner in runners}
    times = {runner.format_key: np.zeros((repeats, windows, len(STAGES)), dtype=np.int64) for runner in runners}
    anomalies = {runner.format_key: 0 for runner in runners}
    scratch = np.zeros(len(STAGES), dtype=np.int64)
    count = len(runners)
    gc_was_enabled = gc.isenabled()
    try:
        for repeat in range(repeats):
            gc.collect()
            # A collection pause inside a timed window would be charged to whichever format ran then.
            gc.disable()
            for step in range(warmup):
                for runner in runners[step % count:] + runners[: step % count]:
                    time_window(runner, parsers[runner.format_key], lines[step % len(lines)],
                                preprocessing, window_length, threshold, scratch)
            for step in range(windows):
                line = lines[step % len(lines)]
                for runner in runners[step % count:] + runners[: step % count]:
                    key = runner.format_key
                    if time_window(runner, parsers[key], line, preprocessing, window_length,
                                   threshold, times[key][repeat, step]):
                        anomalies[key] += 1
            if gc_was_enabled:
                gc.enable()
            logger.info("repeat %d/%d done: %d windows per format", repeat + 1, repeats, windows)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, anomalies


def summarize(times_ns: np.ndarray) -> dict:
    """Return the latency percentiles in us of (repeats, windows) times, pooled, plus each repeat's."""
    times_us = times_ns.astype(np.float64) / 1000.0
    pooled = times_us.reshape(-1)
    p50, p90, p99 = np.percentile(pooled, [50, 90, 99])
    per_repeat = [
        {"p50_us": float(np.percentile(row, 50)), "p99_us": float(np.percentile(row, 99))}
        for row in times_us
    ]
    repeat_p50 = [item["p50_us"] for item in per_repeat]
    spread = None
    if len(repeat_p50) > 1 and p50 > 0:
        spread = 100.0 * (max(repeat_p50) - min(repeat_p50)) / float(p50)
    return {
        "p50_us": float(p50), "p90_us": float(p90), "p99_us": float(p99),
        "max_us": float(pooled.max()), "mean_us": float(pooled.mean()), "n": int(pooled.size),
        "repeats": per_repeat, "p50_spread_pct": spread,
    }


# ---------------------------------------------------------------------------- memory and host

def read_rss_mb() -> dict:
    """Return this process's current and peak resident set size in MB (10**6 bytes).

    Reads VmRSS and VmHWM from /proc/self/status on Linux. Elsewhere only the peak is
    known, from ``resource.getrusage`` (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = {}
        for line in status.read_text(encoding="ascii", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e6
        if "VmRSS" in fields and "VmHWM" in fields:
            return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"], "source": "/proc/self/status"}
    try:
        import resource
    except ImportError:
        return {"rss_mb": None, "peak_rss_mb": None, "source": "unavailable"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return {"rss_mb": None, "peak_rss_mb": peak * scale / 1e6, "source": "resource.getrusage"}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="ascii", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def host_record() -> dict:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for package in ("onnxruntime", "torch"):
        if package in sys.modules:
            versions[package] = sys.modules[package].__version__
    usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(), "machine": platform.machine(), "system": platform.platform(),
        "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus, "versions": versions,
    }


# Run in a child process by measure_device_rss: torch, TensorFlow and scikit-learn are made
# unimportable, so the figures are those of a device install.
RSS_PROBE_SCRIPT = """
import importlib.abc
import json
import sys

BLOCKED = {"torch", "tensorflow", "sklearn"}


class BlockHeavyPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in the device RSS probe")
        return None


sys.meta_path.insert(0, BlockHeavyPackages())
from anomalyforge.device.bench import probe_device_rss

arguments = json.loads(sys.argv[1])
print(json.dumps(probe_device_rss(**arguments)))
"""


def probe_device_rss(bundle_path: str, detector: str, format_key: str, windows_path: str,
                     threads: int, windows: int) -> dict:
    """Load one ONNX file, stream ``windows`` lines through the pipeline and return the RSS figures.

    Meant for the child process of :func:`measure_device_rss`. ``rss_before_load_mb`` is
    after importing numpy and the device runtime, ``rss_mb`` after the windows (steady
    state), ``peak_rss_mb`` the high-water mark.
    """
    before = read_rss_mb()
    bundle = load_bundle(bundle_path)
    runner = load_onnx_runner(bundle, detector, format_key, threads)
    loaded = read_rss_mb()
    window_length = int(bundle.task["window_length"])
    batch = np.load(windows_path, allow_pickle=False)
    lines = [encode_line(window) for window in batch]
    parser = LineParser(window_length)
    threshold = bundle.model(detector).get("threshold")
    threshold = float("inf") if threshold is None else float(threshold["value"])
    row = np.zeros(len(STAGES), dtype=np.int64)
    for step in range(windows):
        time_window(runner, parser, lines[step % len(lines)], bundle.manifest.get("preprocessing", []),
                    window_length, threshold, row)
    after = read_rss_mb()
    return {
        "format": format_key, "windows": windows,
        "rss_before_load_mb": before["rss_mb"], "rss_after_load_mb": loaded["rss_mb"],
        "rss_mb": after["rss_mb"], "peak_rss_mb": after["peak_rss_mb"], "source": after["source"],
        "torch_imported": "torch" in sys.modules,
    }


def measure_device_rss(bundle: Bundle, detector: str, format_key: str, windows_path: Path,
                       threads: int, windows: int = RSS_PROBE_WINDOWS) -> dict:
    """Run :func:`probe_device_rss` in a child Python with torch blocked and return its record.

    A failed child is logged and reported as ``{"format", "error"}`` instead of raising, so
    the latency figures of the run are still written.
    """
    arguments = {"bundle_path": str(bundle.root), "detector": detector, "format_key": format_key,
                 "windows_path": str(windows_path), "threads": threads, "windows": windows}
    environment = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, environment.get("PYTHONPATH")]))
    try:
        result = subprocess.run([sys.executable, "-c", RSS_PROBE_SCRIPT, json.dumps(arguments)],
                                capture_output=True, text=True, timeout=RSS_PROBE_TIMEOUT_S, env=environment)
    except subprocess.TimeoutExpired:
        logger.warning("the device RSS probe for %s timed out after %d s", format_key, RSS_PROBE_TIMEOUT_S)
        return {"format": format_key, "error": f"timed out after {RSS_PROBE_TIMEOUT_S} s"}
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        logger.warning("the device RSS probe for %s failed (exit code %d): %s", format_key,
                       result.returncode, message)
        return {"format": format_key, "error": f"exit code {result.returncode}: {message}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- benchmark

def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def resolve_rate(task: dict, sample_rate_hz: float | None, samples_per_window: int | None) -> dict:
    """Return the sample rate and samples per window behind the real-time factor, with their source."""
    task_rate = task.get("sample_rate_hz")
    if sample_rate_hz is not None:
        rate, rate_source = float(sample_rate_hz), "option"
    elif task_rate:
        rate, rate_source = float(task_rate), "bundle task.sample_rate_hz"
    else:
        rate = DEFAULT_SAMPLE_RATE_HZ
        rate_source = (f"assumed: the bundle task has no sample rate, so {DEFAULT_SAMPLE_RATE_HZ:g} Hz "
                       "(MIT-BIH Arrhythmia Database) is used")
    if not rate > 0:
        raise InvalidInputError(f"sample rate must be positive, got {rate}")
    if samples_per_window is not None:
        check_positive("samples_per_window", samples_per_window)
        samples, samples_source = samples_per_window, "option"
    else:
        samples = int(task.get("hop") or task["window_length"])
        samples_source = "bundle task.hop (new samples per window)"
    return {"sample_rate_hz": rate, "sample_rate_source": rate_source,
            "samples_per_window": samples, "samples_per_window_source": samples_source,
            "window_duration_s": samples / rate}


def check_parity(runners: list[Runner], features: np.ndarray) -> dict[str, float]:
    """Return each runner's largest absolute score difference from the first runner on ``features``."""
    reference = np.concatenate([runners[0].infer(row[np.newaxis, :]) for row in features])
    differences = {}
    for runner in runners[1:]:
        scores = np.concatenate([runner.infer(row[np.newaxis, :]) for row in features])
        differences[runner.format_key] = float(np.max(np.abs(scores.astype(np.float64) - reference)))
    return differences


def run_bench(bundle, detector: str | None = None, threads: int = 1, windows: int = DEFAULT_WINDOWS,
              warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS, input_path=None,
              sample_rate_hz: float | None = None, samples_per_window: int | None = None,
              torch_baseline: str = "auto", rss_probe: bool = True, work_dir=None) -> dict:
    """Benchmark every ONNX file of a bundle detector, and the torch eager baseline, in one run.

    Parameters
    ----------
    bundle : Bundle or str or Path
        A loaded bundle, or the path of a bundle directory or zip.
    detector : str, optional
        Detector name. Default is the manifest's ``default_detector``.
    threads : int, default=1
        Intra-op threads of onnxruntime and torch.
    windows : int, default=1000
        Timed windows per format and repeat. Fewer than 1000 make p99 rest on fewer than
        10 windows.
    warmup : int, default=100
        Untimed windows per format before each repeat.
    repeats : int, default=2
        Timed passes. Percentiles pool all of them, and the spread of their p50 is reported.
    input_path : str or Path, optional
        Windows to time: ``.npy`` of shape (n, window_length) or text lines with one window
        each. Default: 1000 evenly spaced ECG5000 TEST beats from the package data.
    sample_rate_hz : float, optional
        Sample rate for the real-time factor. Default the bundle's ``task.sample_rate_hz``,
        else 360 Hz (see ``DEFAULT_SAMPLE_RATE_HZ``).
    samples_per_window : int, optional
        New samples each window stands for. Default the bundle's ``task.hop``, else its
        window length.
    torch_baseline : {"auto", "on", "off"}, default="auto"
        "auto" adds the torch eager baseline when torch and onnx are installed, "on" requires it.
    rss_probe : bool, default=True
        If True, measure RSS in a child process without torch for each ONNX file.
    work_dir : str or Path, optional
        Where the RSS probe's temporary input file goes. Default: the system temporary directory.

    Returns
    -------
    dict
        The report (see ``docs/benchmarks.md`` for the keys). Times are in microseconds.

    Raises
    ------
    InvalidInputError
        If a count is not positive, ``torch_baseline`` is unknown or the input has no window.
    MissingDependencyError
        If ``torch_baseline`` is "on" and torch or onnx is missing, or onnxruntime is missing.
    BundleError
        If the bundle, detector or its files are invalid.
    """
    for name, value in (("threads", threads), ("windows", windows), ("repeats", repeats)):
        check_positive(name, value)
    if not isinstance(warmup, int) or warmup < 0:
        raise InvalidInputError(f"warmup must be a non-negative integer, got {warmup!r}")
    if torch_baseline not in TORCH_MODES:
        raise InvalidInputError(f"torch_baseline must be one of {list(TORCH_MODES)}, got {torch_baseline!r}")
    if torch_baseline == "on" and not torch_available():
        raise MissingDependencyError(
            "the torch baseline needs torch and onnx, and at least one is not installed; install "
            "them with pip install 'anomalyforge[export]' or pass --torch off"
        )
    if windows < 1000:
        logger.warning("%d timed windows per repeat: p99 rests on %d windows; use at least 1000",
                       windows, max(1, windows // 100))

    started = time.perf_counter()
    bundle = as_bundle(bundle)
    bundle_load_s = time.perf_counter() - started
    name = resolve_detector_name(bundle, detector)
    model = bundle.model(name)
    if model.get("role") != "detector":
        raise BundleError(f"model {name!r} in {bundle.source} is a {model.get('role')}, not a detector; "
                          f"detectors: {bundle.detectors()}")
    window_length = int(bundle.task["window_length"])
    preprocessing = list(bundle.manifest.get("preprocessing", []))
    threshold_record = model.get("threshold")
    threshold = float("inf") if threshold_record is None else float(threshold_record["value"])
    rate = resolve_rate(bundle.task, sample_rate_hz, samples_per_window)

    batch, input_description = load_input_windows(window_length, input_path)
    lines = [encode_line(window) for window in batch]
    check_lines(lines, window_length)

    # Imported before the loads are timed, so the first file's load time does not include it.
    started = time.perf_counter()
    import_onnxruntime()
    onnxruntime_import_s = time.perf_counter() - started
    runners = [load_onnx_runner(bundle, name, key, threads) for key in onnx_format_keys(bundle, name)]
    torch_record = {"used": False, "reason": "torch baseline turned off"}
    if torch_baseline == "on" or (torch_baseline == "auto" and torch_available()):
        baseline, torch_record = load_torch_runner(bundle, name, threads)
        torch_record["used"] = True
        runners.insert(0, baseline)
    elif torch_baseline == "auto":
        torch_record["reason"] = "torch or onnx is not installed"

    try:
        features = apply_preprocessing(preprocessing, check_windows(batch[:32], window_length))
        parity = check_parity(runners, features)
        times, anomalies = run_interleaved(runners, lines, preprocessing, window_length, threshold,
                                           windows, warmup, repeats)
    finally:
        if torch_record.get("used"):
            sys.modules["torch"].set_num_threads(torch_record["previous_threads"])
    process_rss = read_rss_mb()

    formats = {}
    for runner in runners:
        stages = {stage: summarize(times[runner.format_key][:, :, index]) for index, stage in enumerate(STAGES)}
        end_to_end = stages["end_to_end"]
        formats[runner.format_key] = {
            "runtime": runner.runtime, "precision": runner.precision, "file": runner.file,
            "size_bytes": runner.size_bytes, "load_s": runner.load_s,
            "max_abs_score_diff_vs_first": parity.get(runner.format_key, 0.0),
            "anomaly_fraction": anomalies[runner.format_key] / (windows * repeats),
            "stages": stages,
            "throughput_windows_per_s": 1e6 / end_to_end["mean_us"],
            "real_time_factor": {
                "p50": rate["window_duration_s"] / (end_to_end["p50_us"] * 1e-6),
                "p99": rate["window_duration_s"] / (end_to_end["p99_us"] * 1e-6),
            },
        }
    add_ratios(formats)

    device_rss = {}
    if rss_probe:
        device_rss = probe_all_formats(bundle, name, [runner for runner in runners if runner.format_key != BASELINE_FORMAT],
                                       batch, threads, work_dir)

    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "anomalyforge_version": __version__,
        "host": host_record(),
        "bundle": {
            "source": str(bundle.source), "detector": name, "window_length": window_length,
            "preprocessing": preprocessing, "threshold": None if threshold_record is None else threshold,
            "load_and_verify_s": bundle_load_s, "onnxruntime_import_s": onnxruntime_import_s,
            "model_files_bytes": sum(int(entry["size_bytes"]) for entry in model["formats"].values()),
        },
        "settings": {
            "windows": windows, "warmup": warmup, "repeats": repeats, "threads": threads,
            "input": input_description, "distinct_windows": len(lines),
            "interleaving": "round-robin per window over the formats, order rotated every window",
            "garbage_collector": "disabled during each repeat, collected before it",
            **rate,
        },
        "baseline": BASELINE_FORMAT if torch_record.get("used") else None,
        "torch": {key: value for key, value in torch_record.items() if key != "previous_threads"},
        "formats": formats,
        "rss": {"this_process": {**process_rss, "torch_imported": "torch" in sys.modules},
                "device_only": device_rss},
    }


def check_lines(lines: list[bytes], window_length: int) -> None:
    """Raise InvalidInputError unless every encoded line parses back to one window."""
    parser = LineParser(window_length)
    for index, line in enumerate(lines):
        if len(parser.feed(line)) != 1:
            raise InvalidInputError(
                f"input window {index} does not survive the wire format (skipped as "
                f"{dict(parser.skipped)}); check the input for non-finite values"
            )


def add_ratios(formats: dict) -> None:
    """Add each ONNX format's speed-up over the torch baseline (baseline time / format time)."""
    baseline = formats.get(BASELINE_FORMAT)
    if baseline is None:
        return
    for key, record in formats.items():
        if key == BASELINE_FORMAT:
            continue
        record["speedup_vs_baseline"] = {
            f"{stage}_{quantile}": baseline["stages"][stage][f"{quantile}_us"] / record["stages"][stage][f"{quantile}_us"]
            for stage in ("inference", "end_to_end") for quantile in ("p50", "p99")
        }


def probe_all_formats(bundle: Bundle, name: str, runners: list[Runner], batch: np.ndarray, threads: int,
                      work_dir) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="anomalyforge-bench-", dir=work_dir) as directory:
        windows_path = Path(directory) / "windows.npy"
        np.save(windows_path, batch)
        return {runner.format_key: measure_device_rss(bundle, name, runner.format_key, windows_path, threads)
                for runner in runners}


# ---------------------------------------------------------------------------- report

def format_report(report: dict) -> str:
    """Return the report as a plain-text table with the settings, ratios and memory figures."""
    settings = report["settings"]
    host = report["host"]
    lines = [
        f"bundle {report['bundle']['source']}, detector {report['bundle']['detector']}, "
        f"window {report['bundle']['window_length']} samples",
        f"host: {host['cpu']} ({host['usable_cpus']} usable CPUs), {host['system']}, "
        + ", ".join(f"{package} {version}" for package, version in host["versions"].items()),
        f"input: {settings['input']}",
        f"{settings['windows']} timed windows x {settings['repeats']} repeats per format after "
        f"{settings['warmup']} warm-up windows, {settings['threads']} thread(s), {settings['interleaving']}",
        "",
        f"{'format':<11} {'stage':<11} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'max us':>9}  "
        f"{'p50 per repeat':<20} spread",
    ]
    for key, record in report["formats"].items():
        for stage in STAGES:
            summary = record["stages"][stage]
            repeats = " / ".join(f"{item['p50_us']:.1f}" for item in summary["repeats"])
            spread = "-" if summary["p50_spread_pct"] is None else f"{summary['p50_spread_pct']:.1f} %"
            lines.append(
                f"{key:<11} {stage:<11} {summary['p50_us']:>9.1f} {summary['p90_us']:>9.1f} "
                f"{summary['p99_us']:>9.1f} {summary['max_us']:>9.1f}  {repeats:<20} {spread}"
            )
    lines.append("")
    lines.append(
        f"real-time factor: window duration {settings['window_duration_s'] * 1e3:.1f} ms = "
        f"{settings['samples_per_window']} samples at {settings['sample_rate_hz']:g} Hz "
        f"({settings['sample_rate_source']}) divided by the end-to-end latency"
    )
    lines.append(f"{'format':<11} {'load ms':>8} {'size KiB':>9} {'windows/s':>10} {'RTF p50':>9} "
                 f"{'RTF p99':>9} {'vs torch p50':>13} {'vs torch p99':>13}")
    for key, record in report["formats"].items():
        ratios = record.get("speedup_vs_baseline")
        versus_p50 = "baseline" if key == BASELINE_FORMAT else "-"
        versus_p99 = versus_p50
        if ratios:
            versus_p50 = f"{ratios['end_to_end_p50']:.2f}x"
            versus_p99 = f"{ratios['end_to_end_p99']:.2f}x"
        lines.append(
            f"{key:<11} {record['load_s'] * 1e3:>8.1f} {record['size_bytes'] / 1024:>9.1f} "
            f"{record['throughput_windows_per_s']:>10.0f} {record['real_time_factor']['p50']:>9.0f} "
            f"{record['real_time_factor']['p99']:>9.0f} {versus_p50:>13} {versus_p99:>13}"
        )
    if report["baseline"] is None:
        lines.append(f"no torch baseline: {report['torch'].get('reason')}")
    lines.append("")
    this_process = report["rss"]["this_process"]
    lines.append(
        f"RSS of this process: peak {format_mb(this_process['peak_rss_mb'])}, now "
        f"{format_mb(this_process['rss_mb'])} (torch imported: {this_process['torch_imported']})"
    )
    for key, record in report["rss"]["device_only"].items():
        if "error" in record:
            lines.append(f"device-only RSS, {key}: not measured ({record['error']})")
            continue
        lines.append(
            f"device-only RSS, {key} (child process, torch blocked, {record['windows']} windows): "
            f"steady {format_mb(record['rss_mb'])}, peak {format_mb(record['peak_rss_mb'])}, "
            f"before loading the model {format_mb(record['rss_before_load_mb'])}"
        )
    return "\n".join(lines)


def format_mb(value) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"
