"""ONNX export, static int8 quantization and torch / onnxruntime parity checks.

The workstation side of the bundle: a trained ``torch.nn.Module`` becomes one
self-contained fp32 ``.onnx`` file with a dynamic batch dimension, then an int8 QDQ copy
calibrated on real windows. :func:`run_onnx` is the same call the device makes, so
:func:`parity` measures what the device will see.

torch, onnx and onnxruntime are imported lazily, so importing this module costs nothing
on a host that only has the device dependencies.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from anomalyforge.errors import ExportError, InvalidInputError

logger = logging.getLogger(__name__)

# Calibration windows are fed to onnxruntime in batches of this many rows. MinMax merges
# the per-batch extrema, so the batch size does not change the calibrated ranges.
CALIBRATION_BATCH_SIZE = 16

# Calibration method, chosen by measurement: ECG5000, a Conv1d autoencoder score module
# trained on 192 normal beats and calibrated on them, scored on 1000 test beats
# (onnxruntime 1.32, x86_64). Test ROC-AUC moved from torch by +0.0017 (MinMax),
# +0.0033 (Percentile 99.999) and +0.0017 (Entropy), and the mean absolute score error
# was 0.0007, 0.0008 and 0.0007, so the histogram methods gained nothing here. MinMax is
# the default because it keeps the whole calibrated range: anomalous windows drive
# activations towards and beyond the extremes of the normal calibration windows, and
# Percentile or Entropy deliberately cut those tails.
DEFAULT_CALIBRATION_METHOD = "MinMax"
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")

# Only the operators that carry weights, and the activation and data-movement operators
# between them, are quantized. Elementwise score heads (Sub, Pow, ReduceMean) stay in
# float: quantizing a score to int8 with a range calibrated on normal windows would clip
# every score above that range to one value and erase the ranking among anomalies.
QUANTIZED_OP_TYPES = (
    "Conv", "Gemm", "MatMul", "Relu", "Resize", "Reshape", "Squeeze", "Unsqueeze",
    "Concat", "MaxPool", "AveragePool", "Transpose", "Flatten",
)

# Operators that only move or reshape data. The walk from a graph output back to the node
# that computes it passes through these.
SHAPE_OP_TYPES = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Identity"})


def export_onnx(module, example_inputs: tuple, path, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_batch: bool = True) -> Path:
    """Export ``module`` to one self-contained fp32 ONNX file and validate it.

    Parameters
    ----------
    module : torch.nn.Module
        The model. It is switched to eval mode and left there.
    example_inputs : tuple of torch.Tensor
        One float tensor per ``forward`` argument, in argument order, each of shape
        (batch, ...) with the same batch size. Real data is best: the tracer follows the
        path these inputs take.
    path : str or os.PathLike
        Destination ``.onnx`` file. An existing file is replaced.
    input_names : sequence of str
        Graph input names, one per tensor in ``example_inputs``.
    output_names : sequence of str
        Graph output names, one per output of ``forward``.
    dynamic_batch : bool, default=True
        If True, dimension 0 of every input and output is the symbolic ``batch``. If False,
        the shapes of ``example_inputs`` are fixed.

    Returns
    -------
    pathlib.Path
        ``path``, after ``onnx.checker`` (with shape inference) accepted the file.

    Raises
    ------
    InvalidInputError
        If the inputs or names are inconsistent.
    ExportError
        If both exporters fail, or the written graph does not have the requested inputs.

    Notes
    -----
    The weights are stored inside the file (``external_data=False``), so no
    ``.onnx.data`` side file is written; this limits a model to the 2 GB protobuf limit.
    Exporting the same module with the same inputs twice gives byte-identical files.
    """
    import torch

    path = Path(path)
    example_inputs = check_example_inputs(example_inputs, input_names)
    output_names = list(output_names)
    module.eval()

    logger.info(
        "exporting %s to %s (inputs %s, dynamic batch %s)",
        type(module).__name__, path,
        {name: tuple(tensor.shape) for name, tensor in zip(input_names, example_inputs)},
        dynamic_batch,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_with_dynamo(module, example_inputs, path, input_names, output_names, dynamic_batch)
    except torch.onnx.OnnxExporterError as error:
        # The dynamo exporter fails where torch.export cannot capture the graph, for
        # example on an operator without a decomposition. The TorchScript exporter records
        # one concrete execution instead, which is exact for feed-forward models. It would
        # be wrong for a branch on tensor values, so export_with_torchscript rejects those.
        logger.warning(
            "dynamo export of %s failed (%s); retrying with the TorchScript exporter",
            type(module).__name__, first_line(error),
        )
        logger.debug("dynamo export error of %s", type(module).__name__, exc_info=error)
        try:
            export_with_torchscript(module, example_inputs, path, input_names, output_names, dynamic_batch)
        except Exception as fallback_error:
            raise ExportError(
                f"both ONNX exporters failed for {type(module).__name__} (dynamo: "
                f"{first_line(error)}; TorchScript: {first_line(fallback_error)}). Remove Python "
                "branches on tensor values and unsupported operations from its forward"
            ) from fallback_error

    check_onnx_file(path, input_names, output_names)
    logger.info("exported %s (%d bytes)", path, path.stat().st_size)
    return path


def check_example_inputs(example_inputs, input_names: Sequence[str]) -> tuple:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if len(example_inputs) != len(input_names):
        raise InvalidInputError(
            f"got {len(example_inputs)} example inputs but {len(input_names)} input names "
            f"{list(input_names)}; pass one name per forward argument"
        )
    batch_sizes = set()
    for name, tensor in zip(input_names, example_inputs):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim < 1:
            raise InvalidInputError(
                f"example input {name!r} must be a torch.Tensor of shape (batch, ...), "
                f"got {type(tensor).__name__} {getattr(tensor, 'shape', '')}"
            )
        batch_sizes.add(int(tensor.shape[0]))
    if len(batch_sizes) != 1:
        raise InvalidInputError(
            f"example inputs have different batch sizes {sorted(batch_sizes)}; "
            "give every input the same number of rows"
        )
    return example_inputs


def export_with_dynamo(module, example_inputs, path: Path, input_names, output_names,
                       dynamic_batch: bool) -> None:
    import torch

    dynamic_shapes = None
    if dynamic_batch:
        # One shared Dim declares to torch.export that all inputs have the same batch size.
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    with warnings.catch_warnings():
        # With a shared Dim the exporter warns once per extra input that the axis name
        # is already taken. The warning is harmless because every input still gets the
        # symbolic dimension "batch".
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        program = torch.onnx.export(
            module, example_inputs, dynamo=True, input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=dynamic_shapes,
            external_data=False, verbose=False,
        )
    program.save(path, external_data=False)


# torch 2.13's exporter warns once per run that torchvision is missing and its detection
# operators (nms, roi_align, ...) cannot be registered. No anomalyforge model uses them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_with_torchscript(module, example_inputs, path: Path, input_names, output_names,
                            dynamic_batch: bool) -> None:
    import torch

    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        # A TracerWarning means the trace depends on the example values (a Python branch
        # on a tensor, for instance), so the exported graph would be wrong for other inputs.
        warnings.simplefilter("error", torch.jit.TracerWarning)
        torch.onnx.export(
            module, example_inputs, str(path), dynamo=False, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=17,
        )


def first_line(error: BaseException) -> str:
    """Return the exception type and the first line of its message, without colour codes.

    A warning turned into an error inside a C++ call surfaces as the context of a
    SystemError with an unhelpful message, so the warning is reported instead.
    """
    if isinstance(error.__context__, Warning):
        error = error.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def check_onnx_file(path: Path, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Validate ``path`` with onnx.checker and check its interface and storage."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    side_file = path.with_name(path.name + ".data")
    if side_file.exists():
        raise ExportError(
            f"{path} has an external-data side file {side_file.name}; the bundle expects "
            "self-contained files. Remove the side file and export again"
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{path} failed onnx.checker validation: {error}") from error

    model = onnx.load(str(path))
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        raise ExportError(f"{path} references external tensor data; export it with external_data=False")
    graph_inputs = [value.name for value in model.graph.input]
    graph_outputs = [value.name for value in model.graph.output]
    if graph_inputs != list(input_names) or graph_outputs != list(output_names):
        # torch.export drops a forward argument that the computation never reads.
        raise ExportError(
            f"{path} has inputs {graph_inputs} and outputs {graph_outputs}, expected "
            f"{list(input_names)} and {list(output_names)}; check that forward uses every argument"
        )


def onnx_io(path) -> tuple[list[dict], list[dict]]:
    """Return the inputs and outputs of an ONNX file as manifest records.

    Each record is ``{"name", "shape", "dtype"}``, with ``None`` for a symbolic dimension.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def records(values) -> list[dict]:
        result = []
        for value in values:
            tensor_type = value.type.tensor_type
            shape = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
            result.append({"name": value.name, "shape": shape, "dtype": dtype})
        return result

    return records(model.graph.input), records(model.graph.output)


def check_calibration(calibration: dict, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Return ``calibration`` as finite float32 arrays with a common number of rows."""
    if not isinstance(calibration, dict) or sorted(calibration) != sorted(input_names):
        received = sorted(calibration) if isinstance(calibration, dict) else type(calibration).__name__
        raise InvalidInputError(
            f"calibration data must be a dict with one array per model input {list(input_names)}, "
            f"got {received}"
        )
    arrays = {}
    for name in input_names:
        array = np.ascontiguousarray(calibration[name], dtype=np.float32)
        if array.ndim < 2 or array.shape[0] == 0:
            raise InvalidInputError(
                f"calibration array {name!r} must have shape (n_samples, ...) with n_samples >= 1, "
                f"got {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise InvalidInputError(
                f"calibration array {name!r} contains {int(np.sum(~np.isfinite(array)))} non-finite "
                "values; drop those rows before quantizing"
            )
        arrays[name] = array
    row_counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(row_counts.values())) != 1:
        raise InvalidInputError(
            f"calibration arrays have different numbers of rows {row_counts}; "
            "give every input one row per calibration sample"
        )
    return arrays


def make_calibration_reader(arrays: dict[str, np.ndarray], batch_size: int):
    """Build an onnxruntime CalibrationDataReader that yields ``arrays`` in row batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayCalibrationReader(CalibrationDataReader):
        def __init__(self):
            self.n_rows = next(iter(arrays.values())).shape[0]
            self.start = 0

        def get_next(self):
            if self.start >= self.n_rows:
                return None
            stop = min(self.start + batch_size, self.n_rows)
            batch = {name: array[self.start:stop] for name, array in arrays.items()}
            self.start = stop
            return batch

        def rewind(self):
            self.start = 0

    return ArrayCalibrationReader()


def quantization_settings(calibration: dict, per_channel: bool = True,
                          calibration_method: str = DEFAULT_CALIBRATION_METHOD,
                          batch_size: int = CALIBRATION_BATCH_SIZE,
                          float_outputs: bool = True) -> dict:
    """Return the manifest record of a :func:`quantize_onnx_int8` call with these arguments.

    Parameters
    ----------
    calibration : dict of str to ndarray
        The calibration arrays passed to :func:`quantize_onnx_int8`, each of shape
        (n_samples, ...).
    per_channel, calibration_method, batch_size, float_outputs
        As in :func:`quantize_onnx_int8`.

    Returns
    -------
    dict
        JSON-serialisable settings: tool and version, format, activation and weight types,
        per-channel flag, calibration method, sample count and batch size, the quantized
        operator types and whether the output nodes stay in float.
    """
    import onnxruntime

    n_samples = {int(np.shape(array)[0]) for array in calibration.values()}
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "onnxruntime_version": onnxruntime.__version__,
        "format": "QDQ",
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "per_channel": bool(per_channel),
        "reduce_range": False,
        "calibration_method": calibration_method,
        "calibration_samples": n_samples.pop() if len(n_samples) == 1 else None,
        "calibration_batch_size": int(batch_size),
        "op_types_to_quantize": list(QUANTIZED_OP_TYPES),
        "float_outputs": bool(float_outputs),
    }


def output_node_names(model) -> list[str]:
    """Return the names of the nodes that compute the graph outputs of ``model``.

    Starting from each graph output, the walk goes back through shape-only operators
    (Reshape, Squeeze, ...) and includes the first node that computes values.
    """
    producers = {output: node for node in model.graph.node for output in node.output}
    names = []
    for graph_output in model.graph.output:
        node = producers.get(graph_output.name)
        while node is not None:
            names.append(node.name)
            if node.op_type not in SHAPE_OP_TYPES:
                break
            node = producers.get(node.input[0])
    return names


def quantize_onnx_int8(fp32_path, int8_path, calibration: dict[str, np.ndarray],
                       per_channel: bool = True,
                       calibration_method: str = DEFAULT_CALIBRATION_METHOD,
                       batch_size: int = CALIBRATION_BATCH_SIZE,
                       float_outputs: bool = True) -> Path:
    """Quantize an fp32 ONNX file to int8 QDQ with static, calibrated activation ranges.

    Parameters
    ----------
    fp32_path : str or os.PathLike
        Model written by :func:`export_onnx`.
    int8_path : str or os.PathLike
        Destination file. An existing file is replaced.
    calibration : dict of str to ndarray
        One array per model input, keyed by input name, each of shape
        (n_samples, ...) with the same n_samples. Use windows the detector will see in
        normal operation, already preprocessed.
    per_channel : bool, default=True
        If True, each output channel of a Conv or Gemm weight gets its own scale.
    calibration_method : {"MinMax", "Percentile", "Entropy"}, default="MinMax"
        How activation ranges are derived from the calibration data. See
        ``DEFAULT_CALIBRATION_METHOD`` for why MinMax is the default.
    batch_size : int, default=16
        Rows per calibration batch fed to onnxruntime.
    float_outputs : bool, default=True
        If True, the nodes that compute the graph outputs (see :func:`output_node_names`)
        stay in float, weights included, so the output tensor itself is not clipped to the
        range seen during calibration (the activations feeding it still are). A classifier
        calibrated on normal windows only would otherwise map every anomalous logit above
        that range to the same value. If False, every quantizable node is quantized.

    Returns
    -------
    pathlib.Path
        ``int8_path``, after ``onnx.checker`` accepted the file. Activations and weights
        are signed int8 (``QuantType.QInt8``), weights symmetric.

    Raises
    ------
    InvalidInputError
        If the calibration data does not match the model inputs or an argument is invalid.
    ExportError
        If onnxruntime fails to quantize the model.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if calibration_method not in CALIBRATION_METHODS:
        raise InvalidInputError(
            f"calibration_method must be one of {list(CALIBRATION_METHODS)}, got {calibration_method!r}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not fp32_path.is_file():
        raise InvalidInputError(f"fp32 model {fp32_path} not found; export it with export_onnx first")

    input_names = [record["name"] for record in onnx_io(fp32_path)[0]]
    arrays = check_calibration(calibration, input_names)
    reader = make_calibration_reader(arrays, batch_size)
    n_samples = next(iter(arrays.values())).shape[0]
    logger.info(
        "quantizing %s to int8 (%s calibration on %d samples, per_channel=%s)",
        fp32_path, calibration_method, n_samples, per_channel,
    )

    int8_path.parent.mkdir(parents=True, exist_ok=True)
    preprocessed_path = int8_path.with_name(int8_path.name + ".preprocessed.tmp")
    try:
        # Pre-processing runs ONNX shape inference and onnxruntime's basic graph
        # optimizations, so every tensor passed to the quantizer has a known type. The
        # symbolic shape inference of onnxruntime 1.32 is skipped because it failed
        # ("Incomplete symbolic shape inference") on the Conv1d + Upsample autoencoder and
        # left scratch files in the working directory.
        quant_pre_process(str(fp32_path), str(preprocessed_path), skip_symbolic_shape=True)
        float_nodes = output_node_names(onnx.load(str(preprocessed_path))) if float_outputs else []
        logger.debug("nodes kept in float: %s", float_nodes)
        quantize_static(
            str(preprocessed_path), str(int8_path),
            calibration_data_reader=reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=per_channel,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes,
            calibrate_method=getattr(CalibrationMethod, calibration_method),
            use_external_data_format=False,
        )
    except (RuntimeError, ValueError) as error:
        raise ExportError(f"int8 quantization of {fp32_path} failed: {error}") from error
    finally:
        preprocessed_path.unlink(missing_ok=True)

    output_names = [record["name"] for record in onnx_io(fp32_path)[1]]
    check_onnx_file(int8_path, input_names, output_names)
    logger.info("quantized %s (%d bytes)", int8_path, int8_path.stat().st_size)
    return int8_path


def make_session(path, threads: int = 1):
    """Open an onnxruntime CPU session with ``threads`` intra-op threads."""
    import onnxruntime

    if not isinstance(threads, int) or threads < 1:
        raise InvalidInputError(f"threads must be a positive integer, got {threads!r}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(path, inputs: dict[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """Run an ONNX file on the CPU with onnxruntime.

    Parameters
    ----------
    path : str or os.PathLike
        ONNX model file.
    inputs : dict of str to ndarray
        One array per model input, keyed by input name. Arrays are converted to the
        input's dtype (float32 for every model of this toolkit).
    threads : int, default=1
        Intra-op threads. One thread matches a single-core device budget.

    Returns
    -------
    list of ndarray
        The outputs in graph order.

    Raises
    ------
    InvalidInputError
        If an input is missing or unknown.
    """
    session = make_session(path, threads)
    expected = {value.name: value for value in session.get_inputs()}
    if sorted(inputs) != sorted(expected):
        raise InvalidInputError(
            f"{path} takes inputs {sorted(expected)}, got {sorted(inputs)}; "
            "pass one array per model input"
        )
    feed = {}
    for name, value in expected.items():
        dtype = np.float32 if value.type == "tensor(float)" else None
        feed[name] = np.ascontiguousarray(inputs[name], dtype=dtype)
    return session.run(None, feed)


def parity(module, onnx_path, inputs: dict[str, np.ndarray]) -> dict:
    """Compare the outputs of ``module`` in torch with those of ``onnx_path`` in onnxruntime.

    Parameters
    ----------
    module : torch.nn.Module
        The exported model; it is switched to eval mode. Its ``forward`` takes the inputs
        positionally in the graph's input order.
    onnx_path : str or os.PathLike
        The exported (fp32 or int8) model.
    inputs : dict of str to ndarray
        One array per model input, each of shape (batch, ...).

    Returns
    -------
    dict
        ``max_abs_diff`` and ``mean_abs_diff`` over all elements of all outputs (float),
        and ``n_samples``, the batch size compared.
    """
    import torch

    input_names = [record["name"] for record in onnx_io(onnx_path)[0]]
    onnx_outputs = run_onnx(onnx_path, inputs)

    module.eval()
    with torch.no_grad():
        torch_outputs = module(*[torch.from_numpy(np.asarray(inputs[name], dtype=np.float32)) for name in input_names])
    if isinstance(torch_outputs, torch.Tensor):
        torch_outputs = (torch_outputs,)
    if len(torch_outputs) != len(onnx_outputs):
        raise ExportError(
            f"the module returns {len(torch_outputs)} outputs but {onnx_path} has {len(onnx_outputs)}; "
            "export the module again"
        )

    differences = []
    for torch_output, onnx_output in zip(torch_outputs, onnx_outputs):
        torch_array = torch_output.detach().numpy()
        if torch_array.shape != onnx_output.shape:
            raise ExportError(
                f"output shape differs: torch {torch_array.shape}, onnxruntime {onnx_output.shape} "
                f"for {onnx_path}"
            )
        differences.append(np.abs(torch_array.astype(np.float64) - onnx_output.astype(np.float64)).ravel())
    difference = np.concatenate(differences)
    result = {
        "max_abs_diff": float(difference.max()) if difference.size else 0.0,
        "mean_abs_diff": float(difference.mean()) if difference.size else 0.0,
        "n_samples": int(np.shape(inputs[input_names[0]])[0]),
    }
    if not math.isfinite(result["max_abs_diff"]):
        logger.warning("parity of %s is not finite: an output contains NaN or inf", onnx_path)
    logger.info("parity %s: max_abs_diff %.3g, mean_abs_diff %.3g", onnx_path,
                result["max_abs_diff"], result["mean_abs_diff"])
    return result
