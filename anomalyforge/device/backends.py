"""Inference back-ends for the device: onnxruntime sessions checked against the bundle manifest.

onnxruntime is imported when a backend is created, not when this module is imported, so
the stream reader and the simulator work on a host without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from anomalyforge.errors import BundleError, InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

# Manifest dtype names mapped to the type strings onnxruntime reports for a tensor.
ONNX_TENSOR_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "float64": "tensor(double)",
    "int8": "tensor(int8)",
    "uint8": "tensor(uint8)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
}


def import_onnxruntime():
    """Import and return the onnxruntime module, or raise MissingDependencyError with the fix."""
    try:
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(
            f"onnxruntime is not installed ({error}); the device runtime needs it to run ONNX "
            "models. Install it with: pip install 'anomalyforge[device]'"
        ) from error
    return onnxruntime


def check_tensor(kind: str, expected: dict, actual, source: Path) -> None:
    """Compare one manifest tensor description with the session's and raise BundleError on a mismatch.

    A dimension given as an integer in the manifest must be the same static integer in the
    model. A dimension given as ``None`` (dynamic) must be dynamic in the model too, because
    the device relies on it, for example to score a batch of windows in one call.
    """
    name = expected["name"]
    if actual.name != name:
        raise BundleError(
            f"{source}: {kind} is named {actual.name!r} in the model but {name!r} in the manifest; "
            "re-export the bundle so the manifest describes the model file"
        )
    expected_shape = list(expected["shape"])
    actual_shape = list(actual.shape)
    if len(actual_shape) != len(expected_shape):
        raise BundleError(
            f"{source}: {kind} {name!r} has rank {len(actual_shape)} (shape {actual_shape}) in the "
            f"model but rank {len(expected_shape)} (shape {expected_shape}) in the manifest; "
            "re-export the bundle"
        )
    for axis, (want, have) in enumerate(zip(expected_shape, actual_shape)):
        model_is_static = isinstance(have, int)
        if want is None and model_is_static:
            raise BundleError(
                f"{source}: {kind} {name!r} axis {axis} is fixed to {have} in the model but dynamic "
                "in the manifest; re-export the bundle with a dynamic axis or fix the manifest"
            )
        if want is not None and (not model_is_static or have != want):
            raise BundleError(
                f"{source}: {kind} {name!r} axis {axis} is {have!r} in the model but {want} in the "
                "manifest; re-export the bundle"
            )
    expected_type = ONNX_TENSOR_TYPES.get(expected.get("dtype", "float32"))
    if expected_type is not None and actual.type != expected_type:
        raise BundleError(
            f"{source}: {kind} {name!r} has type {actual.type} in the model but dtype "
            f"{expected.get('dtype')!r} in the manifest; re-export the bundle"
        )


class OnnxRuntimeBackend:
    """One onnxruntime session for one model file, verified against its manifest file entry.

    Parameters
    ----------
    path : str or Path
        The ONNX file.
    entry : dict
        The manifest file entry with ``inputs`` and ``outputs`` lists of
        ``{"name", "shape", "dtype"}`` (``None`` marks a dynamic dimension).
    threads : int, default=1
        onnxruntime intra-op threads. One thread gives the lowest latency for single
        windows on small models and leaves the other cores to the serial reader.

    Raises
    ------
    MissingDependencyError
        If onnxruntime is not installed.
    BundleError
        If the file cannot be loaded, or its input / output names, ranks, static dimensions
        or types differ from the manifest entry.
    """

    def __init__(self, path, entry: dict, threads: int = 1):
        if threads < 1:
            raise InvalidInputError(f"threads must be at least 1, got {threads}")
        onnxruntime = import_onnxruntime()
        self.path = Path(path)
        self.entry = entry

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph types
            raise BundleError(
                f"onnxruntime failed to load {self.path} ({type(error).__name__}: {error}); "
                "the file may need a newer onnxruntime or a re-export"
            ) from error

        self.verify_signature()
        self.input_names = [tensor["name"] for tensor in entry["inputs"]]
        self.output_names = [tensor["name"] for tensor in entry["outputs"]]
        logger.info("loaded %s with onnxruntime %s (%d thread(s))", self.path, onnxruntime.__version__, threads)

    def verify_signature(self) -> None:
        """Check the session's inputs and outputs against the manifest entry."""
        for kind, expected_list, actual_list in (
            ("input", self.entry["inputs"], self.session.get_inputs()),
            ("output", self.entry["outputs"], self.session.get_outputs()),
        ):
            if len(actual_list) != len(expected_list):
                raise BundleError(
                    f"{self.path}: the model has {len(actual_list)} {kind}s "
                    f"{[tensor.name for tensor in actual_list]} but the manifest lists "
                    f"{len(expected_list)} {[tensor['name'] for tensor in expected_list]}; "
                    "re-export the bundle"
                )
            for expected, actual in zip(expected_list, actual_list):
                check_tensor(kind, expected, actual, self.path)

    def static_batch(self) -> int | None:
        """Return the fixed batch size of the first input, or None when the batch axis is dynamic."""
        shape = self.entry["inputs"][0]["shape"]
        if shape and isinstance(shape[0], int):
            return shape[0]
        return None

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on ``inputs`` (input name -> array) and return the outputs in manifest order."""
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InvalidInputError(
                f"{self.path}: missing model inputs {missing}; the model takes {self.input_names}"
            )
        return self.session.run(self.output_names, {name: inputs[name] for name in self.input_names})
