"""``anomalyforge export``: re-export the torch modules of a demo run to ONNX, TFLite or a microcontroller.

The demo saves its trained modules with :func:`save_run_modules` into ``RUN/modules/``
(``torch.save`` of each ``state_dict`` plus ``modules.json``); :func:`load_run_modules`
rebuilds them with ``torch.load(weights_only=True)``, so nothing is unpickled beyond
tensors. The export then writes a bundle, evaluates every file on held-out ECG5000 TEST
beats against torch, and writes ``export_report.json`` / ``export_report.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from anomalyforge.errors import ExportError, InvalidInputError

logger = logging.getLogger(__name__)

MODULES_DIR = "modules"
MODULES_INDEX = "modules.json"
TARGETS = ("onnx", "tflite", "mcu")
TARGET_FORMATS = {
    "onnx": ("onnx-fp32", "onnx-int8"),
    "tflite": ("tflite-fp32", "tflite-int8"),
    "mcu": ("tflite-fp32", "tflite-int8"),
}
DEFAULT_MAX_AUC_DROP = 0.01
DEFAULT_TFLM_BEATS = 1000
DECODER_CALIBRATION_ROWS = 256
SCORE_CHUNK = 512


def module_spec(module, window_length: int, latent_dim: int | None = None) -> dict:
    """Return ``{"class", "kwargs"}`` that rebuilds ``module`` (an anomalyforge.training.models class)."""
    kind = type(module).__name__
    if kind == "ConvAutoencoder":
        kwargs = {"length": module.decoder.short_length * 4, "latent_dim": module.bottleneck.out_features,
                  "channels": module.decoder.channels}
    elif kind == "ConvClassifier":
        kwargs = {"length": window_length, "channels": module.head.in_features // 2}
    elif kind == "PCAReconstruction":
        kwargs = {"n_components": int(module.components.shape[0]), "length": int(module.components.shape[1])}
    elif kind == "CVAEDecoder":
        kwargs = {"length": module.net.short_length * 4, "latent_dim": latent_dim,
                  "n_classes": module.net.project.in_features - latent_dim, "channels": module.net.channels}
    else:
        raise InvalidInputError(
            f"cannot save a {kind} module for re-export; supported: ConvAutoencoder, ConvClassifier, "
            "PCAReconstruction, CVAEDecoder"
        )
    return {"class": kind, "kwargs": kwargs}


def build_module(spec: dict):
    """Create an untrained module from a :func:`module_spec` record."""
    from anomalyforge.training import models

    kwargs = dict(spec["kwargs"])
    if spec["class"] == "PCAReconstruction":
        return models.PCAReconstruction(np.zeros(kwargs["length"], np.float32),
                                        np.zeros((kwargs["n_components"], kwargs["length"]), np.float32))
    return getattr(models, spec["class"])(**kwargs)


def save_run_modules(run_dir, detectors: dict, generator, k: int, seed: int, window_length: int) -> Path:
    """Save the demo's trained modules into ``run_dir/modules`` for ``anomalyforge export``.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The demo run directory.
    detectors : dict of str to TrainedDetector
        ``anomalyforge.training.experiment`` detectors (``module``, ``threshold_record()``).
    generator : CVAEGenerator
        The fitted generator; its ``decoder`` is saved.
    k, seed : int
        The few-shot split the run used, so the export can rebuild the same split.
    window_length : int
        Samples per window (``task.window_length``).

    Returns
    -------
    pathlib.Path
        The ``modules`` directory.
    """
    import torch

    from anomalyforge.training.experiment import DETECTOR_OUTPUTS

    directory = Path(run_dir) / MODULES_DIR
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    index = {"k": int(k), "seed": int(seed), "detectors": {}, "decoder": None}
    for name, detector in detectors.items():
        torch.save(detector.module.state_dict(), directory / f"{name}.pt")
        index["detectors"][name] = {
            **module_spec(detector.module, window_length), "file": f"{name}.pt",
            "threshold": detector.threshold_record(), "output": DETECTOR_OUTPUTS[name],
        }
    torch.save(generator.decoder.state_dict(), directory / "decoder.pt")
    index["decoder"] = {**module_spec(generator.decoder, window_length, generator.latent_dim), "file": "decoder.pt",
                        "latent_dim": int(generator.latent_dim), "classes": [int(c) for c in generator.classes_]}
    (directory / MODULES_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    logger.info("saved %d modules into %s", len(detectors) + 1, directory)
    return directory


def load_run_modules(run_dir) -> dict:
    """Load the modules saved by :func:`save_run_modules` (``torch.load(weights_only=True)``)."""
    import torch

    directory = Path(run_dir) / MODULES_DIR
    index_path = directory / MODULES_INDEX
    if not Path(run_dir).is_dir():
        raise InvalidInputError(f"run directory {run_dir} not found; pass the --run-dir of an 'anomalyforge demo' run")
    if (Path(run_dir) / "metrics.json").is_file() and not index_path.is_file():
        raise InvalidInputError(
            f"{run_dir} has no saved torch modules: export works on ECG5000 runs of 'anomalyforge demo', "
            "and the machine-sound demo writes its bundle directly (see its bundle/ folder)"
        )
    if not index_path.is_file():
        raise InvalidInputError(
            f"{index_path} not found; {run_dir} has no saved torch modules. Run 'anomalyforge demo "
            f"--run-dir {run_dir}' with an anomalyforge version that saves them"
        )
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for record in [*index["detectors"].values(), index["decoder"]]:
        module = build_module(record)
        module.load_state_dict(torch.load(directory / record["file"], weights_only=True))
        record["module"] = module.eval()
    return index


def decoder_calibration(latent_dim: int, classes: list[int], seed: int) -> dict[str, np.ndarray]:
    """Return the decoder calibration inputs the demo uses: N(0, 1) latents, conditions cycling the classes."""
    rng = np.random.default_rng(seed)
    class_index = np.arange(DECODER_CALIBRATION_ROWS) % len(classes)
    return {"z": rng.standard_normal((DECODER_CALIBRATION_ROWS, latent_dim)).astype(np.float32),
            "condition": np.eye(len(classes), dtype=np.float32)[class_index]}


def torch_outputs(module, inputs: dict[str, np.ndarray], names) -> np.ndarray:
    """Run ``module`` in chunks without gradients and return its float64 output."""
    import torch

    parts = []
    n_rows = len(inputs[names[0]])
    with torch.no_grad():
        for start in range(0, n_rows, SCORE_CHUNK):
            args = [torch.from_numpy(np.ascontiguousarray(inputs[name][start:start + SCORE_CHUNK], np.float32))
                    for name in names]
            parts.append(module(*args).numpy())
    return np.concatenate(parts).astype(np.float64)


def run_format(path, entry: dict, format_key: str, inputs: dict[str, np.ndarray],
               reference_kernels: bool = False) -> np.ndarray:
    """Return the float64 output of one exported file on ``inputs``, through the device runtimes."""
    if format_key.startswith("onnx"):
        from anomalyforge.export.onnx_export import run_onnx

        return run_onnx(path, inputs, threads=1)[0].astype(np.float64)
    from anomalyforge.device.tflite_backend import TFLiteBackend

    return TFLiteBackend(path, entry, reference_kernels=reference_kernels).run(inputs)[0].astype(np.float64)


def run_tflm_format(path, entry: dict, inputs: dict[str, np.ndarray], arena_bytes: int) -> np.ndarray:
    """Return the dequantized float64 output of a ``tflite-int8`` file in TFLite Micro."""
    from anomalyforge.device.tflite_backend import dequantize, quantize
    from anomalyforge.export.mcu import run_tflm

    arrays = []
    for record in entry["inputs"]:
        array = np.asarray(inputs[record["name"]], dtype=np.float32)
        if record["scale"] is not None:
            array = quantize(array, record["scale"], record["zero_point"], np.dtype(record["dtype"]))
        arrays.append(array)
    raw = run_tflm(path, arrays, arena_bytes)[0]
    output = entry["outputs"][0]
    if output["scale"] is not None:
        raw = dequantize(raw, output["scale"], output["zero_point"])
    return raw.astype(np.float64).reshape(len(arrays[0]), *[int(size) for size in output["shape"][1:]])


def roc_auc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_anomaly, scores))


def evaluate_detector(name: str, record: dict, entries: dict, root: Path, test_x, is_anomaly,
                      tflm_beats: int, mcu_records: dict) -> list[dict]:
    """Return one parity row per format of a detector: ROC-AUC on TEST and max score difference vs torch."""
    inputs = {"window": test_x}
    reference = torch_outputs(record["module"], inputs, ["window"])
    torch_auc = roc_auc(reference, is_anomaly)
    rows = [{"model": name, "format": "torch", "rows": len(test_x), "roc_auc": torch_auc,
             "roc_auc_torch": torch_auc, "auc_drop": 0.0, "max_abs_diff_vs_torch": 0.0}]

    def row(format_key, scores, rows_used, **extra):
        torch_subset_auc = roc_auc(reference[rows_used], is_anomaly[rows_used])
        auc = roc_auc(scores, is_anomaly[rows_used])
        return {"model": name, "format": format_key, "rows": len(scores), "roc_auc": auc,
                "roc_auc_torch": torch_subset_auc, "auc_drop": torch_subset_auc - auc,
                "max_abs_diff_vs_torch": float(np.max(np.abs(scores - reference[rows_used]))), **extra}

    # ECG5000 TEST is ordered by class, so TFLite Micro gets evenly spaced beats, not the first ones.
    subset_rows = np.unique(np.linspace(0, len(test_x) - 1, min(tflm_beats, len(test_x))).astype(int))
    for format_key, entry in entries.items():
        path = root / entry["file"]
        rows.append(row(format_key, run_format(path, entry, format_key, inputs), slice(None)))
        if format_key == "tflite-int8" and name in mcu_records:
            subset = {"window": test_x[subset_rows]}
            micro = run_tflm_format(path, entry, subset, mcu_records[name]["ram_arena_bytes"])
            litert_reference = run_format(path, entry, format_key, subset, reference_kernels=True)
            rows.append(row("tflm-int8", micro, subset_rows, **bit_exactness(micro, litert_reference)))
    return rows


def bit_exactness(micro: np.ndarray, litert_reference: np.ndarray) -> dict:
    """Compare TFLite Micro outputs with LiteRT reference-kernel outputs of the same file."""
    differing = micro != litert_reference
    return {"vs_litert_reference_kernels": {
        "bit_exact": bool(not differing.any()),
        "differing_values": int(differing.sum()),
        "max_abs_diff": float(np.max(np.abs(micro - litert_reference))) if micro.size else 0.0,
    }}


def evaluate_decoder(name: str, record: dict, entries: dict, root: Path, inputs: dict,
                     mcu_records: dict) -> list[dict]:
    """Return one row per decoder format: max and mean absolute beat difference vs torch."""
    names = ["z", "condition"]
    reference = torch_outputs(record["module"], inputs, names)
    rows = [{"model": name, "format": "torch", "rows": len(reference), "max_abs_diff_vs_torch": 0.0,
             "mean_abs_diff_vs_torch": 0.0}]
    for format_key, entry in entries.items():
        path = root / entry["file"]
        outputs = {format_key: (run_format(path, entry, format_key, inputs), {})}
        if format_key == "tflite-int8" and name in mcu_records:
            micro = run_tflm_format(path, entry, inputs, mcu_records[name]["ram_arena_bytes"])
            litert_reference = run_format(path, entry, format_key, inputs, reference_kernels=True)
            outputs["tflm-int8"] = (micro, bit_exactness(micro, litert_reference))
        for key, (output, extra) in outputs.items():
            difference = np.abs(output - reference)
            rows.append({"model": name, "format": key, "rows": len(reference),
                         "max_abs_diff_vs_torch": float(difference.max()),
                         "mean_abs_diff_vs_torch": float(difference.mean()), **extra})
    return rows


def format_markdown(rows: list[dict], mcu_records: dict, max_auc_drop: float) -> str:
    """Render the parity rows and MCU figures as a markdown report."""
    lines = ["# Export parity on held-out ECG5000 TEST", "",
             f"AUC drop limit: {max_auc_drop}. TFLite Micro rows use evenly spaced TEST beats only; "
             "their AUC drop is against torch on the same beats.", "",
             "| model | format | rows | ROC-AUC | AUC torch (same rows) | AUC drop | max abs diff vs torch | TFLM = LiteRT ref |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        exact = row.get("vs_litert_reference_kernels")
        exact_text = "" if exact is None else (
            "bit exact" if exact["bit_exact"] else f"{exact['differing_values']} values differ, max {exact['max_abs_diff']:.3g}")
        auc = "" if "roc_auc" not in row else f"{row['roc_auc']:.4f}"
        auc_torch = "" if "roc_auc_torch" not in row else f"{row['roc_auc_torch']:.4f}"
        drop = "" if "auc_drop" not in row else f"{row['auc_drop']:+.4f}"
        lines.append(f"| {row['model']} | {row['format']} | {row['rows']} | {auc} | {auc_torch} | {drop} | "
                     f"{row['max_abs_diff_vs_torch']:.4g} | {exact_text} |")
    if any(not row.get("vs_litert_reference_kernels", {"bit_exact": True})["bit_exact"] for row in rows):
        lines += ["", "TFLite Micro and LiteRT's reference kernels round the int8 FULLY_CONNECTED "
                      "requantization differently by one step on a small share of values; models with an "
                      "int8 linear layer therefore differ slightly (docs/tflite.md gives a measurement)."]
    if mcu_records:
        lines += ["", "## Microcontroller (tflite-int8, TFLite Micro host interpreter)", "",
                  "| model | flash (model bytes) | RAM arena bytes | 90 % arena fails | ops |", "|---|---:|---:|---|---|"]
        for name, record in mcu_records.items():
            lines.append(f"| {name} | {record['flash_model_bytes']} | {record['ram_arena_bytes']} | "
                         f"{record['arena_90_percent_fails']} | {', '.join(record['ops'])} |")
    return "\n".join(lines) + "\n"


def check_auc_drops(rows: list[dict], max_auc_drop: float) -> list[str]:
    """Return a description of every row whose AUC drop exceeds ``max_auc_drop``."""
    return [f"{row['model']} {row['format']}: ROC-AUC {row['roc_auc']:.4f} vs torch {row['roc_auc_torch']:.4f} "
            f"(drop {row['auc_drop']:.4f})" for row in rows if row.get("auc_drop", 0.0) > max_auc_drop]


def export_run(run_dir, target: str = "tflite", out_dir=None, with_onnx: bool = False,
               max_auc_drop: float = DEFAULT_MAX_AUC_DROP, tflm_beats: int = DEFAULT_TFLM_BEATS,
               models: list[str] | None = None) -> dict:
    """Export the saved modules of a demo run and evaluate every file against torch.

    Parameters
    ----------
    run_dir : str or os.PathLike
        Demo run directory with ``modules/`` (see :func:`save_run_modules`).
    target : {"onnx", "tflite", "mcu"}, default="tflite"
        ``onnx``: onnx-fp32 / onnx-int8. ``tflite``: tflite-fp32 / tflite-int8. ``mcu``:
        as ``tflite``, plus C sources and the TFLite Micro arena of each int8 file.
    out_dir : str or os.PathLike or None, default=None
        Output directory, replaced if it exists. Default ``RUN/export-<target>``.
    with_onnx : bool, default=False
        Also write the ONNX files for the tflite and mcu targets, so one report compares all formats.
    max_auc_drop : float, default=0.01
        Largest allowed held-out ROC-AUC drop of any detector file versus torch.
    tflm_beats : int, default=1000
        TEST beats scored in TFLite Micro (slow: reference kernels, one beat per call).
    models : list of str or None, default=None
        Detector names to export (the decoder is always exported). None exports all.

    Returns
    -------
    dict
        The report: ``rows`` (parity table), ``mcu`` records, ``bundle`` directory.

    Raises
    ------
    ExportError
        If a detector file loses more than ``max_auc_drop`` ROC-AUC. The report is still
        written, but the bundle gets no manifest, so it cannot be loaded.
    """
    import torch

    from anomalyforge.export.writer import BundleWriter
    from anomalyforge.signal import preprocessing_spec
    from anomalyforge.training.datasets import ECG5000_NORMAL_CLASS, ecg5000_task, load_ecg5000
    from anomalyforge.training.experiment import prepare
    from anomalyforge.training.splits import few_shot_split

    if target not in TARGETS:
        raise InvalidInputError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if not 0.0 <= max_auc_drop < 1.0:
        raise InvalidInputError(f"max_auc_drop must lie in [0, 1), got {max_auc_drop}")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"export-{target}"
    index = load_run_modules(run_dir)
    detectors = index["detectors"]
    if models is not None:
        unknown = sorted(set(models) - set(detectors))
        if unknown:
            raise InvalidInputError(f"detectors {unknown} are not in {run_dir}; saved: {sorted(detectors)}")
        detectors = {name: detectors[name] for name in models}
    formats = TARGET_FORMATS[target] + (TARGET_FORMATS["onnx"] if with_onnx and target != "onnx" else ())

    # 1. Rebuild the run's split: validation normals calibrate int8, TEST evaluates.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = load_ecg5000()
        split = prepare(few_shot_split(train, test, index["k"], seed=index["seed"]))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        bundle_dir = out_dir / "bundle"

        # 2. Export every model in every format.
        writer = BundleWriter(bundle_dir, ecg5000_task(split.test.x.shape[1]), preprocessing_spec(), formats=formats)
        for name, record in detectors.items():
            writer.add_detector(name, record["module"], split.normal_val[:1], record["threshold"], record["output"],
                                split.normal_val)
        decoder = index["decoder"]
        decoder_inputs = decoder_calibration(decoder["latent_dim"], decoder["classes"], index["seed"])
        writer.add_decoder("decoder", decoder["module"], decoder["latent_dim"], decoder["classes"], decoder_inputs)

        # 3. Microcontroller sources and arena sizes of the int8 TFLite files.
        mcu_records = {}
        if target == "mcu":
            from anomalyforge.export.mcu import build_mcu_target

            for name, model in writer.manifest["models"].items():
                entry = model["formats"]["tflite-int8"]
                mcu_records[name] = build_mcu_target(bundle_dir / entry["file"], out_dir / "mcu" / name, name, entry)
                writer.add_format_record(name, "tflite-int8", "mcu", mcu_records[name])

        # 4. Held-out parity of every file against torch.
        is_anomaly = split.test.y != ECG5000_NORMAL_CLASS
        rows = []
        for name, record in detectors.items():
            rows += evaluate_detector(name, record, writer.manifest["models"][name]["formats"], bundle_dir,
                                      split.test.x, is_anomaly, tflm_beats, mcu_records)
        rows += evaluate_decoder("decoder", decoder, writer.manifest["models"]["decoder"]["formats"], bundle_dir,
                                 decoder_inputs, mcu_records)
    finally:
        torch.set_num_threads(previous_threads)

    # 5. Report, then the AUC check, then the manifest.
    report = {"run_dir": str(run_dir), "target": target, "formats": list(formats), "max_auc_drop": max_auc_drop,
              "tflm_beats": tflm_beats, "rows": rows, "mcu": mcu_records, "bundle": str(bundle_dir)}
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "export_report.md").write_text(format_markdown(rows, mcu_records, max_auc_drop), encoding="utf-8")
    failures = check_auc_drops(rows, max_auc_drop)
    if failures:
        raise ExportError(
            f"held-out ROC-AUC dropped by more than {max_auc_drop} for: {'; '.join(failures)}. The bundle in "
            f"{bundle_dir} was left without a manifest; see {out_dir / 'export_report.md'}. Raise "
            "--max-auc-drop if the loss is acceptable, or deploy the float32 file of that model"
        )
    writer.set_metrics({"held_out_test_parity": rows, "max_auc_drop": max_auc_drop})
    default = "autoencoder" if "autoencoder" in detectors else next(iter(detectors))
    writer.finish(default)
    logger.info("export of %s (%s) written to %s", run_dir, target, out_dir)
    return report


def add_export_commands(subparsers) -> None:
    """Register the top-level ``export`` command on ``subparsers``."""
    parser = subparsers.add_parser(
        "export",
        help="re-export a demo run's models to ONNX, TFLite or a microcontroller",
        description="Load the torch modules a demo run saved in RUN/modules, export them into a new "
                    "bundle, score held-out ECG5000 TEST beats with every file and write "
                    "export_report.md / .json. Fails when a detector file loses more ROC-AUC than "
                    "--max-auc-drop.",
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="demo run directory (with modules/)")
    parser.add_argument("--target", choices=TARGETS, default="tflite",
                        help="onnx: ONNX fp32/int8; tflite: TFLite fp32/int8 (batch 1); mcu: TFLite plus "
                             "model_data.h/.cc, op list and measured TFLite Micro arena (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output directory, replaced if present (default: RUN/export-TARGET)")
    parser.add_argument("--with-onnx", action="store_true",
                        help="also write ONNX files for the tflite and mcu targets, so the report compares all formats")
    parser.add_argument("--max-auc-drop", type=float, default=DEFAULT_MAX_AUC_DROP,
                        help="largest allowed held-out ROC-AUC drop versus torch (default: %(default)s)")
    parser.add_argument("--tflm-beats", type=int, default=DEFAULT_TFLM_BEATS,
                        help="TEST beats scored in TFLite Micro (default: %(default)s)")
    parser.add_argument("--detector", action="append", dest="models", metavar="NAME",
                        help="export only this detector (repeatable; default: all); the decoder is always exported")
    parser.set_defaults(handler=run_export_command)


def run_export_command(args: argparse.Namespace) -> int:
    """Run ``anomalyforge export``, print the markdown report and return the exit code."""
    if args.tflm_beats < 1:
        raise InvalidInputError(f"--tflm-beats must be at least 1, got {args.tflm_beats}")
    report = export_run(args.run_dir, args.target, args.out, args.with_onnx, args.max_auc_drop, args.tflm_beats,
                        args.models)
    print(format_markdown(report["rows"], report["mcu"], report["max_auc_drop"]))
    return 0
