"""``anomalyforge device bench`` on the small real bundle, with and without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from anomalyforge.cli import main
from anomalyforge.device.bench import STAGES, format_report, run_bench
from anomalyforge.errors import InvalidInputError

ONNX_FORMATS = ("onnx-fp32", "onnx-int8")
PERCENTILE_KEYS = ("p50_us", "p90_us", "p99_us", "max_us")

TORCH_BLOCKED_SCRIPT = textwrap.dedent("""
    import importlib.abc
    import json
    import sys

    BLOCKED = {"torch", "tensorflow", "sklearn", "onnx"}

    class BlockHeavyPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the device side must not import it")
            return None

    sys.meta_path.insert(0, BlockHeavyPackages())

    import anomalyforge.device.cli
    from anomalyforge.device.bench import run_bench

    report = run_bench(sys.argv[1], windows=30, warmup=3, repeats=2)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print(json.dumps({"formats": sorted(report["formats"]), "baseline": report["baseline"],
                      "device_rss": report["rss"]["device_only"], "loaded": loaded}))
""")


@pytest.fixture(scope="module")
def bench_report(tiny_bundle):
    return run_bench(tiny_bundle, windows=60, warmup=5, repeats=2)


def test_bench_times_every_format_and_stage(bench_report):
    assert set(bench_report["formats"]) == {*ONNX_FORMATS, "torch-fp32"}
    assert bench_report["baseline"] == "torch-fp32"
    for record in bench_report["formats"].values():
        assert set(record["stages"]) == set(STAGES)
        for summary in record["stages"].values():
            assert summary["n"] == 120
            assert len(summary["repeats"]) == 2
            assert summary["p50_spread_pct"] is not None


def test_bench_percentiles_are_ordered(bench_report):
    for key, record in bench_report["formats"].items():
        for stage, summary in record["stages"].items():
            values = [summary[name] for name in PERCENTILE_KEYS]
            assert values == sorted(values), f"{key} {stage}: {values}"
            assert values[0] > 0, f"{key} {stage}: p50 is {values[0]}"


def test_bench_report_keys_and_ratios(bench_report):
    for key in ("schema", "host", "bundle", "settings", "baseline", "formats", "rss"):
        assert key in bench_report
    for key in ONNX_FORMATS:
        record = bench_report["formats"][key]
        assert record["size_bytes"] > 0
        assert record["load_s"] > 0
        assert record["throughput_windows_per_s"] > 0
        assert record["real_time_factor"]["p50"] >= record["real_time_factor"]["p99"]
        assert set(record["speedup_vs_baseline"]) == {
            "inference_p50", "inference_p99", "end_to_end_p50", "end_to_end_p99"}
    assert bench_report["formats"]["onnx-fp32"]["max_abs_score_diff_vs_first"] < 1e-4
    assert bench_report["settings"]["sample_rate_hz"] == 360.0
    json.dumps(bench_report)


def test_bench_measures_rss(bench_report):
    assert bench_report["rss"]["this_process"]["peak_rss_mb"] > 0
    for key in ONNX_FORMATS:
        record = bench_report["rss"]["device_only"][key]
        assert "error" not in record, record
        assert record["rss_mb"] > 0
        assert record["peak_rss_mb"] >= record["rss_mb"]
        assert record["torch_imported"] is False


def test_bench_table_lists_formats(bench_report):
    table = format_report(bench_report)
    for key in (*ONNX_FORMATS, "torch-fp32", "end_to_end", "device-only RSS"):
        assert key in table


def test_bench_cli_writes_json(tiny_bundle, tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    exit_code = main(["device", "bench", "--bundle", str(tiny_bundle), "--windows", "20", "--warmup", "2",
                      "--torch", "off", "--no-rss-probe", "--sample-rate", "250", "--json", str(report_path)])
    assert exit_code == 0
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert sorted(report["formats"]) == sorted(ONNX_FORMATS)
    assert report["baseline"] is None
    assert report["rss"]["device_only"] == {}
    assert report["settings"]["sample_rate_hz"] == 250.0
    assert "onnx-int8" in capsys.readouterr().out


def test_bench_rejects_zero_windows(tiny_bundle):
    with pytest.raises(InvalidInputError, match="windows must be a positive integer, got 0"):
        run_bench(tiny_bundle, windows=0)


def test_bench_rejects_unknown_torch_mode(tiny_bundle):
    with pytest.raises(InvalidInputError, match="torch_baseline must be one of"):
        run_bench(tiny_bundle, torch_baseline="maybe")


def test_bench_runs_with_torch_blocked(tiny_bundle):
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED_SCRIPT, str(tiny_bundle)],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["formats"] == sorted(ONNX_FORMATS)
    assert report["baseline"] is None
    assert report["loaded"] == []
    for key in ONNX_FORMATS:
        assert report["device_rss"][key]["rss_mb"] > 0
