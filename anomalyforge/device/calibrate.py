"""Recalibrate a detector's threshold on the device from local normal windows.

The threshold comes from normal windows recorded on the device (the conformal rule in
:mod:`anomalyforge.thresholds`). The bundle's decoder then generates anomalies on the
device with onnxruntime, and the share of them the new threshold flags is reported and
stored with the threshold as a sanity check of the detector on this hardware.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import numpy as np

from anomalyforge.bundle import Bundle, load_bundle, set_threshold
from anomalyforge.device.detector import DeviceDetector, format_key, make_backend, resolve_backend
from anomalyforge.errors import BundleError, InvalidInputError
from anomalyforge.signal import check_windows, resample_beat
from anomalyforge.thresholds import calibrate_threshold, min_normals_for

logger = logging.getLogger(__name__)

GENERATION_BATCH = 256


def find_decoder(bundle: Bundle) -> tuple[str, dict]:
    """Return (name, model record) of the bundle's decoder, or raise BundleError."""
    decoders = [(name, model) for name, model in bundle.manifest["models"].items() if model.get("role") == "decoder"]
    if not decoders:
        raise BundleError(
            f"bundle {bundle.source} has no decoder, so no anomalies can be generated on the "
            "device; pass --generated 0 to calibrate from normal windows alone"
        )
    return decoders[0]


def generate_anomalies(bundle: Bundle, n_generated: int, seed: int, precision: str = "fp32",
                       threads: int = 1, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generate anomalous beats with the bundle's decoder through onnxruntime or LiteRT.

    Latent vectors are drawn from N(0, 1) with ``numpy.random.default_rng(seed)``, and the
    conditions cycle through the decoder's classes, so each class gets ``n_generated //
    n_classes`` beats and the first ``n_generated % n_classes`` classes one more. ``backend`` ("onnxruntime",
    "litert" or None for the first installed one with a decoder file) runs the decoder.

    Returns
    -------
    beats : ndarray of shape (n_generated, window_length), float32
        Raw decoder output, before preprocessing.
    labels : ndarray of shape (n_generated,)
        The class label each beat was conditioned on.
    """
    name, model = find_decoder(bundle)
    classes = list(model.get("classes") or [])
    latent_dim = model.get("latent_dim")
    if not classes or not isinstance(latent_dim, int) or latent_dim < 1:
        raise BundleError(
            f"decoder {name!r} in {bundle.source} needs a non-empty 'classes' list and a positive "
            f"'latent_dim' in the manifest (got classes={classes!r}, latent_dim={latent_dim!r}); re-export the bundle"
        )
    formats = model.get("formats", {})
    if not formats:
        raise BundleError(f"decoder {name!r} in {bundle.source} lists no model files")
    backend_name = resolve_backend(formats, backend, bundle.source)
    key = format_key(precision, backend_name)
    if key not in formats:
        prefix = key.split("-")[0] + "-"
        candidates = sorted(candidate for candidate in formats if candidate.startswith(prefix))
        if not candidates:
            raise BundleError(
                f"decoder {name!r} in {bundle.source} has no file for the {backend_name} backend "
                f"(files: {sorted(formats)}); choose the other backend or re-export the bundle"
            )
        logger.warning("decoder %s has no %s file, so %s is used", name, key, candidates[0])
        key = candidates[0]
    entry = formats[key]
    backend = make_backend(backend_name, bundle.path_of(entry), entry, threads=threads)
    window_length = int(bundle.task["window_length"])

    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_generated, latent_dim)).astype(np.float32)
    class_index = np.arange(n_generated) % len(classes)
    conditions = np.eye(len(classes), dtype=np.float32)[class_index]

    step = backend.static_batch() or GENERATION_BATCH
    parts = []
    for start in range(0, n_generated, step):
        z_part, condition_part = z[start:start + step], conditions[start:start + step]
        n_part = len(z_part)
        if backend.static_batch() is not None and n_part < step:
            z_part = np.concatenate([z_part, np.zeros((step - n_part, latent_dim), np.float32)])
            condition_part = np.concatenate([condition_part, np.repeat(condition_part[:1], step - n_part, 0)])
        beat = backend.run({"z": z_part, "condition": condition_part})[0]
        parts.append(np.asarray(beat, dtype=np.float32).reshape(len(z_part), -1)[:n_part])
    beats = np.concatenate(parts) if parts else np.zeros((0, window_length), np.float32)
    if beats.shape[1] != window_length:
        raise BundleError(
            f"decoder {name!r} returns beats of {beats.shape[1]} samples but the task window "
            f"length is {window_length}; re-export the bundle"
        )
    labels = np.asarray(classes)[class_index]
    return beats, labels


def detection_rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, dict]:
    """Return the overall share of scores above ``threshold`` and the share per label."""
    flagged = scores > threshold
    per_class = {str(label): float(np.mean(flagged[labels == label])) for label in np.unique(labels)}
    return float(np.mean(flagged)), per_class


def fit_length(windows, window_length: int) -> np.ndarray:
    """Return windows of ``window_length`` samples, resampling rows of another length."""
    array = check_windows(windows, name="normal windows")
    if array.shape[1] == window_length:
        return array
    logger.info("resampling %d normal windows from %d to %d samples", len(array), array.shape[1], window_length)
    return np.stack([resample_beat(row, window_length) for row in array])


def calibrate_bundle(bundle_dir, normal_windows, detector: str | None = None, precision: str = "int8",
                     n_generated: int = 1000, target_fpr: float = 0.01, seed: int = 0,
                     input_description: str = "normal windows passed by the caller",
                     decoder_precision: str = "fp32", threads: int = 1, backend: str | None = None) -> dict:
    """Set a detector's threshold from normal windows recorded on the device and write it.

    Steps: score the normal windows, generate ``n_generated`` anomalies with the bundle's
    decoder and score them with the same preprocessing, set the threshold with
    :func:`anomalyforge.thresholds.calibrate_threshold` (``source="device"``), and store
    it with :func:`anomalyforge.bundle.set_threshold`, which keeps the previous threshold
    in the detector's ``threshold_history``.

    Parameters
    ----------
    bundle_dir : str or Path
        Bundle directory. A zip cannot be written, so unpack it first.
    normal_windows : array_like of shape (n_normals, length)
        Normal windows recorded on the device, before preprocessing. Rows of another
        length than the task's are resampled to it.
    detector : str, optional
        Detector name. Default is the manifest's ``default_detector``.
    precision : {"int8", "fp32"}, default="int8"
        Detector file scored here. The threshold fits the scores of this precision.
    n_generated : int, default=1000
        Anomalies generated with the decoder. 0 skips generation.
    target_fpr : float in (0, 1), default=0.01
        False-positive rate the threshold must not exceed in expectation. It needs at
        least ``ceil(1 / target_fpr - 1)`` normal windows (99 for 0.01).
    seed : int, default=0
        Seed of the latent vectors.
    input_description : str
        Where the normal windows came from (port or file), recorded in the manifest.
    decoder_precision : {"fp32", "int8"}, default="fp32"
        Decoder file used for generation.
    threads : int, default=1
        Intra-op threads of the runtime.
    backend : {"onnxruntime", "litert"} or None, default=None
        Runtime for the detector and the decoder. None picks the first installed one with
        a file for the detector; the decoder then uses the same runtime.

    Returns
    -------
    dict
        ``detector``, ``precision``, ``threshold`` (the new record), ``previous_threshold``,
        ``n_normals``, ``n_generated``, ``detection_rate``, ``detection_rate_per_class``
        and ``normal_score_quantiles``.

    Raises
    ------
    InvalidInputError
        If there are too few normal windows for ``target_fpr`` (the message gives the
        number needed) or a window contains NaN / inf.
    BundleError
        If the bundle is a zip, fails verification, or has no decoder while
        ``n_generated`` > 0.
    """
    bundle = load_bundle(bundle_dir)
    if bundle.temporary is not None:
        raise BundleError(
            f"{bundle_dir} is a zip file; unpack it into a directory and calibrate that, because "
            "the new threshold is written into the manifest"
        )
    if not 0.0 < target_fpr < 1.0:
        raise InvalidInputError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    if n_generated < 0:
        raise InvalidInputError(f"n_generated must be 0 or more, got {n_generated}")
    scorer = DeviceDetector.from_bundle(bundle, name=detector, precision=precision, threads=threads,
                                        warn_on_threshold_mismatch=False, backend=backend)

    # 1. Score the local normal windows.
    normals = fit_length(normal_windows, scorer.window_length)
    needed = min_normals_for(target_fpr)
    if len(normals) < needed:
        raise InvalidInputError(
            f"{len(normals)} normal windows are too few for a target false-positive rate of "
            f"{target_fpr}: at least {needed} are needed. Record at least {needed} normal windows "
            f"(--windows {needed} with --port, or a longer --input file) or raise --target-fpr"
        )
    normal_scores = scorer.score(normals)

    # 2. Generate anomalies with the decoder on this device and score them the same way.
    if n_generated > 0:
        beats, labels = generate_anomalies(bundle, n_generated, seed, decoder_precision, threads,
                                           backend=scorer.backend_name)
        generated_scores = scorer.score(beats)
    else:
        labels = np.zeros(0)
        generated_scores = np.zeros(0, dtype=np.float32)

    # 3. Set the threshold from the normal scores alone.
    threshold = calibrate_threshold(normal_scores, target_fpr, source="device")
    if n_generated > 0:
        detection_rate, per_class = detection_rates(generated_scores, labels, threshold.value)
    else:
        detection_rate, per_class = None, {}

    # 4. Write it into the manifest with where and how it was set.
    record = threshold.to_dict()
    record["calibration"] = {
        "input": input_description,
        "precision": precision,
        "backend": scorer.backend_name,
        "n_normals": int(len(normals)),
        "n_generated": int(n_generated),
        "seed": int(seed),
        "generated_detection_rate": detection_rate,
        "generated_detection_rate_per_class": per_class,
        "set_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    previous = scorer.threshold_info
    set_threshold(bundle.root, scorer.name, record)
    logger.info(
        "threshold of %s set to %.6g from %d normals (previous %s); generated anomalies detected: %s",
        scorer.name, threshold.value, len(normals),
        None if previous is None else previous.get("value"), detection_rate,
    )
    return {
        "bundle": str(bundle.root),
        "detector": scorer.name,
        "precision": precision,
        "threshold": record,
        "previous_threshold": previous,
        "n_normals": int(len(normals)),
        "n_generated": int(n_generated),
        "detection_rate": detection_rate,
        "detection_rate_per_class": per_class,
        "normal_score_quantiles": {
            str(q): float(np.quantile(normal_scores, q)) for q in (0.5, 0.9, 0.99)
        },
    }
