"""anomalyforge: few-shot anomaly detection for edge devices.

Subpackages:

- ``anomalyforge.training``: generators, detectors and evaluation (PyTorch, scikit-learn).
- ``anomalyforge.export``: ONNX fp32 / int8 export, parity checks, bundle writing.
- ``anomalyforge.device``: bundle loading, serial streaming and calibration (numpy,
  onnxruntime and pyserial only).
- ``anomalyforge.firmware_bridge``: serial framing between firmware and host, and a
  simulated serial device.

``anomalyforge.signal``, ``anomalyforge.thresholds`` and ``anomalyforge.bundle`` depend on
numpy alone and are shared by the training and device sides.
"""

__version__ = "0.1.0"
