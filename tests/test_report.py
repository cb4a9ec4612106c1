"""The quality report end to end on real ECG5000 inputs.

A CVAE trained for 8 epochs and a generator that returns copies of the k training anomalies
are compared with the real TEST anomalies, and a PCA detector supplies the scores. The
report must flag the copies, must not flag the CVAE as a copier, and must be reproducible
given its seed.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest

from anomalyforge.errors import InvalidInputError
from anomalyforge.thresholds import calibrate_threshold
from anomalyforge.training.report import (
    INPUTS_FILE, ReportInputs, ReportSettings, add_report_command, build_report, load_report_inputs,
    report_from_arrays, save_report_inputs,
)

SEED = 0
N_SYNTHETIC = 200
FAST = ReportSettings(seed=SEED, n_permutations=50, max_per_set=300, embedding_per_group=60)


@pytest.fixture(scope="module")
def arrays():
    """Report inputs built by the project's own pipeline on the embedded ECG5000."""
    import torch

    from anomalyforge.training.datasets import load_ecg5000
    from anomalyforge.training.detectors import fit_pca
    from anomalyforge.training.experiment import prepare
    from anomalyforge.training.fitting import score_windows
    from anomalyforge.training.generators import CVAEConfig, CVAEGenerator
    from anomalyforge.training.splits import few_shot_split

    train, test = load_ecg5000()
    split = prepare(few_shot_split(train, test, k=10, seed=SEED))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = CVAEGenerator(CVAEConfig(epochs=8, channels=16, latent_dim=8)).fit(
            split.normal_train, split.anomalies, split.anomaly_classes, SEED)
        synthetic, synthetic_classes = generator.sample(N_SYNTHETIC, seed=SEED)
        pca = fit_pca(split.normal_train, n_components=4)
        copies = np.repeat(split.anomalies, N_SYNTHETIC // len(split.anomalies), axis=0)
        copy_classes = np.repeat(split.anomaly_classes, N_SYNTHETIC // len(split.anomalies))
        scores = {
            "test": score_windows(pca, split.test.x),
            "cvae": score_windows(pca, synthetic),
            "copies": score_windows(pca, copies),
            "threshold": calibrate_threshold(score_windows(pca, split.normal_val), 0.05).value,
        }
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "normals": split.normal_all, "anomalies": split.anomalies, "anomaly_classes": split.anomaly_classes,
        "synthetic": {"cvae": (synthetic, synthetic_classes), "copies": (copies, copy_classes)},
        "test_x": split.test.x, "test_y": split.test.y, "normal_class": split.normal_class,
        "detector_test_scores": {"pca": scores["test"]},
        "detector_thresholds": {"pca": scores["threshold"]},
        "detector_synthetic_scores": {"cvae": {"pca": scores["cvae"]}, "copies": {"pca": scores["copies"]}},
    }


@pytest.fixture(scope="module")
def report(arrays, tmp_path_factory):
    """A full report with figures, written from arrays in memory."""
    output = tmp_path_factory.mktemp("report")
    metrics = report_from_arrays(output, ReportInputs(**arrays), FAST)
    return output, metrics


def test_inputs_round_trip_without_pickle(arrays, tmp_path):
    path = save_report_inputs(tmp_path, **arrays)
    assert path == tmp_path / INPUTS_FILE
    with np.load(path, allow_pickle=False) as archive:
        assert list(archive["generator_names"]) == ["cvae", "copies"]
        assert list(archive["detector_names"]) == ["pca"]
    loaded = load_report_inputs(path)
    np.testing.assert_array_equal(loaded.normals, arrays["normals"])
    np.testing.assert_array_equal(loaded.synthetic["copies"][1], arrays["synthetic"]["copies"][1])
    np.testing.assert_array_equal(loaded.detector_synthetic_scores["cvae"]["pca"],
                                  arrays["detector_synthetic_scores"]["cvae"]["pca"])
    assert loaded.detector_thresholds == pytest.approx(arrays["detector_thresholds"])
    assert loaded.reference_source == "anomalies of the held-out test split"


def test_report_writes_self_contained_files(report):
    output, metrics = report
    assert json.loads((output / "metrics.json").read_text()) == metrics
    page = (output / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(metrics["figures"])
    assert not re.search(r'src="(?!data:)', page)
    assert "http://" not in page
    assert "https://" not in page
    assert len(metrics["figures"]) == 8
    for figure in metrics["figures"]:
        png = (output / "figures" / figure["file"]).read_bytes()
        assert png.startswith(b"\x89PNG")
    markdown = (output / "report.md").read_text()
    assert "| cvae | class 2 |" in markdown
    assert "TSTR (copies)" in markdown


def test_report_flags_copies_not_cvae(report):
    _, metrics = report
    copies, cvae = metrics["generators"]["copies"], metrics["generators"]["cvae"]
    assert copies["overall"]["memorisation"]["memorisation"]
    assert copies["overall"]["memorisation"]["near_copy_share"] == 1.0
    assert any(flag.startswith("memorisation in class") for flag in copies["flags"])
    assert not cvae["overall"]["memorisation"]["memorisation"]
    assert not any(flag.startswith("memorisation") for flag in cvae["flags"])
    # Twenty copies of each of ten beats: every copy has an identical twin.
    for entry in copies["per_class"].values():
        assert entry["diversity"]["near_duplicate_share"] == 1.0


def test_report_metrics_per_class_and_ranges(report, arrays):
    _, metrics = report
    cvae = metrics["generators"]["cvae"]
    assert set(cvae["per_class"]) == {str(label) for label in np.unique(arrays["synthetic"]["cvae"][1])}
    for group in [*cvae["per_class"].values(), cvae["overall"]]:
        fidelity, diversity = group["fidelity"], group["diversity"]
        assert 0.0 <= fidelity["discriminative_score"] <= 0.5
        assert 1 / 51 <= fidelity["mmd_p_value"] <= 1.0
        for metric in ("precision", "recall", "coverage"):
            assert 0.0 <= diversity[metric] <= 1.0
    assert metrics["inputs"]["reference_per_class"] == {"2": 1590, "3": 86, "4": 175, "5": 22}
    utility = metrics["utility"]
    assert utility["trtr"]["roc_auc"] > 0.9
    assert set(utility["tstr"]) == {"cvae", "copies"}
    detector = metrics["detectors"]["pca"]
    assert detector["test_roc_auc"] > 0.9
    assert set(detector["synthetic_flagged"]) == {"cvae", "copies"}


def test_build_report_is_deterministic(arrays, tmp_path):
    save_report_inputs(tmp_path, **arrays)
    settings = ReportSettings(seed=SEED, n_permutations=50, max_per_set=300, figures=False)
    first = build_report(tmp_path, tmp_path / "first", settings)
    second = build_report(tmp_path, tmp_path / "second", settings)
    first.pop("seconds")
    second.pop("seconds")
    assert first == second
    assert (tmp_path / "first" / "report.html").is_file()


def test_cli_report_command(arrays, tmp_path, capsys):
    save_report_inputs(tmp_path, **arrays)
    parser = argparse.ArgumentParser(prog="anomalyforge")
    add_report_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(tmp_path), "--no-figures", "--permutations", "20"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "copies: discriminative" in out
    assert "flag: memorisation" in out
    assert (tmp_path / "report" / "metrics.json").is_file()
    with pytest.raises(InvalidInputError, match="--permutations must be at least 1"):
        args.handler(parser.parse_args(["report", str(tmp_path), "--permutations", "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--output", "--seed", "--permutations", "--max-per-set", "--nearest-k", "--no-figures"):
        assert option in help_text


def test_missing_inputs_file_names_the_fix(tmp_path):
    with pytest.raises(InvalidInputError, match="report_inputs.npz not found; run anomalyforge demo"):
        build_report(tmp_path)


def test_inputs_are_validated(arrays):
    bad_length = dict(arrays, synthetic={"cvae": (arrays["synthetic"]["cvae"][0][:, :100],
                                                  arrays["synthetic"]["cvae"][1])})
    with pytest.raises(InvalidInputError, match="100 samples per window"):
        ReportInputs(**bad_length)
    bad_scores = dict(arrays, detector_test_scores={"pca": arrays["detector_test_scores"]["pca"][:10]})
    with pytest.raises(InvalidInputError, match=r"shape \(4500,\)"):
        ReportInputs(**bad_scores)
    unknown = dict(arrays, detector_synthetic_scores={"gan": {"pca": np.zeros(3)}})
    with pytest.raises(InvalidInputError, match="generator 'gan'"):
        ReportInputs(**unknown)
    with pytest.raises(InvalidInputError, match="synthetic is empty"):
        ReportInputs(**dict(arrays, synthetic={}))


def test_command_registers_without_training_packages():
    # The CLI builds every subcommand's parser, also on a device install without these packages.
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('sklearn', 'torch', 'matplotlib'):\n"
            "    sys.modules[name] = None\n"
            "import argparse\n"
            "from anomalyforge.training.report import add_report_command\n"
            "add_report_command(argparse.ArgumentParser().add_subparsers())\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("content", [b"", b"garbage" * 700, b"PK\x03\x04 truncated zip"])
def test_load_report_inputs_damaged_file(tmp_path, content):
    path = tmp_path / "report_inputs.npz"
    path.write_bytes(content)

    with pytest.raises(InvalidInputError, match="not a valid report inputs file") as raised:
        load_report_inputs(path)
    assert "allow_pickle" not in str(raised.value)
