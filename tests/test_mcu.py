"""Microcontroller target: C sources, op list and the measured TFLite Micro arena size."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from anomalyforge.export.mcu import c_identifier, resolver_method

HAVE_TOOLS = all(importlib.util.find_spec(name) is not None for name in ("litert_torch", "ai_edge_litert", "tflite_micro"))
needs_tools = pytest.mark.skipif(
    not HAVE_TOOLS,
    reason="litert-torch, ai-edge-litert or tflite-micro is not installed; "
           "install them with pip install 'anomalyforge[tflite-export]'",
)


@pytest.mark.parametrize("op_name, method", [
    ("CONV_2D", "AddConv2D"),
    ("DEPTHWISE_CONV_2D", "AddDepthwiseConv2D"),
    ("FULLY_CONNECTED", "AddFullyConnected"),
    ("MAX_POOL_2D", "AddMaxPool2D"),
    ("GATHER_ND", "AddGatherNd"),
    ("REDUCE_MAX", "AddReduceMax"),
    ("DEQUANTIZE", "AddDequantize"),
])
def test_resolver_method_names(op_name, method):
    assert resolver_method(op_name) == method


def test_c_identifier_replaces_dashes():
    assert c_identifier("classifier-real") == "classifier_real"
    assert c_identifier("1model") == "_1model"


@pytest.fixture(scope="module")
def mcu_model(tmp_path_factory):
    """A seeded 1-D CNN classifier exported to int8 TFLite and built for the MCU target."""
    import torch

    from anomalyforge.export.mcu import build_mcu_target
    from anomalyforge.export.tflite_export import export_tflite_int8, tflite_io, tflite_ops
    from anomalyforge.training.datasets import load_ecg5000
    from anomalyforge.training.models import ConvClassifier
    from anomalyforge.signal import apply_preprocessing, preprocessing_spec

    directory = tmp_path_factory.mktemp("mcu")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        module = ConvClassifier(140, channels=16).eval()
        train, _ = load_ecg5000()
        windows = apply_preprocessing(preprocessing_spec(), train.x[:64])
        path = export_tflite_int8(module, {"window": windows}, directory / "classifier.int8.tflite", ["window"])
    finally:
        torch.set_num_threads(previous_threads)
    inputs, outputs = tflite_io(path, ["window"], ["score"])
    entry = {"inputs": inputs, "outputs": outputs, "ops": tflite_ops(path)}
    record = build_mcu_target(path, directory / "c", "classifier", entry)
    return {"path": path, "entry": entry, "record": record, "dir": directory / "c", "windows": windows}


@needs_tools
def test_arena_exact_size_runs_and_smaller_fails(mcu_model):
    from anomalyforge.export.mcu import arena_fits

    record = mcu_model["record"]
    assert record["arena_verified"]
    assert record["arena_90_percent_fails"]
    assert arena_fits(mcu_model["path"], record["ram_arena_bytes"], 1)
    assert not arena_fits(mcu_model["path"], record["ram_arena_bytes"] - 16, 1)


@needs_tools
def test_c_sources_hold_model_and_ops(mcu_model):
    record = mcu_model["record"]
    source = (mcu_model["dir"] / "model_data.cc").read_text()
    header = (mcu_model["dir"] / "model_data.h").read_text()
    ops_header = (mcu_model["dir"] / "model_ops.h").read_text()
    size = mcu_model["path"].stat().st_size
    assert "alignas(16) const unsigned char classifier_model_data[]" in source
    assert f"classifier_model_data_len = {size};" in source
    assert len(re.findall(r"0x[0-9a-f]{2}", source)) == size
    assert f"classifier_tensor_arena_size = {record['ram_arena_bytes']};" in header
    assert "classifier_input_window_scale" in header
    assert f"classifier_op_count = {len(record['ops'])};" in ops_header
    assert ops_header.count("resolver.Add") == len(record["ops"])
    assert record["flash_model_bytes"] == size


@needs_tools
def test_tflm_bit_exact_with_reference_kernels(mcu_model):
    from anomalyforge.device.tflite_backend import TFLiteBackend, quantize
    from anomalyforge.export.mcu import run_tflm

    entry, windows = mcu_model["entry"], mcu_model["windows"]
    record = entry["inputs"][0]
    codes = quantize(windows, record["scale"], record["zero_point"], np.int8)
    micro = run_tflm(mcu_model["path"], [codes], mcu_model["record"]["ram_arena_bytes"]).pop().reshape(-1)
    reference = TFLiteBackend(mcu_model["path"], entry, reference_kernels=True).run({"window": windows})[0]
    assert np.array_equal(micro.astype(np.float32), reference)
