"""Microcontroller target: C sources of an int8 ``.tflite`` model and its TFLite Micro arena size.

:func:`build_mcu_target` writes ``model_data.h`` / ``model_data.cc`` (the flatbuffer as a
``const`` 16-byte aligned array and its length, the I/O quantization parameters and the
tensor arena size) and ``model_ops.h`` (a function that registers exactly the model's ops
on a ``tflite::MicroMutableOpResolver<N>``). The arena size is measured by running the
model in the TFLite Micro host interpreter (PyPI ``tflite-micro``). A too-small arena can
crash that interpreter (segfault) instead of raising, so every probe runs in a child process.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from anomalyforge.errors import ExportError, MissingDependencyError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'anomalyforge[tflite-export]' (installs tflite-micro; x86_64 Linux wheels only)"
ARENA_ALIGNMENT = 16
MAX_ARENA_BYTES = 64 * 1024 * 1024
PROBE_TIMEOUT_S = 60

# Builtin op name -> MicroMutableOpResolver method, where camel-casing the name gives the
# wrong method name. Other ops map by camel case (CONV_2D -> AddConv2D, MEAN -> AddMean).
RESOLVER_METHODS = {
    "GATHER_ND": "AddGatherNd",
    "BATCH_MATMUL": "AddBatchMatMul",
    "L2_NORMALIZATION": "AddL2Normalization",
}

# One probe: load the model with the given arena, feed zeros and invoke once. Exit code 0
# means the arena was large enough.
PROBE_SCRIPT = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
interpreter = runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2]))
for index in range(int(sys.argv[3])):
    detail = interpreter.get_input_details(index)
    interpreter.set_input(np.zeros(detail["shape"], dtype=detail["dtype"]), index)
interpreter.invoke()
"""


def import_tflm_runtime():
    """Import and return ``tflite_micro.python.tflite_micro.runtime``, or raise MissingDependencyError."""
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as error:
        raise MissingDependencyError(f"tflite-micro is not installed ({error}); install it with {INSTALL_HINT}") from error
    return runtime


def arena_fits(path, arena_bytes: int, n_inputs: int) -> bool:
    """Return True if the model runs in TFLite Micro with an arena of ``arena_bytes`` (child process)."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", PROBE_SCRIPT, str(path), str(arena_bytes), str(n_inputs)],
            capture_output=True, timeout=PROBE_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        logger.warning("TFLite Micro probe of %s with %d bytes timed out after %d s", path, arena_bytes,
                       PROBE_TIMEOUT_S)
        return False
    logger.debug("arena probe %s %d bytes: exit code %d", path, arena_bytes, result.returncode)
    return result.returncode == 0


def measure_arena(path, n_inputs: int) -> int:
    """Return the smallest arena size (a multiple of 16 bytes) with which the model runs in TFLite Micro.

    The size is doubled from 4 KiB until a probe passes, then bisected in 16-byte steps.

    NOTE: the bisection assumes that a larger arena never fails where a smaller one
    passed; :func:`build_mcu_target` re-runs the result and 90 % of it to check.

    Raises
    ------
    ExportError
        If the model does not run even with a 64 MiB arena.
    """
    import_tflm_runtime()
    upper = 4096
    while not arena_fits(path, upper, n_inputs):
        upper *= 2
        if upper > MAX_ARENA_BYTES:
            raise ExportError(
                f"{path} does not run in TFLite Micro even with a {MAX_ARENA_BYTES}-byte arena; run it "
                "with tflite_micro.runtime.Interpreter to see the error (an unsupported op, for example)"
            )
    lower = 0  # a size that fails, in units of ARENA_ALIGNMENT
    upper_units = upper // ARENA_ALIGNMENT
    while upper_units - lower > 1:
        middle = (lower + upper_units) // 2
        if arena_fits(path, middle * ARENA_ALIGNMENT, n_inputs):
            upper_units = middle
        else:
            lower = middle
    return upper_units * ARENA_ALIGNMENT


def run_tflm(path, inputs: list[np.ndarray], arena_bytes: int) -> list[np.ndarray]:
    """Run a ``.tflite`` file in the TFLite Micro host interpreter, one row at a time.

    Parameters
    ----------
    path : str or os.PathLike
        The model, batch 1.
    inputs : list of ndarray
        One array of shape (n, ...) per model input, in model order, already in the input
        dtype (quantized for int8 inputs).
    arena_bytes : int
        Tensor arena size; use a size :func:`measure_arena` validated.

    Returns
    -------
    list of ndarray
        Raw outputs (not dequantized), each of shape (n, ...).
    """
    runtime = import_tflm_runtime()
    interpreter = runtime.Interpreter.from_file(str(path), arena_size=int(arena_bytes))
    n_rows = len(inputs[0])
    n_outputs = len(tflm_outputs(interpreter))
    collected = [[] for _ in range(n_outputs)]
    for row in range(n_rows):
        for index, array in enumerate(inputs):
            detail = interpreter.get_input_details(index)
            interpreter.set_input(np.ascontiguousarray(array[row:row + 1]).reshape(detail["shape"]), index)
        interpreter.invoke()
        for index in range(n_outputs):
            collected[index].append(np.array(interpreter.get_output(index)))
    return [np.concatenate(parts) for parts in collected]


def tflm_outputs(interpreter) -> list[dict]:
    """Return the output details of a TFLite Micro interpreter (it has no output count getter)."""
    details = []
    while True:
        try:
            details.append(interpreter.get_output_details(len(details)))
        except (RuntimeError, IndexError, ValueError):
            return details
        if len(details) > 64:
            return details


def resolver_method(op_name: str) -> str:
    """Return the ``MicroMutableOpResolver`` method that registers builtin op ``op_name``."""
    if op_name in RESOLVER_METHODS:
        return RESOLVER_METHODS[op_name]
    return "Add" + "".join(part.capitalize() if not part[0].isdigit() else part.upper()
                           for part in op_name.split("_"))


def c_identifier(name: str) -> str:
    """Return ``name`` with every character that is not valid in a C identifier replaced by '_'."""
    identifier = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return identifier if not identifier[0].isdigit() else "_" + identifier


def io_lines(prefix: str, records: list[dict]) -> list[str]:
    """Return C constants for the scale and zero point of each quantized tensor in ``records``."""
    lines = []
    for record in records:
        stem = f"{prefix}_{c_identifier(record['name'])}"
        lines.append(f"// {record['name']}: {record['dtype']} {record['shape']}")
        if record.get("scale") is not None:
            lines.append(f"constexpr float {stem}_scale = {record['scale']!r}f;")
            lines.append(f"constexpr int {stem}_zero_point = {int(record['zero_point'])};")
    return lines


def write_c_sources(model_path, out_dir, name: str, record: dict) -> list[Path]:
    """Write ``model_data.h``, ``model_data.cc`` and ``model_ops.h`` for one model into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = Path(model_path).read_bytes()
    symbol = c_identifier(name)
    ops = record["ops"]

    header = [
        f"// Model {name!r}: {Path(model_path).name}, generated by anomalyforge export --target mcu.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "",
        f"extern const unsigned char {symbol}_model_data[];",
        f"extern const unsigned int {symbol}_model_data_len;",
        "",
        "// Smallest tensor arena with which the TFLite Micro host interpreter (x86_64) ran this",
        "// model. Measured on a 64-bit host: a 32-bit build has smaller pointers and is expected,",
        "// not measured, to need the same or less. Declare the arena alignas(16).",
        f"constexpr std::size_t {symbol}_tensor_arena_size = {record['ram_arena_bytes']};",
        "",
        *io_lines(f"{symbol}_input", record["inputs"]),
        *io_lines(f"{symbol}_output", record["outputs"]),
        "",
    ]
    rows = [", ".join(f"0x{byte:02x}" for byte in data[start:start + 12]) for start in range(0, len(data), 12)]
    source = [
        '#include "model_data.h"',
        "",
        f"alignas(16) const unsigned char {symbol}_model_data[] = {{",
        *(f"    {row}," for row in rows),
        "};",
        f"const unsigned int {symbol}_model_data_len = {len(data)};",
        "",
    ]
    ops_header = [
        f"// Ops of model {name!r}: register exactly these on the resolver.",
        "#pragma once",
        "",
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"',
        "",
        f"constexpr int {symbol}_op_count = {len(ops)};",
        "",
        f"inline TfLiteStatus {symbol}_register_ops(tflite::MicroMutableOpResolver<{symbol}_op_count>& resolver) {{",
        *(f"  if (resolver.{resolver_method(op)}() != kTfLiteOk) return kTfLiteError;  // {op}" for op in ops),
        "  return kTfLiteOk;",
        "}",
        "",
    ]
    paths = []
    for file_name, lines in (("model_data.h", header), ("model_data.cc", source), ("model_ops.h", ops_header)):
        path = out_dir / file_name
        path.write_text("\n".join(lines), encoding="utf-8")
        paths.append(path)
    return paths


def build_mcu_target(model_path, out_dir, name: str, entry: dict) -> dict:
    """Measure the TFLite Micro arena of an int8 ``.tflite`` file and write its C sources.

    Parameters
    ----------
    model_path : str or os.PathLike
        The ``tflite-int8`` file.
    out_dir : str or os.PathLike
        Directory for ``model_data.h``, ``model_data.cc`` and ``model_ops.h``.
    name : str
        Model name; it prefixes the C symbols (``<name>_model_data``, ...).
    entry : dict
        The manifest file entry (``inputs``, ``outputs`` with scale and zero point, ``ops``).

    Returns
    -------
    dict
        The manifest ``mcu`` record: ``flash_model_bytes`` (the array in flash),
        ``ram_arena_bytes`` (the measured arena), whether 90 % of it fails, the op list and
        resolver size, I/O quantization, the files written and the interpreter used.
    """
    from importlib.metadata import version

    model_path = Path(model_path)
    n_inputs = len(entry["inputs"])
    logger.info("measuring the TFLite Micro arena of %s", model_path)
    arena = measure_arena(model_path, n_inputs)
    smaller = (int(arena * 0.9) // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
    record = {
        "interpreter": f"tflite-micro {version('tflite-micro')} host build (x86_64)",
        "flash_model_bytes": model_path.stat().st_size,
        "ram_arena_bytes": arena,
        "arena_verified": arena_fits(model_path, arena, n_inputs),
        "arena_90_percent_bytes": smaller,
        "arena_90_percent_fails": not arena_fits(model_path, smaller, n_inputs),
        "ops": list(entry["ops"]),
        "op_resolver_size": len(entry["ops"]),
        "inputs": entry["inputs"],
        "outputs": entry["outputs"],
    }
    files = write_c_sources(model_path, out_dir, name, record)
    record["files"] = [path.name for path in files]
    logger.info("model %s: flash %d bytes, arena %d bytes, ops %s", name, record["flash_model_bytes"], arena,
                record["ops"])
    return record
