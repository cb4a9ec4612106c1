"""TFLite inference back-end for the device: LiteRT (ai-edge-litert), tflite-runtime as fallback.

The interpreter module is imported when a backend is created, never when this module is
imported, so hosts with only onnxruntime are unaffected. int8 models take and return
quantized tensors: :class:`TFLiteBackend` quantizes float inputs and dequantizes outputs
with the scale and zero point stored in the model itself, so callers always exchange
float32 arrays, as with :class:`anomalyforge.device.backends.OnnxRuntimeBackend`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from anomalyforge.errors import BundleError, InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'anomalyforge[tflite]' (installs ai-edge-litert)"


def import_tflite_interpreter():
    """Return ``(Interpreter class, OpResolverType enum or None, runtime description)``.

    ai-edge-litert is tried first. tflite-runtime is the fallback: its 2.14 wheels are
    built against numpy 1, and with numpy 2 they import but fail when an Interpreter is
    created ("_ARRAY_API not found"), so that combination is rejected here with the fix.

    Raises
    ------
    MissingDependencyError
        If neither runtime is usable.
    """
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError as litert_error:
        try:
            import tflite_runtime
            from tflite_runtime import interpreter as litert
        except ImportError as runtime_error:
            raise MissingDependencyError(
                f"no TFLite runtime is installed (ai-edge-litert: {litert_error}; tflite-runtime: "
                f"{runtime_error}); install one with {INSTALL_HINT}"
            ) from runtime_error
        numpy_major = int(np.__version__.split(".")[0])
        if numpy_major >= 2:
            raise MissingDependencyError(
                f"tflite-runtime {getattr(tflite_runtime, '__version__', '?')} is installed but was "
                f"built for numpy < 2, and numpy {np.__version__} is installed; install "
                f"ai-edge-litert ({INSTALL_HINT}) or pin numpy with pip install 'numpy<2'"
            )
        version = getattr(tflite_runtime, "__version__", "unknown")
        return litert.Interpreter, getattr(litert, "OpResolverType", None), f"tflite-runtime {version}"
    try:
        from importlib.metadata import version as package_version

        version = package_version("ai-edge-litert")
    except Exception:  # metadata is missing in some vendored installs; the version is informative only
        version = "unknown"
    return litert.Interpreter, litert.OpResolverType, f"ai-edge-litert {version}"


def quantize(values: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Map float values to integers: ``clip(round(values / scale) + zero_point)``.

    Rounding is numpy's round half to even, the same rule as TFLite's reference QUANTIZE kernel.
    """
    info = np.iinfo(dtype)
    scaled = np.round(np.asarray(values, dtype=np.float32) / np.float32(scale)) + zero_point
    return np.clip(scaled, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Map integers back to float32: ``(values - zero_point) * scale``."""
    return ((np.asarray(values, dtype=np.int32) - zero_point) * np.float32(scale)).astype(np.float32)


def tensor_quantization(detail: dict) -> tuple[float, int] | None:
    """Return (scale, zero_point) of an interpreter tensor, or None for a float tensor."""
    scale, zero_point = detail["quantization"]
    if scale == 0.0:
        return None
    return float(scale), int(zero_point)


class TFLiteBackend:
    """One TFLite interpreter for one model file, verified against its manifest file entry.

    Parameters
    ----------
    path : str or Path
        The ``.tflite`` file.
    entry : dict
        The manifest file entry with ``inputs`` and ``outputs`` lists of ``{"name",
        "shape", "dtype"}`` in model order (TFLite tensor names are not the manifest
        names, so tensors are matched by position).
    threads : int, default=1
        Interpreter threads.
    reference_kernels : bool, default=False
        If True, use TFLite's reference kernels (``OpResolverType.BUILTIN_REF``) instead
        of the optimised ones (XNNPACK by default). Reference kernels are slower but give
        the integer results TFLite Micro gives, so export parity checks use them.

    Raises
    ------
    MissingDependencyError
        If no TFLite runtime is installed.
    BundleError
        If the file cannot be loaded, or its tensor count, shapes or dtypes differ from the
        manifest entry.
    """

    def __init__(self, path, entry: dict, threads: int = 1, reference_kernels: bool = False):
        if threads < 1:
            raise InvalidInputError(f"threads must be at least 1, got {threads}")
        interpreter_class, resolver_types, self.runtime = import_tflite_interpreter()
        self.path = Path(path)
        self.entry = entry
        options = {"num_threads": threads}
        if reference_kernels:
            if resolver_types is None:
                raise MissingDependencyError(
                    f"{self.runtime} offers no reference-kernel op resolver; install ai-edge-litert"
                )
            options["experimental_op_resolver_type"] = resolver_types.BUILTIN_REF
        try:
            self.interpreter = interpreter_class(model_path=str(self.path), **options)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise BundleError(
                f"{self.runtime} failed to load {self.path} ({error}); the file may need a newer "
                "runtime or a re-export"
            ) from error

        self.input_details = self.interpreter.get_input_details()
        self.output_details = self.interpreter.get_output_details()
        self.verify_signature()
        self.input_names = [tensor["name"] for tensor in entry["inputs"]]
        self.output_names = [tensor["name"] for tensor in entry["outputs"]]
        logger.info("loaded %s with %s (%d thread(s), reference kernels %s)",
                    self.path, self.runtime, threads, reference_kernels)

    def verify_signature(self) -> None:
        """Check the interpreter's tensors against the manifest entry."""
        for kind, expected_list, actual_list in (
            ("input", self.entry["inputs"], self.input_details),
            ("output", self.entry["outputs"], self.output_details),
        ):
            if len(actual_list) != len(expected_list):
                raise BundleError(
                    f"{self.path}: the model has {len(actual_list)} {kind}s but the manifest lists "
                    f"{len(expected_list)} {[tensor['name'] for tensor in expected_list]}; re-export the bundle"
                )
            for expected, actual in zip(expected_list, actual_list):
                shape = [int(size) for size in actual["shape"]]
                dtype = np.dtype(actual["dtype"]).name
                if list(expected["shape"]) != shape or expected.get("dtype", "float32") != dtype:
                    raise BundleError(
                        f"{self.path}: {kind} {expected['name']!r} is {dtype} {shape} in the model but "
                        f"{expected.get('dtype')} {expected['shape']} in the manifest; re-export the bundle"
                    )

    def static_batch(self) -> int | None:
        """Return None: :meth:`run` takes any number of rows and invokes the model once per row."""
        return None

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on ``inputs`` (input name -> float array of shape (n, ...)).

        TFLite models exported by anomalyforge have a fixed batch of 1, so the rows are
        scored one at a time. Returns float32 outputs of shape (n, ...) in manifest order.
        """
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InvalidInputError(f"{self.path}: missing model inputs {missing}; the model takes {self.input_names}")
        arrays = [np.asarray(inputs[name], dtype=np.float32) for name in self.input_names]
        n_rows = len(arrays[0])
        if any(len(array) != n_rows for array in arrays):
            raise InvalidInputError(
                f"{self.path}: inputs have different numbers of rows {[len(array) for array in arrays]}"
            )
        batch = int(self.input_details[0]["shape"][0])
        if n_rows % batch:
            raise InvalidInputError(f"{self.path}: {n_rows} rows do not divide into the model batch of {batch}")

        outputs = [[] for _ in self.output_details]
        for start in range(0, n_rows, batch):
            for detail, array in zip(self.input_details, arrays):
                rows = array[start:start + batch].reshape(detail["shape"])
                quantization = tensor_quantization(detail)
                if quantization is not None:
                    rows = quantize(rows, *quantization, detail["dtype"])
                self.interpreter.set_tensor(detail["index"], rows)
            self.interpreter.invoke()
            for collected, detail in zip(outputs, self.output_details):
                value = self.interpreter.get_tensor(detail["index"])
                quantization = tensor_quantization(detail)
                collected.append(value.astype(np.float32) if quantization is None else dequantize(value, *quantization))
        results = []
        for collected, detail in zip(outputs, self.output_details):
            trailing = tuple(int(size) for size in detail["shape"][1:])
            if not collected:
                results.append(np.zeros((0, *trailing), np.float32))
            else:
                results.append(np.concatenate(collected).reshape(n_rows, *trailing))
        return results
