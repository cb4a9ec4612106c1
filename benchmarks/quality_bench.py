"""Time the synthetic-data quality metrics for 1000 synthetic against 4500 real beats.

The real set is the whole ECG5000 TEST split (4500 beats, z-normalised). The synthetic set
is 1000 windows: by default TRAIN beats with Gaussian jitter (sigma 0.1), or the first
generator of a ``report_inputs.npz`` given with ``--inputs``. Every metric runs at its
report defaults (5-fold discriminator on at most 1000 windows per set, MMD² with 200
permutations on at most 1000 per set, PRDC with k = 5 on all windows, DCR against the
first 10 TRAIN anomalies with the 4500 real beats as held-out set, TSTR / TRTR on the TEST
split). The script prints one line per metric and the total; it asserts nothing.

Usage::

    python benchmarks/quality_bench.py [--threads 1] [--inputs runs/demo/report_inputs.npz]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from anomalyforge.signal import znormalize
from anomalyforge.training import quality
from anomalyforge.training.datasets import ECG5000_NORMAL_CLASS, load_ecg5000

N_SYNTHETIC = 1000


def load_sets(inputs_path: str | None, seed: int):
    train, test = load_ecg5000()
    real = znormalize(test.x).astype(np.float64)
    train_x = znormalize(train.x).astype(np.float64)
    training_anomalies = train_x[train.y != ECG5000_NORMAL_CLASS][:10]
    normals = train_x[train.y == ECG5000_NORMAL_CLASS]
    if inputs_path:
        from anomalyforge.training.report import load_report_inputs

        synthetic = next(iter(load_report_inputs(inputs_path).synthetic.values()))[0].astype(np.float64)
        synthetic = synthetic[:N_SYNTHETIC]
    else:
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(train_x), size=N_SYNTHETIC, replace=True)
        synthetic = train_x[rows] + rng.normal(0.0, 0.1, size=(N_SYNTHETIC, train_x.shape[1]))
    return real, test.y, synthetic, training_anomalies, normals


def main() -> int:
    parser = argparse.ArgumentParser(description="Time the quality metrics on 1000 synthetic vs 4500 real beats.")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP threads (default: 1)")
    parser.add_argument("--inputs", default=None, help="report_inputs.npz whose first generator supplies the "
                                                       "synthetic windows (default: jittered TRAIN beats)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    args = parser.parse_args()

    real, real_labels, synthetic, training_anomalies, normals = load_sets(args.inputs, args.seed)
    steps = {
        "discriminative score": lambda: quality.discriminative_score(real, synthetic, seed=args.seed),
        "MMD² + 200 permutations": lambda: quality.mmd_test(real, synthetic, seed=args.seed, n_permutations=200),
        "curve distances": lambda: quality.curve_distances(real, synthetic),
        "PRDC + near-duplicates": lambda: quality.diversity_summary(real, synthetic),
        "DCR memorisation": lambda: quality.memorisation_summary(training_anomalies, synthetic, real),
        "TSTR / TRTR": lambda: quality.train_synthetic_test_real(
            normals, training_anomalies, synthetic, real, real_labels, ECG5000_NORMAL_CLASS, seed=args.seed),
    }
    print(f"quality metrics: {len(synthetic)} synthetic vs {len(real)} real windows of {real.shape[1]} samples, "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    total = 0.0
    with threadpool_limits(limits=args.threads):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds = time.perf_counter() - started
            total += seconds
            print(f"  {name:<26}{seconds:7.2f} s")
    print(f"  {'total':<26}{total:7.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
