"""MIT-BIH Arrhythmia Database: record readers, QRS-detection scores and beat-level evaluation.

Records are read with the ``wfdb`` package when it is installed, and otherwise with the
numpy readers below for format-212 signals and MIT annotation files. The evaluation runs
the device's raw-ECG path (streaming Pan-Tompkins QRS detection, beat extraction, the
bundle's preprocessing and ONNX model) on lead MLII and compares it with the reference
beat annotations.

Source: G. B. Moody and R. G. Mark, "The impact of the MIT-BIH Arrhythmia Database",
IEEE Engineering in Medicine and Biology Magazine 20(3):45-50, 2001. The data are
published by PhysioNet under the Open Data Commons Attribution License v1.0.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalyforge.errors import InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

DEFAULT_LEAD = "MLII"
# ANSI/AAMI EC57 matching window between a detected and a reference beat.
MATCH_WINDOW_S = 0.150
# Annotation codes of the MIT format (the table of the WFDB library, ecgcodes.h).
ANNOTATION_SYMBOLS = {
    1: "N", 2: "L", 3: "R", 4: "a", 5: "V", 6: "F", 7: "J", 8: "A", 9: "S", 10: "E", 11: "j",
    12: "/", 13: "Q", 14: "~", 16: "|", 18: "s", 19: "T", 20: "*", 21: "D", 22: '"', 23: "=",
    24: "p", 25: "B", 26: "^", 27: "t", 28: "+", 29: "u", 30: "?", 31: "!", 32: "[", 33: "]",
    34: "e", 35: "n", 36: "@", 37: "x", 38: "f", 39: "(", 40: ")", 41: "r",
}
# Symbols that mark a beat (QRS complex); rhythm, noise and comment labels are left out.
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")
# MIT annotation pseudo-codes with a payload instead of a label.
CODE_SKIP, CODE_NUM, CODE_SUB, CODE_CHN, CODE_AUX = 59, 60, 61, 62, 63


@dataclass
class Record:
    """One ECG lead with its reference annotations.

    Attributes
    ----------
    name : str
    signal : ndarray of shape (n_samples,), float64
        Physical units (mV): (adc - baseline) / gain.
    sample_rate_hz : float
    annotation_samples : ndarray of shape (n_annotations,), int64
    annotation_symbols : ndarray of shape (n_annotations,), str
    """

    name: str
    signal: np.ndarray
    sample_rate_hz: float
    annotation_samples: np.ndarray
    annotation_symbols: np.ndarray

    def beats(self, symbols=BEAT_SYMBOLS) -> tuple[np.ndarray, np.ndarray]:
        """Return (samples, symbols) of the annotations whose symbol is in ``symbols``."""
        mask = np.isin(self.annotation_symbols, list(symbols))
        return self.annotation_samples[mask], self.annotation_symbols[mask]


# ---------------------------------------------------------------------------------------
# Readers


def parse_header(path) -> dict:
    """Read a WFDB header: record line and one dict per signal line (comments and blank lines skipped)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="ascii").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise InvalidInputError(f"header {path} has no record line")
    fields = lines[0].split()
    n_signals = int(fields[1])
    header = {"record": fields[0], "n_signals": n_signals,
              "sample_rate_hz": float(fields[2].split("/")[0]) if len(fields) > 2 else 250.0,
              "n_samples": int(fields[3]) if len(fields) > 3 else None, "signals": []}
    for line in lines[1:1 + n_signals]:
        parts = line.split()
        gain_text = parts[2].split("(")[0].split("/")[0]
        header["signals"].append({
            "file": parts[0], "format": parts[1].split("x")[0].split(":")[0],
            "gain": float(gain_text) or 200.0,
            "baseline": int(parts[2].split("(")[1].split(")")[0]) if "(" in parts[2] else int(parts[4]),
            "adc_zero": int(parts[4]), "first_value": int(parts[5]),
            "description": " ".join(parts[8:]) if len(parts) > 8 else "",
        })
    return header


def decode_212(data: bytes, n_signals: int) -> np.ndarray:
    """Decode format-212 bytes: two 12-bit two's-complement samples in every three bytes.

    Returns an int16 array of shape (n_frames, n_signals) in ADC units.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    raw = raw[: len(raw) // 3 * 3].reshape(-1, 3).astype(np.int16)
    first = raw[:, 0] | ((raw[:, 1] & 0x0F) << 8)
    second = raw[:, 2] | ((raw[:, 1] & 0xF0) << 4)
    samples = np.empty(2 * len(raw), dtype=np.int16)
    samples[0::2], samples[1::2] = first, second
    samples[samples > 2047] -= 4096
    n_frames = len(samples) // n_signals
    return samples[: n_frames * n_signals].reshape(n_frames, n_signals)


def read_annotations_numpy(path) -> tuple[np.ndarray, np.ndarray]:
    """Read an MIT-format annotation file (``.atr``) into (samples, symbols) with numpy.

    Each annotation is a 16-bit little-endian word: the top 6 bits are the code and the
    low 10 bits the sample interval since the previous one. SKIP carries a 32-bit
    interval (high word first), AUX a text payload padded to an even length; NUM, SUB
    and CHN set fields this reader does not keep.
    """
    words = np.frombuffer(Path(path).read_bytes(), dtype="<u2")
    samples, symbols = [], []
    position = 0
    index = 0
    while index < len(words):
        word = int(words[index])
        index += 1
        code, value = word >> 10, word & 0x3FF
        if code == 0 and value == 0:
            break
        if code == CODE_SKIP:
            high, low = int(words[index]), int(words[index + 1])
            interval = (high << 16) | low
            position += interval - (1 << 32) if interval >= 1 << 31 else interval
            index += 2
        elif code == CODE_AUX:
            index += (value + 1) // 2
        elif code in (CODE_NUM, CODE_SUB, CODE_CHN):
            continue
        else:
            position += value
            samples.append(position)
            symbols.append(ANNOTATION_SYMBOLS.get(code, "?"))
    return np.asarray(samples, dtype=np.int64), np.asarray(symbols, dtype="<U1")


def read_record_numpy(record: str, data_dir, lead: str = DEFAULT_LEAD) -> Record:
    """Read one lead of a format-212 record and its ``.atr`` annotations without wfdb."""
    data_dir = Path(data_dir)
    header = parse_header(data_dir / f"{record}.hea")
    names = [signal["description"] for signal in header["signals"]]
    if lead not in names:
        raise InvalidInputError(f"record {record} has no lead {lead!r}; its leads are {names}")
    channel = names.index(lead)
    info = header["signals"][channel]
    if info["format"] != "212":
        raise InvalidInputError(f"record {record} is in format {info['format']}; the numpy reader reads format 212 only")
    adc = decode_212((data_dir / info["file"]).read_bytes(), header["n_signals"])[:, channel]
    if adc[0] != info["first_value"]:
        raise InvalidInputError(
            f"{info['file']} starts with {adc[0]} in lead {lead} but the header says {info['first_value']}; "
            "the file is damaged or not format 212"
        )
    signal = (adc.astype(np.float64) - info["baseline"]) / info["gain"]
    samples, symbols = read_annotations_numpy(data_dir / f"{record}.atr")
    return Record(str(record), signal, header["sample_rate_hz"], samples, symbols)


def read_record_wfdb(record: str, data_dir, lead: str = DEFAULT_LEAD) -> Record:
    """Read one lead and the ``.atr`` annotations with the wfdb package."""
    try:
        import wfdb
    except ImportError as error:
        raise MissingDependencyError(f"wfdb is not installed ({error}); pip install wfdb") from error
    path = str(Path(data_dir) / str(record))
    header = wfdb.rdheader(path)
    if lead not in header.sig_name:
        raise InvalidInputError(f"record {record} has no lead {lead!r}; its leads are {header.sig_name}")
    channel = header.sig_name.index(lead)
    data = wfdb.rdrecord(path, channels=[channel], physical=False)
    adc = data.d_signal[:, 0].astype(np.float64)
    signal = (adc - data.baseline[0]) / data.adc_gain[0]
    annotation = wfdb.rdann(path, "atr")
    return Record(str(record), signal, float(data.fs), np.asarray(annotation.sample, dtype=np.int64),
                  np.asarray(annotation.symbol, dtype="<U1"))


def read_record(record: str, data_dir, lead: str = DEFAULT_LEAD, reader: str = "auto") -> Record:
    """Read one lead of a MIT-BIH record with wfdb, or with the numpy readers if wfdb is missing.

    Parameters
    ----------
    record : str
        Record name, for example ``"100"``.
    data_dir : str or Path
        Folder holding ``{record}.hea``, ``.dat`` and ``.atr``.
    lead : str, default="MLII"
    reader : {"auto", "wfdb", "numpy"}, default="auto"
    """
    data_dir = Path(data_dir)
    if not (data_dir / f"{record}.hea").is_file():
        raise InvalidInputError(
            f"record {record} not found: {data_dir / f'{record}.hea'} does not exist; pass --data-dir, "
            "the folder with the .hea, .dat and .atr files"
        )
    if reader not in ("auto", "wfdb", "numpy"):
        raise InvalidInputError(f"reader must be 'auto', 'wfdb' or 'numpy', got {reader!r}")
    if reader == "numpy":
        return read_record_numpy(record, data_dir, lead)
    try:
        return read_record_wfdb(record, data_dir, lead)
    except MissingDependencyError:
        if reader == "wfdb":
            raise
        logger.info("wfdb is not installed, so record %s is read with the numpy reader", record)
        return read_record_numpy(record, data_dir, lead)


# ---------------------------------------------------------------------------------------
# Scores


def match_beats(detected, reference, tolerance: int) -> np.ndarray:
    """Match each reference beat to the nearest unused detection within ``tolerance`` samples.

    Returns an int64 array of shape (n_reference,): the index into ``detected`` of the
    match, or -1 where the reference beat was missed. Both inputs must be sorted.
    """
    detected = np.asarray(detected, dtype=np.int64)
    reference = np.asarray(reference, dtype=np.int64)
    matches = np.full(len(reference), -1, dtype=np.int64)
    used = np.zeros(len(detected), dtype=bool)
    for row, sample in enumerate(reference):
        position = int(np.searchsorted(detected, sample))
        best, best_distance = -1, tolerance + 1
        for index in (position - 2, position - 1, position, position + 1):
            if 0 <= index < len(detected) and not used[index]:
                distance = abs(int(detected[index]) - int(sample))
                if distance < best_distance:
                    best, best_distance = index, distance
        if best >= 0:
            used[best] = True
            matches[row] = best
    return matches


def qrs_scores(detected, reference, sample_rate_hz: float, window_s: float = MATCH_WINDOW_S) -> dict:
    """Return true positives, misses, false detections, sensitivity (Se) and positive predictivity (+P)."""
    matches = match_beats(detected, reference, int(round(window_s * sample_rate_hz)))
    true_positives = int(np.sum(matches >= 0))
    false_negatives = len(reference) - true_positives
    false_positives = len(detected) - true_positives
    return {
        "reference_beats": int(len(reference)), "detected": int(len(detected)),
        "true_positives": true_positives, "false_negatives": false_negatives, "false_positives": false_positives,
        "sensitivity": true_positives / max(len(reference), 1),
        "positive_predictivity": true_positives / max(len(detected), 1),
        "match_window_s": window_s,
    }


# ---------------------------------------------------------------------------------------
# Beat-level evaluation


def roc_auc(negative_scores, positive_scores) -> float | None:
    """Return the ROC-AUC of positives against negatives, or None when a class is empty."""
    from sklearn.metrics import roc_auc_score

    if len(negative_scores) == 0 or len(positive_scores) == 0:
        return None
    labels = np.r_[np.zeros(len(negative_scores)), np.ones(len(positive_scores))]
    return float(roc_auc_score(labels, np.r_[negative_scores, positive_scores]))


def score_record(detector, record: Record, spec: dict) -> dict:
    """Detect R peaks, cut beats and score them; return peaks, kept peaks and scores."""
    from anomalyforge.signal import detect_qrs, extract_beats

    peaks = detect_qrs(record.signal, record.sample_rate_hz)
    beats, kept = extract_beats(record.signal, peaks, spec, detector.window_length)
    scores = detector.score(beats) if len(beats) else np.zeros(0, np.float32)
    return {"peaks": peaks, "kept": kept, "beats": beats, "scores": scores}


def v_vs_n(scores_n, scores_v, threshold: float, missed_v: int) -> dict:
    """Return AUC and rates at ``threshold``; missed V beats count as not flagged in ``recall_all``."""
    scores_n, scores_v = np.asarray(scores_n), np.asarray(scores_v)
    flagged_v = int(np.sum(scores_v > threshold))
    return {
        "n_normal": int(len(scores_n)), "n_ventricular": int(len(scores_v)),
        "roc_auc": roc_auc(scores_n, scores_v), "threshold": float(threshold),
        "recall": flagged_v / max(len(scores_v), 1),
        "recall_all": flagged_v / max(len(scores_v) + missed_v, 1),
        "false_positive_rate": float(np.mean(scores_n > threshold)) if len(scores_n) else None,
    }


def evaluate_record(bundle_dir, record: Record, calibration_minutes: float = 5.0, precision: str | None = None,
                    polarity: int = -1, n_generated: int = 1000, target_fpr: float = 0.01, seed: int = 0) -> dict:
    """Evaluate QRS detection and V-vs-N beat detection on one record, before and after calibration.

    Beats whose R peak lies in the first ``calibration_minutes`` are never scored for the
    V-vs-N figures: their reference-N beats calibrate a copy of the bundle with
    :func:`anomalyforge.device.calibrate.calibrate_bundle` (plus ``n_generated`` decoder
    anomalies), and both thresholds are evaluated on the beats after that.
    """
    from anomalyforge.device.calibrate import calibrate_bundle
    from anomalyforge.device.detector import DeviceDetector
    from anomalyforge.signal import qrs_beat_spec

    fs = record.sample_rate_hz
    spec = qrs_beat_spec(fs, polarity=polarity)
    detector = DeviceDetector.from_bundle(bundle_dir, precision=precision)
    started = time.perf_counter()
    result = score_record(detector, record, spec)
    elapsed = time.perf_counter() - started
    reference, symbols = record.beats()
    qrs = qrs_scores(result["peaks"], reference, fs)

    # Label each scored beat with the reference beat it matches.
    matches = match_beats(result["kept"], reference, int(round(MATCH_WINDOW_S * fs)))
    split = int(round(calibration_minutes * 60 * fs))
    late = reference >= split
    scored_n = result["scores"][matches[(symbols == "N") & late & (matches >= 0)]]
    scored_v = result["scores"][matches[(symbols == "V") & late & (matches >= 0)]]
    missed_v = int(np.sum((symbols == "V") & late & (matches < 0)))
    report = {
        "record": record.name, "spec": spec, "qrs": qrs, "precision": detector.precision,
        "offline_rtf": len(record.signal) / fs / elapsed,
        "before": v_vs_n(scored_n, scored_v, detector.threshold, missed_v),
    }

    calibration_rows = matches[(symbols == "N") & ~late & (matches >= 0)]
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "bundle"
        shutil.copytree(bundle_dir, copy)
        calibration = calibrate_bundle(copy, result["beats"][calibration_rows], precision=detector.precision,
                                       n_generated=n_generated, target_fpr=target_fpr, seed=seed,
                                       input_description=f"MIT-BIH {record.name}: N beats of the first "
                                                         f"{calibration_minutes} min")
    report["calibration"] = {"n_normals": calibration["n_normals"], "target_fpr": target_fpr,
                             "generated_detection_rate": calibration["detection_rate"],
                             "minutes": calibration_minutes}
    report["after"] = v_vs_n(scored_n, scored_v, calibration["threshold"]["value"], missed_v)
    return report


def format_report(reports: list[dict]) -> str:
    lines = ["record  Se      +P      | V-vs-N AUC  recall/FPR before   recall/FPR after"]
    for report in reports:
        qrs, before, after = report["qrs"], report["before"], report["after"]
        auc = "n/a" if before["roc_auc"] is None else f"{before['roc_auc']:.3f}"
        lines.append(
            f"{report['record']:<7} {100 * qrs['sensitivity']:.2f}%  {100 * qrs['positive_predictivity']:.2f}%  | "
            f"{auc:<10}  {before['recall']:.3f}/{before['false_positive_rate'] or 0:.3f}        "
            f"{after['recall']:.3f}/{after['false_positive_rate'] or 0:.3f}"
        )
    return "\n".join(lines)


def add_mitbih_command(subparsers) -> None:
    """Register ``mitbih-eval`` on the top-level ``subparsers``."""
    parser = subparsers.add_parser(
        "mitbih-eval",
        help="evaluate raw-ECG QRS detection and beat scoring on MIT-BIH records",
        description="Run the device's raw-ECG path (streaming Pan-Tompkins, beat extraction, the bundle "
                    "detector) on lead MLII of MIT-BIH records: QRS sensitivity and positive predictivity "
                    "(150 ms window, beat annotations only) and V-vs-N detection with the bundle threshold "
                    "and after device calibration on the first minutes' normal beats. Prints a table and JSON.",
    )
    parser.add_argument("--bundle", required=True, metavar="DIR", help="bundle directory from 'anomalyforge demo'")
    parser.add_argument("--records", nargs="+", default=["100", "208"], help="record names (default: 100 208)")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="folder with the records' .hea, .dat and .atr files (PhysioNet mitdb layout)")
    parser.add_argument("--calibration-minutes", type=float, default=5.0,
                        help="minutes at the record start whose N beats calibrate the threshold and are not "
                             "scored (default: %(default)s)")
    parser.add_argument("--polarity", type=int, choices=[1, -1], default=-1,
                        help="factor applied to each beat; -1 turns the upright MLII QRS downward like ECG5000 "
                             "beats (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the reports as JSON to FILE")
    parser.set_defaults(handler=run_mitbih_command)


def run_mitbih_command(args: argparse.Namespace) -> int:
    if args.calibration_minutes <= 0:
        raise InvalidInputError(f"--calibration-minutes must be positive, got {args.calibration_minutes}")
    from anomalyforge.bundle import load_bundle

    modality = load_bundle(args.bundle).task.get("modality")
    if modality != "ecg-beat":
        raise InvalidInputError(
            f"bundle {args.bundle} is for {modality!r} input, but mitbih-eval scores ECG beats; pass a "
            "bundle written by 'anomalyforge demo' on ECG5000"
        )
    reports = [evaluate_record(args.bundle, read_record(name, args.data_dir), args.calibration_minutes,
                               polarity=args.polarity) for name in args.records]
    print(format_report(reports))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(reports, handle, indent=2)
            handle.write("\n")
    return 0
