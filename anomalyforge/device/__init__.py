"""Device runtime: score bundle windows from a serial port and calibrate thresholds on the device.

Depends on numpy, onnxruntime (or ai-edge-litert / tflite-runtime for .tflite files) and
pyserial only, plus the numpy-only shared modules :mod:`anomalyforge.signal`,
:mod:`anomalyforge.thresholds` and :mod:`anomalyforge.bundle`. Nothing here imports torch,
TensorFlow or scikit-learn. The runtimes and pyserial are imported when first needed, so a
missing one is reported with the install command.
"""

from anomalyforge.device.backends import MissingDependencyError, OnnxRuntimeBackend
from anomalyforge.device.calibrate import calibrate_bundle
from anomalyforge.device.detector import DeviceDetector
from anomalyforge.device.stream import StreamSummary, collect_windows, read_windows_file, stream_port

__all__ = [
    "DeviceDetector",
    "MissingDependencyError",
    "OnnxRuntimeBackend",
    "StreamSummary",
    "calibrate_bundle",
    "collect_windows",
    "read_windows_file",
    "stream_port",
]
