"""Torch eager baseline for benchmarks: an ``nn.Module`` rebuilt from a bundle's fp32 ONNX file.

``anomalyforge device bench`` compares onnxruntime with torch eager on the same weights.
The bundle carries no torch code or checkpoint, so this module reads the fp32 ONNX graph,
keeps its initializers as buffers and runs its nodes one by one as eager torch calls. The
benchmark therefore needs the bundle, torch and onnx, and never the training code.

Each ONNX node becomes one torch call, as the layers of the trained module did, so the
per-operator dispatch cost of eager torch is kept. The ONNX exporter may fuse or split
some operations, so the operator sequence is close to the trained module but not equal to
it. ``benchmarks/mlperf_tiny_ad.py`` times this rebuilt module against the original
``nn.Module`` of the reference model to show how close the two are.

Only the operators that the toolkit's exporters emit are supported. An unsupported
operator raises :class:`~anomalyforge.errors.ExportError` naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from anomalyforge.errors import ExportError, MissingDependencyError

logger = logging.getLogger(__name__)

# ONNX TensorProto data types that the converted graphs use, mapped to torch dtypes.
ONNX_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}


def import_onnx():
    """Import and return the onnx module, or raise MissingDependencyError with the fix."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise MissingDependencyError(
            f"onnx is not installed ({error}); the torch baseline reads the bundle's fp32 ONNX "
            "file with it. Install it with: pip install 'anomalyforge[export]'"
        ) from error
    return onnx, numpy_helper


def attributes_of(node, onnx) -> dict:
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def as_ints(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(item) for item in value.reshape(-1).tolist()]
    return [int(item) for item in value]


def onnx_reshape(data: torch.Tensor, shape) -> torch.Tensor:
    # ONNX Reshape: 0 copies the input dimension (allowzero=0), -1 is inferred.
    dims = [data.shape[axis] if size == 0 else size for axis, size in enumerate(as_ints(shape))]
    return torch.reshape(data, dims)


def onnx_gemm(attributes: dict) -> Callable:
    alpha = float(attributes.get("alpha", 1.0))
    beta = float(attributes.get("beta", 1.0))
    trans_a = bool(attributes.get("transA", 0))
    trans_b = bool(attributes.get("transB", 0))

    def gemm(a, b, c=None):
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        if c is None:
            return alpha * (a @ b) if alpha != 1.0 else a @ b
        if alpha == 1.0 and beta == 1.0:
            return torch.addmm(c, a, b)
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return gemm


def onnx_conv(attributes: dict) -> Callable:
    if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ExportError(f"Conv auto_pad={attributes['auto_pad']!r} is not supported; export with explicit pads")
    pads = list(attributes.get("pads", []))
    stride = list(attributes.get("strides", [1]))
    dilation = list(attributes.get("dilations", [1]))
    groups = int(attributes.get("group", 1))
    half = len(pads) // 2
    if pads and pads[:half] != pads[half:]:
        raise ExportError(f"Conv with asymmetric pads {pads} is not supported")
    padding = pads[:half] if pads else 0

    def conv(x, weight, bias=None):
        function = F.conv1d if weight.dim() == 3 else F.conv2d
        return function(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    return conv


def onnx_max_pool(attributes: dict) -> Callable:
    kernel = list(attributes["kernel_shape"])
    stride = list(attributes.get("strides", kernel))
    pads = list(attributes.get("pads", [0] * 2 * len(kernel)))
    padding = pads[: len(kernel)]
    ceil_mode = bool(attributes.get("ceil_mode", 0))
    function = F.max_pool1d if len(kernel) == 1 else F.max_pool2d
    return lambda x: function(x, kernel, stride, padding, ceil_mode=ceil_mode)


def onnx_reduce(function: Callable, attributes: dict) -> Callable:
    keepdims = bool(attributes.get("keepdims", 1))
    attribute_axes = attributes.get("axes")

    def reduce(data, axes=None):
        chosen = attribute_axes if axes is None else axes
        if chosen is None or len(as_ints(chosen)) == 0:
            return function(data, dim=tuple(range(data.dim())), keepdim=keepdims)
        return function(data, dim=tuple(as_ints(chosen)), keepdim=keepdims)

    return reduce


def onnx_resize(attributes: dict) -> Callable:
    mode = attributes.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest":
        raise ExportError(f"Resize mode {mode!r} is not supported; only 'nearest' is")

    def resize(x, roi=None, scales=None, sizes=None):
        if sizes is not None and sizes.numel():
            return F.interpolate(x, size=as_ints(sizes)[2:], mode="nearest")
        factors = [float(value) for value in scales.reshape(-1).tolist()[2:]]
        return F.interpolate(x, scale_factor=factors, mode="nearest")

    return resize


def onnx_squeeze(data, axes=None):
    if axes is None:
        return torch.squeeze(data)
    for axis in sorted((axis % data.dim() for axis in as_ints(axes)), reverse=True):
        data = torch.squeeze(data, axis)
    return data


def onnx_unsqueeze(data, axes):
    rank = data.dim() + len(as_ints(axes))
    for axis in sorted(axis % rank for axis in as_ints(axes)):
        data = torch.unsqueeze(data, axis)
    return data


def onnx_slice(data, starts, ends, axes=None, steps=None):
    starts, ends = as_ints(starts), as_ints(ends)
    axes = as_ints(axes) if axes is not None else list(range(len(starts)))
    steps = as_ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 1:
            raise ExportError(f"Slice with step {step} is not supported")
        index[axis] = slice(start, min(end, data.shape[axis]))
    return data[tuple(index)]


def make_operator(op_type: str, attributes: dict) -> Callable:
    """Return the torch callable for one ONNX node, or raise ExportError for an unknown operator."""
    elementwise = {
        "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
        "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Identity": lambda x: x,
        "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
        "MatMul": torch.matmul, "Max": torch.maximum, "Min": torch.minimum,
    }
    if op_type in elementwise:
        return elementwise[op_type]

    if op_type == "Gemm":
        return onnx_gemm(attributes)
    if op_type == "Conv":
        return onnx_conv(attributes)
    if op_type == "MaxPool":
        return onnx_max_pool(attributes)
    if op_type == "ReduceMean":
        return onnx_reduce(torch.mean, attributes)
    if op_type == "ReduceSum":
        return onnx_reduce(torch.sum, attributes)
    if op_type == "ReduceMax":
        return onnx_reduce(torch.amax, attributes)
    if op_type == "Resize":
        return onnx_resize(attributes)

    if op_type == "Reshape":
        return onnx_reshape
    if op_type == "Squeeze":
        return onnx_squeeze
    if op_type == "Unsqueeze":
        return onnx_unsqueeze
    if op_type == "Slice":
        return onnx_slice
    if op_type == "Flatten":
        axis = int(attributes.get("axis", 1))
        return lambda x: torch.reshape(x, (int(np.prod(x.shape[:axis])), -1))
    if op_type == "Concat":
        axis = int(attributes["axis"])
        return lambda *tensors: torch.cat(tensors, dim=axis)
    if op_type == "Transpose":
        permutation = attributes.get("perm")
        return lambda x: x.permute(*(permutation or reversed(range(x.dim()))))

    if op_type == "Shape":
        return lambda x: torch.tensor(x.shape, dtype=torch.int64)
    if op_type == "Gather":
        axis = int(attributes.get("axis", 0))
        return lambda data, indices: torch.index_select(data, axis, indices.reshape(-1)).reshape(
            data.shape[:axis] + indices.shape + data.shape[axis + 1:])
    if op_type == "Cast":
        dtype = ONNX_DTYPES.get(int(attributes["to"]))
        if dtype is None:
            raise ExportError(f"Cast to ONNX type {attributes['to']} is not supported")
        return lambda x: x.to(dtype)
    if op_type == "BatchNormalization":
        epsilon = float(attributes.get("epsilon", 1e-5))
        return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)
    raise ExportError(
        f"ONNX operator {op_type!r} is not supported by the torch baseline; the baseline covers "
        "the operators that anomalyforge's exporters emit"
    )


class OnnxGraphModule(torch.nn.Module):
    """Eager torch module that runs the nodes of an fp32 ONNX graph with its weights as buffers.

    Parameters
    ----------
    model : onnx.ModelProto
        A model in topological order with float32 initializers, as ``torch.onnx.export``
        writes it.

    Raises
    ------
    ExportError
        If the graph has an operator or attribute this module does not support.
    """

    def __init__(self, model):
        super().__init__()
        onnx, numpy_helper = import_onnx()
        graph = model.graph
        self.initializer_names = []
        for index, initializer in enumerate(graph.initializer):
            array = numpy_helper.to_array(initializer).copy()
            self.register_buffer(f"initializer_{index}", torch.from_numpy(array))
            self.initializer_names.append(initializer.name)
        initialized = set(self.initializer_names)
        self.input_names = [value.name for value in graph.input if value.name not in initialized]
        self.output_names = [value.name for value in graph.output]
        self.steps = []
        for node in graph.node:
            attributes = attributes_of(node, onnx)
            if node.op_type == "Constant":
                constant = torch.from_numpy(numpy_helper.to_array(attributes_to_tensor(node)).copy())
                self.steps.append((lambda value=constant: value, [], list(node.output)))
                continue
            self.steps.append((make_operator(node.op_type, attributes), list(node.input), list(node.output)))
        self.op_types = sorted({node.op_type for node in graph.node})

    def forward(self, *inputs: torch.Tensor):
        values = dict(zip(self.initializer_names, self.buffers()))
        values.update(zip(self.input_names, inputs))
        values[""] = None  # an empty name marks an omitted optional input
        for operator, input_names, output_names in self.steps:
            result = operator(*[values[name] for name in input_names])
            if len(output_names) == 1:
                values[output_names[0]] = result
            else:
                values.update(zip(output_names, result))
        outputs = [values[name] for name in self.output_names]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def attributes_to_tensor(node):
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
    raise ExportError(f"Constant node {node.name!r} has no 'value' tensor attribute; re-export the model")


def load_torch_baseline(path) -> OnnxGraphModule:
    """Build an eager torch module from an fp32 ONNX file, in eval mode.

    Parameters
    ----------
    path : str or Path
        An fp32 ONNX file from a bundle (the ``onnx-fp32`` format).

    Returns
    -------
    OnnxGraphModule

    Raises
    ------
    MissingDependencyError
        If onnx is not installed.
    ExportError
        If the file cannot be read or uses an unsupported operator.
    """
    onnx, _ = import_onnx()
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as error:  # OSError, or protobuf's DecodeError for a corrupt file
        raise ExportError(f"cannot read ONNX file {path} for the torch baseline ({error})") from error
    module = OnnxGraphModule(model).eval()
    logger.info("torch baseline built from %s: %d nodes (%s)", path, len(module.steps), ", ".join(module.op_types))
    return module
