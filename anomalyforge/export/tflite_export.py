"""TFLite export with litert-torch: float32 and PT2E static int8, plus parity against torch.

Needs the ``tflite-export`` extra (litert-torch 0.10.0, which brings ai-edge-litert and
torchao). Everything is imported lazily, so importing this module costs nothing.

Both formats have a fixed batch of 1: litert-torch converts one concrete input shape, and
PT2E int8 quantization needs it. The device backend scores larger batches row by row.
int8 models take int8 inputs, and their weight layers, activations and data movement run in
int8. A detector's score head stays in float32: the reconstruction error of the
autoencoder, and the last linear layer of a classifier. Scores above the range seen on
normal calibration windows are then not clipped, the same rule as for the ONNX int8 files.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from anomalyforge.errors import ExportError, InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'anomalyforge[tflite-export]' (litert-torch==0.10.0, tflite-micro)"

# Layers whose weights PT2E quantizes. The last one of these in module order is the one
# kept in float when an int8 detector would otherwise return an int8 score.
WEIGHT_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d")


def import_litert_torch():
    """Import and return litert_torch, or raise MissingDependencyError with the install command."""
    try:
        import litert_torch
    except ImportError as error:
        raise MissingDependencyError(f"litert-torch is not installed ({error}); install it with {INSTALL_HINT}") from error
    return litert_torch


def fold_batch_norm(module):
    """Return an eval-mode copy of ``module`` with each BatchNorm folded into the preceding convolution.

    Only a ``Conv1d``/``Conv2d`` immediately followed by a ``BatchNorm1d``/``BatchNorm2d``
    in the same ``nn.Sequential`` is folded; the BatchNorm becomes ``nn.Identity``.
    Without folding, litert-torch emits separate MUL / ADD / TRANSPOSE ops.

    Raises
    ------
    ExportError
        If a BatchNorm layer remains that could not be folded.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    for parent in folded.modules():
        if not isinstance(parent, torch.nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d)) and isinstance(
                    norm, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                parent._modules[first] = fuse_conv_bn_eval(conv, norm)
                parent._modules[second] = torch.nn.Identity()
    remaining = [name for name, child in folded.named_modules()
                 if isinstance(child, torch.nn.modules.batchnorm._BatchNorm)]
    if remaining:
        raise ExportError(
            f"BatchNorm layers {remaining} of {type(module).__name__} do not directly follow a "
            "convolution in an nn.Sequential, so they cannot be folded; place each BatchNorm "
            "right after its Conv1d inside an nn.Sequential"
        )
    return folded


def batch_one_inputs(calibration: dict[str, np.ndarray], input_names: Sequence[str]) -> tuple:
    """Return the first calibration row of each input as a (1, ...) torch tensor, in input order."""
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(calibration[name][:1], dtype=np.float32))
                 for name in input_names)


def export_tflite_fp32(module, calibration: dict[str, np.ndarray], path, input_names: Sequence[str]) -> Path:
    """Convert ``module`` to a float32 ``.tflite`` file with a fixed batch of 1.

    Parameters
    ----------
    module : torch.nn.Module
        The model; BatchNorm layers are folded into a copy first.
    calibration : dict of str to ndarray
        One array of shape (n_samples, ...) per input; the first row traces the model.
    path : str or os.PathLike
        Destination file. An existing file is replaced.
    input_names : sequence of str
        Forward arguments in order, keys of ``calibration``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    litert_torch = import_litert_torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = fold_batch_norm(module)
    try:
        converted = litert_torch.convert(model, batch_one_inputs(calibration, input_names))
        converted.export(str(path))
    except Exception as error:  # litert-torch raises many internal error types
        raise ExportError(f"litert-torch float32 conversion of {type(module).__name__} failed: {error}") from error
    logger.info("exported %s (%d bytes)", path, path.stat().st_size)
    return path


def last_weight_layer(module) -> str | None:
    """Return the qualified name of the last Linear / Conv layer in module order, or None."""
    names = [name for name, child in module.named_modules() if type(child).__name__ in WEIGHT_LAYER_TYPES]
    return names[-1] if names else None


def module_path(stack_entry) -> str:
    """Return the qualified module name of an ``nn_module_stack`` entry ("L['self'].head" -> "head")."""
    path = stack_entry[0] if isinstance(stack_entry, tuple) else str(stack_entry)
    return re.sub(r"^L\['self'\]\.?", "", path)


def make_quantizer(base_class, float_layers: tuple[str, ...]):
    """Return a PT2E quantizer of ``base_class`` that leaves the nodes of ``float_layers`` unannotated.

    litert-torch 0.10.0 cannot do this itself: ``set_module_name`` rejects a None config,
    and its module-name filter expects ``nn_module_stack`` keys of the form
    ``L__self___<name>``, while torch 2.13 writes ``L__self__<name>``.
    """

    class FloatLayerQuantizer(base_class):
        # The override runs before annotate() propagates annotations through data
        # movement ops, so no shared spec refers to a removed annotation.
        def _annotate_for_static_quantization_config(self, model):
            model = super()._annotate_for_static_quantization_config(model)
            for node in model.graph.nodes:
                stack = node.meta.get("nn_module_stack", {})
                if any(module_path(entry) in float_layers for entry in stack.values()):
                    node.meta.pop("quantization_annotation", None)
            return model

    return FloatLayerQuantizer()


def quantize_pt2e(module, calibration: dict[str, np.ndarray], input_names: Sequence[str],
                  float_layers: Sequence[str] = ()):
    """Run PT2E static int8 quantization on ``module`` and return (quantized graph, quantizer).

    Steps: ``torch.export`` at batch 1, ``prepare_pt2e`` with litert-torch's symmetric
    per-channel config, one forward pass per calibration row, ``convert_pt2e`` with
    ``fold_quantize=False`` and ``move_exported_model_to_eval``. Layers named in
    ``float_layers`` are left unquantized.
    """
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = fold_batch_norm(module)
    quantizer = make_quantizer(PT2EQuantizer, tuple(float_layers))
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    graph = torch.export.export(model, batch_one_inputs(calibration, input_names)).module()
    graph = prepare_pt2e(graph, quantizer)
    n_rows = len(calibration[input_names[0]])
    with torch.no_grad():
        for row in range(n_rows):
            graph(*(torch.from_numpy(np.ascontiguousarray(calibration[name][row:row + 1], dtype=np.float32))
                    for name in input_names))
    graph = convert_pt2e(graph, fold_quantize=False)
    move_exported_model_to_eval(graph)
    return graph, quantizer


def export_tflite_int8(module, calibration: dict[str, np.ndarray], path, input_names: Sequence[str],
                       float_output: bool = True) -> Path:
    """Quantize ``module`` with PT2E static int8 and convert it to a ``.tflite`` file (batch 1).

    Parameters
    ----------
    module : torch.nn.Module
        The model; BatchNorm layers are folded into a copy first.
    calibration : dict of str to ndarray
        One array of shape (n_samples, ...) per input, already preprocessed normal data.
        Every row is one calibration pass.
    path : str or os.PathLike
        Destination file. An existing file is replaced.
    input_names : sequence of str
        Forward arguments in order, keys of ``calibration``.
    float_output : bool, default=True
        If True and the fully quantized model returns an int8 output, the last Linear /
        Conv layer is kept in float and the model converted again, so the output is
        float32 and not clipped to the calibrated range. Use it for detector scores. If
        False (decoders), the output stays int8.

    Returns
    -------
    pathlib.Path
        ``path``. Its inputs are int8 with the calibrated scale and zero point.
    """
    from litert_torch.quantize.quant_config import QuantConfig

    litert_torch = import_litert_torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    float_layers: list[str] = []
    while True:
        try:
            graph, quantizer = quantize_pt2e(module, calibration, input_names, float_layers)
            converted = litert_torch.convert(graph, batch_one_inputs(calibration, input_names),
                                             quant_config=QuantConfig(pt2e_quantizer=quantizer))
            converted.export(str(path))
        except Exception as error:  # torch.export, torchao and litert-torch raise many error types
            raise ExportError(f"PT2E int8 conversion of {type(module).__name__} failed: {error}") from error
        _, outputs = tflite_io(path, input_names, ["output"])
        if not float_output or outputs[0]["dtype"] == "float32" or float_layers:
            break
        layer = last_weight_layer(module)
        if layer is None:
            break
        logger.info("%s: int8 output would clip scores; keeping layer %r in float", type(module).__name__, layer)
        float_layers = [layer]
    logger.info("exported %s (%d bytes, float layers %s)", path, path.stat().st_size, float_layers)
    return path


def tflite_io(path, input_names: Sequence[str], output_names: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Return the inputs and outputs of a ``.tflite`` file as manifest records.

    Each record is ``{"name", "tensor", "shape", "dtype", "scale", "zero_point"}``: ``name``
    is the manifest name given here (matched by position), ``tensor`` the name inside the
    file, and ``scale`` / ``zero_point`` are None for float tensors.
    """
    from anomalyforge.device.tflite_backend import import_tflite_interpreter, tensor_quantization

    interpreter_class, _, _ = import_tflite_interpreter()
    interpreter = interpreter_class(model_path=str(path))

    def records(details, names) -> list[dict]:
        if len(details) != len(names):
            raise ExportError(f"{path} has {len(details)} tensors where {list(names)} were expected")
        result = []
        for name, detail in zip(names, details):
            quantization = tensor_quantization(detail)
            result.append({
                "name": name,
                "tensor": detail["name"],
                "shape": [int(size) for size in detail["shape"]],
                "dtype": np.dtype(detail["dtype"]).name,
                "scale": None if quantization is None else quantization[0],
                "zero_point": None if quantization is None else quantization[1],
            })
        return result

    return records(interpreter.get_input_details(), input_names), records(interpreter.get_output_details(), output_names)


def tflite_ops(path) -> list[str]:
    """Return the sorted builtin operator names used by a ``.tflite`` file (``CONV_2D``, ...)."""
    from anomalyforge.device.tflite_backend import import_tflite_interpreter

    interpreter_class, _, _ = import_tflite_interpreter()
    interpreter = interpreter_class(model_path=str(path))
    # _get_ops_details is private in ai-edge-litert 2.3 but is the only listing of the ops.
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def quantization_settings(n_samples: int, float_layers_rule: bool) -> dict:
    """Return the manifest record of how a ``tflite-int8`` file was quantized."""
    from importlib.metadata import version

    return {
        "tool": "PT2E (torchao prepare_pt2e / convert_pt2e) + litert_torch.convert",
        "litert_torch_version": version("litert-torch"),
        "activation_type": "int8",
        "weight_type": "int8, symmetric, per channel",
        "calibration_samples": int(n_samples),
        "calibration_batch_size": 1,
        "float_output_rule": bool(float_layers_rule),
    }


def tflite_parity(module, path, entry: dict, inputs: dict[str, np.ndarray]) -> dict:
    """Compare ``module`` in torch with a ``.tflite`` file in LiteRT (optimised kernels, as on the device).

    Returns ``max_abs_diff``, ``mean_abs_diff`` and ``n_samples`` like
    :func:`anomalyforge.export.onnx_export.parity`.
    """
    import torch

    from anomalyforge.device.tflite_backend import TFLiteBackend

    names = [record["name"] for record in entry["inputs"]]
    outputs = TFLiteBackend(path, entry).run(inputs)
    module.eval()
    with torch.no_grad():
        reference = module(*[torch.from_numpy(np.asarray(inputs[name], dtype=np.float32)) for name in names])
    difference = np.abs(reference.numpy().astype(np.float64).reshape(outputs[0].shape) - outputs[0])
    return {"max_abs_diff": float(difference.max()), "mean_abs_diff": float(difference.mean()),
            "n_samples": int(len(inputs[names[0]]))}


def export_tflite_formats(module, calibration: dict[str, np.ndarray], out_dir: Path, file_names: dict[str, str],
                          input_names: Sequence[str], output_names: Sequence[str],
                          float_output: bool) -> tuple[dict[str, Path], dict[str, dict]]:
    """Write the requested ``tflite-fp32`` / ``tflite-int8`` files and return (paths, extra entry fields).

    ``file_names`` maps each format key to its file name inside ``out_dir``. The extra
    fields are ``inputs``, ``outputs`` (with scale and zero point), ``ops``, ``parity`` and,
    for int8, ``quantization``.
    """
    if not set(file_names) <= {"tflite-fp32", "tflite-int8"}:
        raise InvalidInputError(f"unknown TFLite format keys {sorted(file_names)}; use tflite-fp32 and tflite-int8")
    paths, extras = {}, {}
    for format_key, file_name in file_names.items():
        path = Path(out_dir) / file_name
        if format_key == "tflite-fp32":
            export_tflite_fp32(module, calibration, path, input_names)
        else:
            export_tflite_int8(module, calibration, path, input_names, float_output=float_output)
        inputs, outputs = tflite_io(path, input_names, output_names)
        extra = {"inputs": inputs, "outputs": outputs, "ops": tflite_ops(path)}
        extra["parity"] = tflite_parity(module, path, extra, calibration)
        if format_key == "tflite-int8":
            extra["quantization"] = quantization_settings(len(calibration[input_names[0]]), float_output)
        paths[format_key], extras[format_key] = path, extra
    return paths, extras
