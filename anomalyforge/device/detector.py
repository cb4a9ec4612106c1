"""Score windows on the device with a bundle's detector (numpy plus onnxruntime or a TFLite runtime)."""

from __future__ import annotations

import logging

import numpy as np

from anomalyforge.bundle import Bundle, load_bundle
from anomalyforge.device.backends import OnnxRuntimeBackend
from anomalyforge.errors import BundleError, InvalidInputError, MissingDependencyError
from anomalyforge.signal import apply_preprocessing, check_windows

logger = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp32")
# Device runtimes and the prefix of the manifest format keys each one runs.
BACKENDS = ("onnxruntime", "litert")
BACKEND_FORMAT_PREFIXES = {"onnxruntime": "onnx", "litert": "tflite"}


def format_key(precision: str, backend: str = "onnxruntime") -> str:
    """Return the manifest format key for ``precision`` on ``backend`` (``onnx-int8``, ``tflite-fp32``, ...)."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return f"{BACKEND_FORMAT_PREFIXES[backend]}-{precision}"


def backend_available(backend: str) -> bool:
    """Return True if the runtime of ``backend`` can be imported on this host."""
    try:
        if backend == "onnxruntime":
            from anomalyforge.device.backends import import_onnxruntime

            import_onnxruntime()
        else:
            from anomalyforge.device.tflite_backend import import_tflite_interpreter

            import_tflite_interpreter()
    except MissingDependencyError:
        return False
    return True


def resolve_backend(formats: dict, backend: str | None, source) -> str:
    """Return ``backend``, or the first of BACKENDS that is installed and has a file in ``formats``.

    Raises
    ------
    BundleError
        If ``backend`` is None and no installed runtime has a file in ``formats``.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        return backend
    present = [name for name in BACKENDS
               if any(key.startswith(BACKEND_FORMAT_PREFIXES[name] + "-") for key in formats)]
    for name in present:
        if backend_available(name):
            return name
    raise BundleError(
        f"no installed runtime can run the model files {sorted(formats)} of {source}; install "
        "onnxruntime for onnx-* files (pip install 'anomalyforge[device]') or ai-edge-litert for "
        "tflite-* files (pip install 'anomalyforge[tflite]')"
    )


def make_backend(backend: str, path, entry: dict, threads: int = 1):
    """Create the inference backend (OnnxRuntimeBackend or TFLiteBackend) for one model file."""
    if backend == "litert":
        from anomalyforge.device.tflite_backend import TFLiteBackend

        return TFLiteBackend(path, entry, threads=threads)
    return OnnxRuntimeBackend(path, entry, threads=threads)


def threshold_precision(threshold: dict | None) -> str | None:
    """Return the precision ("fp32" or "int8") whose scores set ``threshold``, if recorded."""
    if not threshold:
        return None
    calibration = threshold.get("calibration") or {}
    return threshold.get("precision") or calibration.get("precision")


def resolve_detector_name(bundle: Bundle, name: str | None) -> str:
    """Return ``name``, or the bundle's default detector (the only one if there is no default)."""
    if name is not None:
        return name
    default = bundle.manifest.get("default_detector")
    if default:
        return default
    detectors = bundle.detectors()
    if len(detectors) == 1:
        return detectors[0]
    raise BundleError(
        f"bundle {bundle.source} sets no default detector and has {len(detectors)} detectors "
        f"{detectors}; choose one with --detector NAME"
    )


def as_bundle(bundle) -> Bundle:
    """Return ``bundle`` if it is a loaded Bundle, else load (and verify) the path it names."""
    if isinstance(bundle, Bundle):
        return bundle
    return load_bundle(bundle)


class DeviceDetector:
    """A bundle detector ready to score windows: manifest preprocessing, then onnxruntime.

    Build it with :meth:`from_bundle`.

    Attributes
    ----------
    name : str
        Detector name in the manifest.
    precision : {"int8", "fp32"}
        Which model file is loaded.
    backend_name : {"onnxruntime", "litert"}
        The runtime that runs it.
    window_length : int
        Samples per window the model takes (``task.window_length``).
    threshold : float or None
        The manifest threshold value: a window is anomalous when its score is above it.
        None when the bundle has no threshold for this detector yet.
    threshold_info : dict or None
        The whole manifest threshold record (target rate, source, ...).
    preprocessing : list of dict
        The manifest preprocessing steps applied to every window before the model.
    """

    def __init__(self, bundle: Bundle, name: str, precision: str, backend, backend_name: str = "onnxruntime"):
        self.bundle = bundle
        self.backend_name = backend_name
        self.name = name
        self.precision = precision
        self.backend = backend
        self.window_length = int(bundle.task["window_length"])
        self.preprocessing = list(bundle.manifest.get("preprocessing", []))
        self.threshold_info = bundle.model(name).get("threshold")
        self.threshold = None if self.threshold_info is None else float(self.threshold_info["value"])
        self.input_name = backend.input_names[0]
        self.batch_size = backend.static_batch()

    @classmethod
    def from_bundle(cls, bundle, name: str | None = None, precision: str | None = None,
                    threads: int = 1, warn_on_threshold_mismatch: bool = True,
                    backend: str | None = None) -> DeviceDetector:
        """Load a detector from a bundle.

        Parameters
        ----------
        bundle : Bundle or str or Path
            A loaded bundle, or the path of a bundle directory or zip (loaded and verified here).
        name : str, optional
            Detector name. Default is the manifest's ``default_detector``.
        precision : {"int8", "fp32"} or None, default=None
            Which model file to run. None picks the precision whose scores set the current
            threshold (see :func:`threshold_precision`), so score and threshold share a scale.
        threads : int, default=1
            onnxruntime intra-op threads.
        warn_on_threshold_mismatch : bool, default=True
            Log a warning when ``precision`` differs from the precision of the threshold's
            scores. Calibration turns it off because it is about to replace the threshold.
        backend : {"onnxruntime", "litert"} or None, default=None
            Runtime: onnxruntime runs the ``onnx-*`` files, LiteRT (ai-edge-litert, or
            tflite-runtime) the ``tflite-*`` files. None picks the first of these two that
            is installed and has a file for this detector.

        Raises
        ------
        BundleError
            If the model is not a detector, has no file for ``precision``, or its file does
            not match the manifest.
        """
        bundle = as_bundle(bundle)
        name = resolve_detector_name(bundle, name)
        model = bundle.model(name)
        if model.get("role") != "detector":
            raise BundleError(
                f"model {name!r} in {bundle.source} has role {model.get('role')!r}, not 'detector'; "
                f"detectors in this bundle: {bundle.detectors()}"
            )
        calibrated = threshold_precision(model.get("threshold"))
        if precision is None:
            precision = calibrated if calibrated in PRECISIONS else "int8"
        elif warn_on_threshold_mismatch and calibrated is not None and precision != calibrated:
            logger.warning(
                "detector %s runs in %s but its threshold was set on %s scores, so the false-positive "
                "rate may differ from the target; run 'anomalyforge device calibrate --precision %s' "
                "to set a threshold for this precision", name, precision, calibrated, precision,
            )
        backend_name = resolve_backend(model.get("formats", {}), backend, bundle.source)
        entry = bundle.file_entry(name, format_key(precision, backend_name))
        runtime = make_backend(backend_name, bundle.path_of(entry), entry, threads=threads)
        detector = cls(bundle, name, precision, runtime, backend_name)
        logger.info(
            "detector %s (%s, %s) ready: window_length=%d, threshold=%s",
            name, precision, backend_name, detector.window_length, detector.threshold,
        )
        return detector

    def preprocess(self, windows) -> np.ndarray:
        """Check ``windows`` and apply the manifest preprocessing, giving model input (n, window_length)."""
        array = check_windows(windows, self.window_length)
        return apply_preprocessing(self.preprocessing, array)

    def score(self, windows) -> np.ndarray:
        """Score windows. A higher score means more anomalous.

        Parameters
        ----------
        windows : array_like of shape (n_windows, window_length) or (window_length,)
            Raw windows, before preprocessing.

        Returns
        -------
        ndarray of shape (n_windows,), float32

        Raises
        ------
        InvalidInputError
            If the windows have the wrong length or contain NaN or inf.
        """
        features = self.preprocess(windows)
        if self.batch_size is None:
            return self.run_model(features)
        parts = [
            self.run_model(features[start:start + self.batch_size])
            for start in range(0, len(features), self.batch_size)
        ]
        return np.concatenate(parts)

    def run_model(self, features: np.ndarray) -> np.ndarray:
        if self.batch_size is not None and len(features) < self.batch_size:
            padding = np.zeros((self.batch_size - len(features), features.shape[1]), dtype=np.float32)
            scores = self.backend.run({self.input_name: np.concatenate([features, padding])})[0]
            return np.asarray(scores, dtype=np.float32).reshape(-1)[: len(features)]
        scores = self.backend.run({self.input_name: features})[0]
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    def is_anomaly(self, scores) -> np.ndarray:
        """Return a boolean array: True where a score is above the threshold."""
        if self.threshold is None:
            raise BundleError(
                f"detector {self.name!r} in {self.bundle.source} has no threshold; set one with "
                "'anomalyforge device calibrate'"
            )
        return np.asarray(scores) > self.threshold
