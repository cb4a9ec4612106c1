"""Time the device audio path on one core and print how many times faster than real time it runs.

Two paths are timed on the same 16 kHz audio (the excerpts in tests/data/audio, tiled to
--seconds): WAV-replay style float blocks, and 16-bit PCM text lines as a serial port
delivers them (parsing included). Both compute the log-mel features and score every
stacked vector with the bundle's detector through onnxruntime with one thread. The
process is pinned to one CPU where the OS allows it.

Usage::

    python benchmarks/audio_stream_bench.py [--bundle DIR] [--seconds 60] [--precision fp32]

Without --bundle an untrained DCASE autoencoder is exported into a temporary bundle
(needs torch and onnx); the timing does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

AUDIO_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio" / "mimii" / "fan" / "id_00"
BLOCK = 1024
TEXT_BLOCK_BYTES = 4096


def build_bundle(bundle_dir: Path, samples: np.ndarray) -> None:
    import torch

    from anomalyforge.audio_demo import export_audio_bundle
    from anomalyforge.signal import log_mel_features, log_mel_frames, log_mel_spec
    from anomalyforge.training.audio_models import AudioCVAEConfig, DenseAutoencoder, fit_audio_cvae

    torch.set_num_threads(1)
    step = log_mel_spec()[0]
    vectors = log_mel_features(samples, step)
    result = {
        "step": step, "train_normal_vectors": vectors, "train_vectors_per_clip": [len(vectors)],
        "models": {"dense_autoencoder": DenseAutoencoder(vectors).eval()},
        "reference_level_db": float(log_mel_frames(samples).mean()),
        "cvae": fit_audio_cvae(vectors, vectors[:10], 0, AudioCVAEConfig(epochs=1)),
    }
    export_audio_bundle(bundle_dir, result, len(samples) / 16000.0, target_fpr=0.5)


def time_path(push, blocks) -> float:
    started = time.perf_counter()
    for block in blocks:
        push(block)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="audio bundle directory (default: a temporary untrained one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of audio streamed (default: 60)")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--detector", default="dense_autoencoder")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from anomalyforge.device.audio import PcmLineParser, SegmentScorer, read_audio
    from anomalyforge.device.detector import DeviceDetector

    excerpt = np.concatenate([read_audio(path) for path in sorted(AUDIO_DIR.glob("*/*.wav"))])
    rate = 16000
    samples = np.resize(excerpt, int(args.seconds * rate))
    with tempfile.TemporaryDirectory() as temporary:
        bundle_dir = args.bundle
        if bundle_dir is None:
            bundle_dir = Path(temporary) / "bundle"
            build_bundle(bundle_dir, excerpt)
        detector = DeviceDetector.from_bundle(bundle_dir, args.detector, args.precision, threads=1)

        float_scorer = SegmentScorer(detector, 31)
        float_blocks = [samples[start:start + BLOCK] for start in range(0, len(samples), BLOCK)]
        float_seconds = time_path(float_scorer.push, float_blocks)

        pcm = np.round(samples * 32768).astype(np.int16)
        text = "".join(f"{value}\n" for value in pcm).encode("ascii")
        text_parser, text_scorer = PcmLineParser(), SegmentScorer(detector, 31)
        text_blocks = [text[start:start + TEXT_BLOCK_BYTES] for start in range(0, len(text), TEXT_BLOCK_BYTES)]
        text_seconds = time_path(lambda block: text_scorer.push(text_parser.feed(block)), text_blocks)

    audio_seconds = len(samples) / rate
    print(f"audio: {audio_seconds:.1f} s at {rate} Hz, {float_scorer.vectors} vectors, detector "
          f"{args.detector} ({args.precision}), 1 onnxruntime thread, CPU affinity "
          f"{sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 'not set'}")
    print(f"float blocks (WAV replay): {float_seconds:.3f} s, {audio_seconds / float_seconds:.1f}x real time")
    print(f"PCM text lines (serial):   {text_seconds:.3f} s, {audio_seconds / text_seconds:.1f}x real time")


if __name__ == "__main__":
    main()
