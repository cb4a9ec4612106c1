"""Measure FrameDecoder throughput in MB/s on a stream of ECG5000 samples frames.

Usage: python benchmarks/bridge_decoder_bench.py [--seconds S] [--chunk BYTES] [--format float32|int16]

The stream is the embedded ECG5000 test split in 35-sample frames with heartbeats, as the
simulator sends it. One decoder on one core takes it in chunks of --chunk bytes, the way
serial reads deliver it. The figure counts wire bytes, delimiters included.
"""

from __future__ import annotations

import argparse
import time

from anomalyforge.firmware_bridge.cli import load_ecg5000_beats
from anomalyforge.firmware_bridge.firmware import build_transmission
from anomalyforge.firmware_bridge.protocol import FrameDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum measuring time (default: 3)")
    parser.add_argument("--chunk", type=int, default=4096, help="bytes per feed() call (default: 4096)")
    parser.add_argument("--format", choices=("float32", "int16"), default="float32",
                        help="sample format of the frames (default: float32)")
    parser.add_argument("--samples-per-frame", type=int, default=35, help="samples per frame (default: 35)")
    args = parser.parse_args()

    signal = load_ecg5000_beats("test").reshape(-1)
    items = build_transmission(signal, 140.0, args.samples_per_frame, args.format)
    stream = b"".join(item.data for item in items)
    chunks = [stream[start:start + args.chunk] for start in range(0, len(stream), args.chunk)]

    passes = 0
    frames = 0
    started = time.perf_counter()
    while True:
        decoder = FrameDecoder()
        for chunk in chunks:
            frames += len(decoder.feed(chunk))
        passes += 1
        elapsed = time.perf_counter() - started
        if elapsed >= args.seconds:
            break
    megabytes = passes * len(stream) / 1e6
    print(f"stream: {len(stream)} bytes, {len(items)} frames ({args.format}, {args.samples_per_frame} samples "
          f"per frame), chunks of {args.chunk} bytes")
    print(f"decoded {frames} frames in {elapsed:.2f} s: {megabytes / elapsed:.1f} MB/s, "
          f"{frames / elapsed:,.0f} frames/s")


if __name__ == "__main__":
    main()
