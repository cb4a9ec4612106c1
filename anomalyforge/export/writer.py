"""Bundle writer: exports trained modules into a bundle directory and writes its manifest.

:class:`BundleWriter` is the only place that decides the file names inside a bundle
(``<name>.fp32.onnx`` and ``<name>.int8.onnx``) and the manifest records that describe
them. The manifest layout itself is defined in :mod:`anomalyforge.bundle`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from anomalyforge import bundle
from anomalyforge.errors import BundleError, InvalidInputError
from anomalyforge.export.onnx_export import (
    export_onnx,
    onnx_io,
    parity,
    quantization_settings,
    quantize_onnx_int8,
)
from anomalyforge.signal import check_windows

logger = logging.getLogger(__name__)

# Format keys of the manifest and the file-name suffix of each.
FORMAT_SUFFIXES = {
    "onnx-fp32": ".fp32.onnx", "onnx-int8": ".int8.onnx",
    "tflite-fp32": ".fp32.tflite", "tflite-int8": ".int8.tflite",
}
FORMAT_PRECISIONS = {"onnx-fp32": "float32", "onnx-int8": "int8", "tflite-fp32": "float32", "tflite-int8": "int8"}
ONNX_FORMATS = ("onnx-fp32", "onnx-int8")
TFLITE_FORMATS = ("tflite-fp32", "tflite-int8")

DETECTOR_INPUTS = ("window",)
DETECTOR_OUTPUTS = ("score",)
DECODER_INPUTS = ("z", "condition")
DECODER_OUTPUTS = ("beat",)

# Model names become file names, so they are restricted to characters that are safe on
# every file system and in zip archives.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# Rows of real input passed to the exporter as example inputs. Two rows, so the traced
# batch dimension is not specialised to 1.
EXAMPLE_ROWS = 2


class BundleWriter:
    """Writer of one bundle directory: model files plus ``manifest.json``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Bundle directory. It is created if missing and must be empty otherwise, so files
        of an older bundle never end up next to a new manifest.
    task : dict
        Manifest ``task`` record. ``task["window_length"]`` (int >= 2) is required: it is
        the detector input length.
    preprocessing : list of dict
        Manifest ``preprocessing`` record, normally
        :func:`anomalyforge.signal.preprocessing_spec`.
    formats : sequence of str, default=("onnx-fp32", "onnx-int8")
        Format keys written for every model: any of ``onnx-fp32``, ``onnx-int8``,
        ``tflite-fp32`` and ``tflite-int8``. The TFLite formats need the ``tflite-export``
        extra (litert-torch) and have a fixed batch of 1.

    Notes
    -----
    Call :meth:`add_detector` and :meth:`add_decoder` for each model, then
    :meth:`finish`. Until :meth:`finish` the directory contains no ``manifest.json`` and
    is not a loadable bundle.
    """

    def __init__(self, out_dir, task: dict, preprocessing: list[dict], formats=ONNX_FORMATS):
        self.out_dir = Path(out_dir)
        formats = tuple(formats)
        unknown = [key for key in formats if key not in FORMAT_SUFFIXES]
        if not formats or unknown or len(set(formats)) != len(formats):
            raise InvalidInputError(
                f"formats must be distinct keys among {list(FORMAT_SUFFIXES)}, got {list(formats)}"
            )
        self.formats = formats
        if not isinstance(task, dict):
            raise InvalidInputError(f"task must be a dict, got {type(task).__name__}")
        window_length = task.get("window_length")
        if not isinstance(window_length, int) or isinstance(window_length, bool) or window_length < 2:
            raise InvalidInputError(
                f"task['window_length'] must be an integer >= 2, got {window_length!r}; "
                "set it to the number of samples per model input window"
            )
        if not isinstance(preprocessing, list) or not all(isinstance(step, dict) for step in preprocessing):
            raise InvalidInputError(
                "preprocessing must be a list of step dicts such as "
                "anomalyforge.signal.preprocessing_spec() returns"
            )
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise BundleError(
                f"bundle directory {self.out_dir} already exists and is not empty; "
                "choose a new directory or remove the old bundle first"
            )

        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Model input length: the raw window for ECG beats, the feature vector where the
        # preprocessing changes the length (log-mel stacks of audio windows).
        self.window_length = int(task.get("feature_length", window_length))
        self.manifest = bundle.new_manifest(task, preprocessing)
        logger.info("writing bundle to %s (window_length %d)", self.out_dir, window_length)

    def file_name(self, name: str, format_key: str) -> str:
        """Return the file name of model ``name`` in format ``format_key``."""
        return name + FORMAT_SUFFIXES[format_key]

    def check_new_model_name(self, name: str) -> None:
        if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name):
            raise InvalidInputError(
                f"model name {name!r} is invalid; use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        if name in self.manifest["models"]:
            raise BundleError(f"model {name!r} is already in bundle {self.out_dir}; choose another name")

    def export_formats(self, name: str, module, example_inputs: tuple, calibration: dict,
                       input_names: tuple, output_names: tuple) -> tuple[dict, dict[str, Path]]:
        """Write the files of one model in every format of ``self.formats``; return entries and paths."""
        formats, paths = {}, {}
        if any(key in ONNX_FORMATS for key in self.formats):
            formats, paths = self.export_onnx_formats(name, module, example_inputs, calibration,
                                                      input_names, output_names)
        tflite_keys = [key for key in self.formats if key in TFLITE_FORMATS]
        if tflite_keys:
            from anomalyforge.export.tflite_export import export_tflite_formats

            logger.info("model %r: exporting %s", name, ", ".join(tflite_keys))
            tflite_paths, extras = export_tflite_formats(
                module, calibration, self.out_dir, {key: self.file_name(name, key) for key in tflite_keys},
                input_names, output_names, float_output=output_names == DETECTOR_OUTPUTS,
            )
            for key, path in tflite_paths.items():
                extra = dict(extras[key])
                inputs, outputs = extra.pop("inputs"), extra.pop("outputs")
                formats[key] = bundle.file_entry(self.out_dir, path.name, key, FORMAT_PRECISIONS[key],
                                                 inputs, outputs, **extra)
            paths.update(tflite_paths)
        return formats, paths

    def add_format_record(self, name: str, format_key: str, field: str, record: dict) -> None:
        """Store an extra JSON record (for example ``"mcu"``) in one file entry of the manifest."""
        entry = self.manifest["models"].get(name, {}).get("formats", {}).get(format_key)
        if entry is None:
            raise BundleError(f"model {name!r} has no {format_key!r} file in bundle {self.out_dir}")
        check_json(record, f"{field} record of {name!r} ({format_key})")
        entry[field] = record

    def export_onnx_formats(self, name: str, module, example_inputs: tuple, calibration: dict,
                            input_names: tuple, output_names: tuple) -> tuple[dict, dict[str, Path]]:
        """Write the ONNX fp32 and int8 files of one model and return their entries and paths."""
        fp32_key, int8_key = "onnx-fp32", "onnx-int8"
        fp32_path = self.out_dir / self.file_name(name, fp32_key)
        int8_path = self.out_dir / self.file_name(name, int8_key)

        logger.info("model %r: exporting fp32", name)
        export_onnx(module, example_inputs, fp32_path, input_names, output_names, dynamic_batch=True)
        logger.info("model %r: quantizing to int8", name)
        quantize_onnx_int8(fp32_path, int8_path, calibration)

        # Parity against torch on the calibration data, so the manifest states how far
        # each file is from the trained module.
        logger.info("model %r: checking parity on %d samples", name, len(next(iter(calibration.values()))))
        formats = {}
        for format_key, path in ((fp32_key, fp32_path), (int8_key, int8_path)):
            inputs, outputs = onnx_io(path)
            extra = {"parity": parity(module, path, calibration)}
            if format_key == int8_key:
                extra["quantization"] = quantization_settings(calibration)
            formats[format_key] = bundle.file_entry(
                self.out_dir, path.name, format_key, FORMAT_PRECISIONS[format_key],
                inputs, outputs, **extra,
            )
        keys = [key for key in (fp32_key, int8_key) if key in self.formats]
        if fp32_key not in keys:
            # The fp32 file was only the input of quantization.
            fp32_path.unlink()
        return ({key: formats[key] for key in keys},
                {key: path for key, path in ((fp32_key, fp32_path), (int8_key, int8_path)) if key in keys})

    def add_detector(self, name: str, module, example_window, threshold: dict, output: str,
                     calibration_windows: np.ndarray) -> dict[str, Path]:
        """Export a detector in fp32 and int8 and record it in the manifest.

        Parameters
        ----------
        name : str
            Model name: 1-64 letters, digits, '_' or '-'. It names the files.
        module : torch.nn.Module
            Maps input ``window`` of shape (batch, window_length), float32, already
            preprocessed, to ``score`` of shape (batch,), higher is more anomalous.
        example_window : array_like of shape (n_windows, window_length) or (window_length,)
            Real preprocessed window(s) used to trace the module.
        threshold : dict
            Decision threshold record, such as :meth:`anomalyforge.thresholds.Threshold.to_dict`
            returns. ``threshold["value"]`` must be a finite number.
        output : str
            What the score is, for example ``"reconstruction mean squared error"``.
        calibration_windows : ndarray of shape (n_windows, window_length)
            Preprocessed normal windows for int8 calibration and the parity record.

        Returns
        -------
        dict of str to pathlib.Path
            The written file of each format key in ``formats`` (``"onnx-fp32"``, ...).
        """
        self.check_new_model_name(name)
        threshold = check_threshold(threshold, name)
        output = check_description(output, "output")
        windows = check_windows(calibration_windows, self.window_length, name="calibration_windows")
        example = check_windows(example_window, self.window_length, name="example_window")
        example = np.concatenate([example, windows])[:EXAMPLE_ROWS]

        import torch

        formats, paths = self.export_formats(
            name, module, (torch.from_numpy(example),), {"window": windows},
            DETECTOR_INPUTS, DETECTOR_OUTPUTS,
        )
        self.manifest["models"][name] = {
            "role": "detector",
            "output": output,
            "formats": formats,
            "threshold": threshold,
            "threshold_history": [],
        }
        logger.info("added detector %r (%s)", name, ", ".join(str(path) for path in paths.values()))
        return paths

    def add_decoder(self, name: str, module, latent_dim: int, classes: list[int],
                    calibration_inputs: dict,
                    output: str = "generated beat, z-normalised, one row per sample") -> dict[str, Path]:
        """Export a conditional decoder (generator) in fp32 and int8 and record it.

        Parameters
        ----------
        name : str
            Model name: 1-64 letters, digits, '_' or '-'. It names the files.
        module : torch.nn.Module
            Maps ``z`` of shape (batch, latent_dim) and ``condition`` of shape
            (batch, len(classes)), both float32, to ``beat`` of shape
            (batch, window_length). It must not contain ``torch.nn.ConvTranspose1d``.
        latent_dim : int
            Length of ``z``, at least 1.
        classes : list of int
            Class labels in condition order: ``condition[:, i] == 1`` selects
            ``classes[i]`` (one-hot encoding).
        calibration_inputs : dict
            ``{"z": ndarray of shape (n_samples, latent_dim), "condition": ndarray of
            shape (n_samples, len(classes))}``, used for int8 calibration and parity.
            Draw ``z`` from the distribution used at generation time and give every
            class some rows.
        output : str, default="generated beat, z-normalised, one row per sample"
            What ``beat`` is.

        Returns
        -------
        dict of str to pathlib.Path
            The written file of each format key in ``formats`` (``"onnx-fp32"``, ...).
        """
        import torch

        self.check_new_model_name(name)
        output = check_description(output, "output")
        if not isinstance(latent_dim, int) or isinstance(latent_dim, bool) or latent_dim < 1:
            raise InvalidInputError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        classes = check_classes(classes)
        transposed = [layer for layer, child in module.named_modules() if isinstance(child, torch.nn.ConvTranspose1d)]
        if transposed:
            raise InvalidInputError(
                f"decoder {name!r} contains ConvTranspose1d layers {transposed}; decoders must "
                "upsample with Upsample followed by Conv1d so every export path can quantize them"
            )
        calibration = check_decoder_calibration(calibration_inputs, latent_dim, len(classes))
        example = tuple(torch.from_numpy(calibration[key][:EXAMPLE_ROWS]) for key in DECODER_INPUTS)

        formats, paths = self.export_formats(
            name, module, example, calibration, DECODER_INPUTS, DECODER_OUTPUTS,
        )
        self.manifest["models"][name] = {
            "role": "decoder",
            "output": output,
            "formats": formats,
            "latent_dim": latent_dim,
            "classes": classes,
            "condition": {
                "encoding": "one-hot",
                "input": "condition",
                "length": len(classes),
                "order": classes,
                "dtype": "float32",
            },
        }
        logger.info("added decoder %r (%s)", name, ", ".join(str(path) for path in paths.values()))
        return paths

    def set_metrics(self, metrics: dict) -> None:
        """Store the export-time evaluation (JSON-serialisable dict) in the manifest."""
        if not isinstance(metrics, dict):
            raise InvalidInputError(f"metrics must be a dict, got {type(metrics).__name__}")
        check_json(metrics, "metrics")
        self.manifest["metrics"] = metrics

    def finish(self, default_detector: str, metrics: dict | None = None, zip_path=None) -> Path:
        """Write ``manifest.json``, and optionally pack the bundle into one zip file.

        Parameters
        ----------
        default_detector : str
            Name of an added detector. The device uses it unless another detector is selected.
        metrics : dict or None, default=None
            Export-time evaluation. If None, the metrics stored by :meth:`set_metrics`
            (or an empty dict) are kept.
        zip_path : str or os.PathLike or None, default=None
            If given, the bundle directory is also packed into this zip file.

        Returns
        -------
        pathlib.Path
            The zip file if ``zip_path`` is given, else the bundle directory. Either can
            be passed to :func:`anomalyforge.bundle.load_bundle`.
        """
        detectors = [name for name, model in self.manifest["models"].items() if model["role"] == "detector"]
        if default_detector not in detectors:
            raise BundleError(
                f"default_detector {default_detector!r} is not a detector in this bundle; "
                f"added detectors: {detectors}"
            )
        if metrics is not None:
            self.set_metrics(metrics)
        self.manifest["default_detector"] = default_detector

        manifest_path = bundle.write_manifest(self.out_dir, self.manifest)
        logger.info("wrote %s (%d models, default detector %r)", manifest_path,
                    len(self.manifest["models"]), default_detector)
        if zip_path is None:
            return self.out_dir
        zip_path = bundle.zip_bundle(self.out_dir, Path(zip_path))
        logger.info("packed bundle %s into %s", self.out_dir, zip_path)
        return zip_path


def check_threshold(threshold: dict, name: str) -> dict:
    if not isinstance(threshold, dict):
        raise InvalidInputError(
            f"threshold of detector {name!r} must be a dict such as Threshold.to_dict() returns, "
            f"got {type(threshold).__name__}"
        )
    value = threshold.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(
            f"threshold of detector {name!r} needs a finite numeric 'value', got {value!r}; "
            "calibrate it with anomalyforge.thresholds.calibrate_threshold"
        )
    check_json(threshold, f"threshold of detector {name!r}")
    return dict(threshold)


def check_description(text: str, field: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"{field} must be a non-empty description string, got {text!r}")
    return text


def check_classes(classes) -> list[int]:
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise InvalidInputError(f"classes must be a list of integer labels, got {classes!r}")
    labels = list(classes)
    if not labels or not all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
        raise InvalidInputError(f"classes must be a non-empty list of integer labels, got {labels!r}")
    labels = [int(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise InvalidInputError(f"classes contain duplicates: {labels}; list each label once")
    return labels


def check_decoder_calibration(calibration_inputs: dict, latent_dim: int, n_classes: int) -> dict[str, np.ndarray]:
    if not isinstance(calibration_inputs, dict) or sorted(calibration_inputs) != sorted(DECODER_INPUTS):
        received = sorted(calibration_inputs) if isinstance(calibration_inputs, dict) else type(calibration_inputs).__name__
        raise InvalidInputError(
            f"calibration_inputs must be a dict with keys {list(DECODER_INPUTS)}, got {received}"
        )
    z = np.ascontiguousarray(calibration_inputs["z"], dtype=np.float32)
    condition = np.ascontiguousarray(calibration_inputs["condition"], dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise InvalidInputError(f"calibration z must have shape (n_samples, {latent_dim}), got {z.shape}")
    if condition.shape != (z.shape[0], n_classes):
        raise InvalidInputError(
            f"calibration condition must have shape ({z.shape[0]}, {n_classes}) (one one-hot row "
            f"per z row), got {condition.shape}"
        )
    if not np.all((condition == 0) | (condition == 1)) or not np.all(condition.sum(axis=1) == 1):
        raise InvalidInputError(
            "calibration condition rows must be one-hot (a single 1, the rest 0); "
            "encode class labels with the order given in classes"
        )
    return {"z": z, "condition": condition}


def check_json(value, field: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(
            f"{field} must be JSON-serialisable with finite numbers ({error}); convert numpy "
            "values with float() or int()"
        ) from error
