"""Tests of ``anomalyforge experiment``: a reduced sweep, its resumption and its reproducibility.

The reduced sweep (k = 5, 2 seeds, generators none and augment, ``--epochs-scale small``)
trains every model for 2-3 epochs, so its numbers only show that the pipeline runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyforge.errors import InvalidInputError
from anomalyforge.training.sweep import (
    PLOT_FILE, SUMMARY_FILE, TABLE_FILE, SweepConfig, add_experiment_command, count_cells, planned_cells,
    run_sweep,
)

EXPECTED_CELLS = {
    "autoencoder": 2, "nearest_neighbour": 2, "pca": 2, "generator-augment": 2, "classifier": 4, "combined": 4,
}


def reduced_config(run_dir: Path, **changes) -> SweepConfig:
    settings = dict(run_dir=run_dir, ks=(5,), generators=("none", "augment"), seeds=(0, 1), n_synthetic=200,
                    epochs_scale="small")
    settings.update(changes)
    return SweepConfig(**settings)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    previous = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("sweep")
    try:
        summary = run_sweep(reduced_config(run_dir))
    finally:
        torch.set_num_threads(previous)
    return run_dir, summary


def rows_by_key(summary: dict) -> dict:
    return {(row["k"], row["detector"], row["generator"]): row for row in summary["rows"]}


def test_sweep_writes_outputs(first_run):
    run_dir, summary = first_run

    assert (run_dir / SUMMARY_FILE).is_file()
    assert (run_dir / TABLE_FILE).is_file()
    assert (run_dir / PLOT_FILE).stat().st_size > 0
    assert summary["counts"]["computed"] == EXPECTED_CELLS
    assert summary["counts"]["loaded"] == {}
    assert planned_cells(reduced_config(run_dir)) == EXPECTED_CELLS
    assert count_cells(reduced_config(run_dir)) == sum(EXPECTED_CELLS.values())


def test_sweep_rows_cover_grid(first_run):
    _, summary = first_run
    rows = rows_by_key(summary)
    expected = {(5, "autoencoder", "-"), (5, "pca", "-"), (5, "nearest_neighbour", "-")}
    expected |= {(5, detector, generator) for detector in ("classifier", "combined") for generator in ("none", "augment")}

    assert set(rows) == expected
    for key, row in rows.items():
        assert row["metrics"]["roc_auc"]["n"] == 2, key
        for label in ("2", "3", "4", "5"):
            assert 0.0 <= row["metrics"][f"recall_at_1pct_class_{label}"]["mean"] <= 1.0, key


def test_sweep_paired_differences(first_run):
    _, summary = first_run
    rows = rows_by_key(summary)
    baseline = rows[(5, "classifier", "none")]
    augmented = rows[(5, "classifier", "augment")]
    difference = augmented["difference_vs_real_only"]["recall_at_1pct_class_3"]

    assert "difference_vs_real_only" not in baseline
    assert difference["n"] == 2
    assert difference["seeds_better"] + difference["seeds_worse"] <= 2
    expected = (augmented["metrics"]["recall_at_1pct_class_3"]["mean"]
                - baseline["metrics"]["recall_at_1pct_class_3"]["mean"])
    assert difference["mean"] == pytest.approx(expected)


def test_sweep_generator_quality_and_filter(first_run):
    run_dir, summary = first_run
    entry = summary["generators"][0]
    record = json.loads((run_dir / "k-5" / "seed-0" / "generator-augment.json").read_text())

    assert entry["generator"] == "augment"
    assert 0.0 <= entry["filter_dropped_share"]["mean"] <= 1.0
    assert record["filter"]["n_candidates"] == 400
    assert record["filter"]["n_kept"] == record["n_windows"]
    assert record["has_decoder"] is False
    assert "coverage" in record["quality"]["mean"]


def test_sweep_combined_standardised_on_normals(first_run):
    run_dir, _ = first_run
    with np.load(run_dir / "k-5" / "seed-0" / "combined-augment.npz") as archive:
        calibration = archive["calibration_scores"]

    # Each part is standardised on these very scores, so their sum has mean 0.
    assert abs(calibration.mean()) < 1e-9
    assert len(calibration) == 292


def test_sweep_resume_recomputes_nothing(first_run):
    run_dir, summary = first_run
    resumed = run_sweep(reduced_config(run_dir))

    assert resumed["counts"]["computed"] == {}
    assert resumed["counts"]["loaded"] == EXPECTED_CELLS
    assert resumed["rows"] == summary["rows"]


def without_timings(value):
    """Drop wall-clock fields, which differ between runs, from nested summary records."""
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if not key.endswith("_seconds")}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def test_sweep_reproducible_in_fresh_dir(first_run, tmp_path):
    _, summary = first_run
    repeated = run_sweep(reduced_config(tmp_path / "again"))

    assert repeated["counts"]["computed"] == EXPECTED_CELLS
    assert repeated["rows"] == summary["rows"]
    assert without_timings(repeated["generators"]) == without_timings(summary["generators"])


def test_sweep_rejects_changed_settings(first_run):
    run_dir, _ = first_run
    with pytest.raises(InvalidInputError, match="other settings"):
        run_sweep(reduced_config(run_dir, n_synthetic=300))


def test_sweep_rejects_unknown_generator(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown generators"):
        run_sweep(reduced_config(tmp_path, generators=("none", "diffusion")))


def test_experiment_command_resumes(first_run, capsys):
    run_dir, _ = first_run
    parser = argparse.ArgumentParser()
    add_experiment_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["experiment", "--run-dir", str(run_dir), "--k", "5", "--seeds", "2",
                              "--generators", "none", "augment", "--synthetic", "200", "--epochs-scale", "small"])

    assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "| 5 | classifier | augment |" in output
    assert "computed 0 cells" in output
