"""Workstation export: ONNX fp32 / int8 files, parity checks and bundle writing.

Needs the ``export`` extra (torch, onnx, onnxscript, onnxruntime); torch and onnx are
imported only when a function that needs them runs.
"""

from anomalyforge.export.onnx_export import (
    ExportError,
    export_onnx,
    parity,
    quantization_settings,
    quantize_onnx_int8,
    run_onnx,
)
from anomalyforge.export.writer import BundleWriter

__all__ = [
    "BundleWriter",
    "ExportError",
    "export_onnx",
    "parity",
    "quantization_settings",
    "quantize_onnx_int8",
    "run_onnx",
]
