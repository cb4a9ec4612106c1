"""Time the raw-ECG device path and print its real-time factor.

The path is the one ``anomalyforge device stream --mode raw-ecg`` runs after the serial
read: text-line parsing, streaming QRS detection, beat extraction and scoring with the
bundle detector, on one thread. The input is one minute of MIT-BIH record 208 lead MLII
(tests/data), repeated, sent as text lines in blocks of 64 lines.

Usage: python benchmarks/raw_ecg_bench.py --bundle DIR [--minutes 10] [--precision int8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from anomalyforge.device.detector import DeviceDetector
from anomalyforge.device.raw_ecg import RawECGReader, RawECGScorer
from anomalyforge.signal import qrs_beat_spec

EXCERPT = Path(__file__).resolve().parent.parent / "tests" / "data" / "mitbih_first_minute.npz"
SAMPLE_RATE_HZ = 360.0
LINES_PER_BLOCK = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle directory")
    parser.add_argument("--minutes", type=int, default=10, help="minutes of ECG to time (default: 10)")
    parser.add_argument("--precision", choices=["int8", "fp32"], default=None,
                        help="detector file (default: the precision of the threshold)")
    args = parser.parse_args()

    adc = np.load(EXCERPT)["adc_208"].astype(np.float64)
    signal = np.tile((adc - 1024) / 200.0, args.minutes)
    lines = [f"{value:.3f}\n".encode("ascii") for value in signal]
    blocks = [b"".join(lines[start:start + LINES_PER_BLOCK]) for start in range(0, len(lines), LINES_PER_BLOCK)]

    detector = DeviceDetector.from_bundle(args.bundle, precision=args.precision, threads=1)
    reader = RawECGReader()
    scorer = RawECGScorer(detector, qrs_beat_spec(SAMPLE_RATE_HZ))
    beats = 0
    started = time.perf_counter()
    for block in blocks:
        for samples in reader.feed(block):
            beats += len(scorer.push(samples))
    beats += len(scorer.finish())
    elapsed = time.perf_counter() - started

    duration_s = len(signal) / SAMPLE_RATE_HZ
    print(f"{len(signal)} samples ({duration_s:.0f} s at {SAMPLE_RATE_HZ:.0f} Hz), {beats} beats, "
          f"detector {detector.name} ({detector.precision}), 1 thread")
    print(f"elapsed {elapsed:.3f} s, real-time factor {duration_s / elapsed:.0f}, "
          f"{1e6 * elapsed / max(beats, 1):.0f} us per beat")


if __name__ == "__main__":
    main()
