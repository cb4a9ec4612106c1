"""The synthetic-data quality report: ``anomalyforge report RUN_DIR``.

The report compares each generator's synthetic anomalies with real held-out anomalies, per
anomaly class and overall, and writes ``metrics.json``, ``report.md`` and a self-contained
``report.html`` (PNG figures embedded as base64 data URIs) into ``RUN_DIR/report``.

Its inputs are arrays that a training run keeps in memory. The run saves them with
:func:`save_report_inputs` into ``RUN_DIR/report_inputs.npz`` (plain numpy arrays, readable
with ``allow_pickle=False``), and :func:`build_report` reads them back. A caller that still
has the arrays can call :func:`report_from_arrays` directly.

Real reference anomalies: unless the caller passes others, the anomalies of the held-out
test split are the real distribution that synthetic windows are compared with. The report
only measures on them and chooses nothing from them.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.util
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomalyforge.errors import InvalidInputError, MissingDependencyError
from anomalyforge.training import quality

logger = logging.getLogger(__name__)

INPUTS_FILE = "report_inputs.npz"
REPORT_DIR = "report"
INPUTS_FORMAT = 1
OVERALL = "overall"


@dataclass
class ReportInputs:
    """Arrays the quality report needs; every window array has shape (n, length), z-normalised.

    Attributes
    ----------
    normals : ndarray of shape (n_normals, length)
        Real normal windows the detectors and generators trained on.
    anomalies : ndarray of shape (k, length)
        The k real training anomalies, with their labels in ``anomaly_classes`` (k,).
    synthetic : dict of str to (ndarray, ndarray)
        Generator name to (windows (n, length), class labels (n,)).
    test_x, test_y : ndarray of shape (n_test, length) and (n_test,)
        Held-out real windows and labels, used for utility and the detectors' ROC curves.
    normal_class : int
        Label of the normal class in ``test_y``.
    detector_test_scores : dict of str to ndarray of shape (n_test,)
        Each detector's scores on ``test_x``.
    detector_thresholds : dict of str to float
        Each detector's calibrated threshold, where known.
    detector_synthetic_scores : dict of str to dict of str to ndarray
        Generator name to {detector name: scores of that generator's synthetic windows}.
    reference_anomalies, reference_classes : ndarray or None
        Real anomalies the generators never saw, to compare with. None uses the anomalies
        of ``test_x``.
    """

    normals: np.ndarray
    anomalies: np.ndarray
    anomaly_classes: np.ndarray
    synthetic: dict
    test_x: np.ndarray
    test_y: np.ndarray
    normal_class: int = 1
    detector_test_scores: dict = field(default_factory=dict)
    detector_thresholds: dict = field(default_factory=dict)
    detector_synthetic_scores: dict = field(default_factory=dict)
    reference_anomalies: np.ndarray | None = None
    reference_classes: np.ndarray | None = None

    def __post_init__(self):
        self.normals = as_windows(self.normals, "normals")
        length = self.normals.shape[1]
        self.anomalies = as_windows(self.anomalies, "anomalies", length)
        self.anomaly_classes = as_labels(self.anomaly_classes, "anomaly_classes", len(self.anomalies))
        self.test_x = as_windows(self.test_x, "test_x", length)
        self.test_y = as_labels(self.test_y, "test_y", len(self.test_x))
        self.normal_class = int(self.normal_class)

        if not self.synthetic:
            raise InvalidInputError("synthetic is empty; pass at least one generator name -> (windows, classes)")
        checked = {}
        for name, pair in self.synthetic.items():
            if len(pair) != 2:
                raise InvalidInputError(f"synthetic[{name!r}] must be a (windows, classes) pair")
            windows = as_windows(pair[0], f"synthetic[{name!r}] windows", length)
            checked[str(name)] = (windows, as_labels(pair[1], f"synthetic[{name!r}] classes", len(windows)))
        self.synthetic = checked

        self.detector_test_scores = {
            str(name): as_scores(values, f"detector_test_scores[{name!r}]", len(self.test_x))
            for name, values in self.detector_test_scores.items()
        }
        unknown = sorted(set(self.detector_thresholds) - set(self.detector_test_scores))
        if unknown:
            raise InvalidInputError(f"detector_thresholds names detectors without test scores: {unknown}")
        self.detector_thresholds = {str(name): float(value) for name, value in self.detector_thresholds.items()}
        for generator, per_detector in self.detector_synthetic_scores.items():
            if generator not in self.synthetic:
                raise InvalidInputError(
                    f"detector_synthetic_scores has generator {generator!r}, but synthetic has only "
                    f"{sorted(self.synthetic)}"
                )
            self.detector_synthetic_scores[generator] = {
                str(name): as_scores(values, f"detector_synthetic_scores[{generator!r}][{name!r}]",
                                     len(self.synthetic[generator][0]))
                for name, values in per_detector.items()
            }

        if (self.reference_anomalies is None) != (self.reference_classes is None):
            raise InvalidInputError("pass reference_anomalies and reference_classes together, or neither")
        if self.reference_anomalies is None:
            is_anomaly = self.test_y != self.normal_class
            self.reference_anomalies = self.test_x[is_anomaly]
            self.reference_classes = self.test_y[is_anomaly]
            self.reference_source = "anomalies of the held-out test split"
        else:
            self.reference_anomalies = as_windows(self.reference_anomalies, "reference_anomalies", length)
            self.reference_classes = as_labels(self.reference_classes, "reference_classes",
                                               len(self.reference_anomalies))
            self.reference_source = "reference anomalies given by the caller"
        if len(self.reference_anomalies) < 2:
            raise InvalidInputError(
                f"only {len(self.reference_anomalies)} real reference anomalies; the report needs at least 2"
            )


def as_windows(values, name: str, length: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2 or len(array) == 0:
        raise InvalidInputError(f"{name} must have shape (n_windows, length) with n_windows >= 1, "
                                f"got shape {array.shape}")
    if length is not None and array.shape[1] != length:
        raise InvalidInputError(f"{name} have {array.shape[1]} samples per window, the normals {length}; "
                                "pass windows of one length")
    if not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{name} contain NaN or inf; drop or repair those windows")
    return array


def as_labels(values, name: str, count: int) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (count,):
        raise InvalidInputError(f"{name} must have shape ({count},) to match its windows, got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer class labels, got dtype {array.dtype}")
    return array.astype(np.int64)


def as_scores(values, name: str, count: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (count,):
        raise InvalidInputError(f"{name} must have shape ({count},) to match its windows, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{name} contain NaN or inf")
    return array


# ---------------------------------------------------------------- report_inputs.npz


def save_report_inputs(run_dir, *, normals, anomalies, anomaly_classes, synthetic: dict, test_x, test_y,
                       normal_class: int = 1, detector_test_scores: dict | None = None,
                       detector_thresholds: dict | None = None, detector_synthetic_scores: dict | None = None,
                       reference_anomalies=None, reference_classes=None) -> Path:
    """Validate the report's arrays and write them to ``run_dir/report_inputs.npz``.

    Parameters are those of :class:`ReportInputs`. The file holds only numeric and unicode
    string arrays, so ``np.load(path, allow_pickle=False)`` reads it. Layout (format 1):
    ``normals``, ``anomalies``, ``anomaly_classes``, ``test_x``, ``test_y``, ``normal_class``,
    ``generator_names`` (G,), and ``synthetic_<i>`` and ``synthetic_classes_<i>`` for
    generator i. Detectors: ``detector_names`` (D,), ``detector_test_scores`` (D, n_test),
    ``detector_thresholds`` (D,) with NaN where unknown, and ``detector_synthetic_scores_<i>``
    (D, n_i) with NaN rows for detectors not scored. ``reference_anomalies`` and
    ``reference_classes`` are present only when given.

    Returns
    -------
    Path
        The written file.
    """
    inputs = ReportInputs(
        normals=normals, anomalies=anomalies, anomaly_classes=anomaly_classes, synthetic=synthetic,
        test_x=test_x, test_y=test_y, normal_class=normal_class,
        detector_test_scores=detector_test_scores or {}, detector_thresholds=detector_thresholds or {},
        detector_synthetic_scores=detector_synthetic_scores or {},
        reference_anomalies=reference_anomalies, reference_classes=reference_classes,
    )
    detector_names = list(inputs.detector_test_scores)
    arrays = {
        "format": np.array(INPUTS_FORMAT),
        "normals": inputs.normals,
        "anomalies": inputs.anomalies,
        "anomaly_classes": inputs.anomaly_classes,
        "test_x": inputs.test_x,
        "test_y": inputs.test_y,
        "normal_class": np.array(inputs.normal_class),
        "generator_names": np.array(list(inputs.synthetic), dtype=str),
        "detector_names": np.array(detector_names, dtype=str),
        "detector_test_scores": (np.stack([inputs.detector_test_scores[name] for name in detector_names])
                                 if detector_names else np.zeros((0, len(inputs.test_x)))),
        "detector_thresholds": np.array([inputs.detector_thresholds.get(name, np.nan) for name in detector_names],
                                        dtype=np.float64),
    }
    for index, (name, (windows, classes)) in enumerate(inputs.synthetic.items()):
        arrays[f"synthetic_{index}"] = windows
        arrays[f"synthetic_classes_{index}"] = classes
        scored = inputs.detector_synthetic_scores.get(name, {})
        extra = sorted(set(scored) - set(detector_names))
        if extra:
            raise InvalidInputError(
                f"detector_synthetic_scores[{name!r}] names detectors without test scores: {extra}"
            )
        arrays[f"detector_synthetic_scores_{index}"] = np.stack(
            [scored.get(detector, np.full(len(windows), np.nan)) for detector in detector_names]
        ) if detector_names else np.zeros((0, len(windows)))
    if reference_anomalies is not None:
        arrays["reference_anomalies"] = inputs.reference_anomalies
        arrays["reference_classes"] = inputs.reference_classes

    path = Path(run_dir) / INPUTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    logger.info("wrote %s (%d generators, %d detectors)", path, len(inputs.synthetic), len(detector_names))
    return path


def load_report_inputs(path) -> ReportInputs:
    """Read a file written by :func:`save_report_inputs`.

    Raises
    ------
    InvalidInputError
        When the file is missing, lacks an array or has another format number.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(
            f"{path} not found; run anomalyforge demo into this run directory first, or write the file "
            "with anomalyforge.training.report.save_report_inputs"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        # numpy's own message for a damaged file suggests allow_pickle=True, which would run
        # code from an untrusted file, so it is replaced rather than passed on.
        raise InvalidInputError(
            f"{path} is not a valid report inputs file ({type(error).__name__}); it is damaged or was "
            "not written by save_report_inputs. Run anomalyforge demo into this run directory again"
        ) from None
    try:
        if int(data["format"]) != INPUTS_FORMAT:
            raise InvalidInputError(f"{path} has format {int(data['format'])}; this version reads format "
                                    f"{INPUTS_FORMAT}, so write the file again with this version")
        detector_names = [str(name) for name in data["detector_names"]]
        synthetic, synthetic_scores = {}, {}
        for index, name in enumerate(str(name) for name in data["generator_names"]):
            synthetic[name] = (data[f"synthetic_{index}"], data[f"synthetic_classes_{index}"])
            rows = data[f"detector_synthetic_scores_{index}"]
            scored = {detector: rows[row] for row, detector in enumerate(detector_names)
                      if np.all(np.isfinite(rows[row]))}
            if scored:
                synthetic_scores[name] = scored
        thresholds = {name: float(value) for name, value in zip(detector_names, data["detector_thresholds"])
                      if np.isfinite(value)}
        return ReportInputs(
            normals=data["normals"], anomalies=data["anomalies"], anomaly_classes=data["anomaly_classes"],
            synthetic=synthetic, test_x=data["test_x"], test_y=data["test_y"],
            normal_class=int(data["normal_class"]),
            detector_test_scores={name: data["detector_test_scores"][row] for row, name in enumerate(detector_names)},
            detector_thresholds=thresholds, detector_synthetic_scores=synthetic_scores,
            reference_anomalies=data.get("reference_anomalies"), reference_classes=data.get("reference_classes"),
        )
    except KeyError as error:
        raise InvalidInputError(f"{path} lacks the array {error}; write it again with save_report_inputs") from error


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class ReportSettings:
    """Knobs of the report; the defaults are the ones the documentation describes."""

    seed: int = 0
    n_permutations: int = 200
    max_per_set: int = 1000
    nearest_k: int = quality.NEAREST_K
    embedding_per_group: int = 300
    figures: bool = True
    # BLAS and OpenMP threads for scikit-learn and numpy. One thread is as fast as two on an
    # idle 2-core machine for these sizes and several times faster when other processes compete.
    threads: int = 1


def match_class_mix(windows: np.ndarray, classes: np.ndarray, target_classes: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Subsample ``windows`` without replacement so their class shares match ``target_classes``.

    Only classes present in both are used; the result is as large as the scarcest class allows.
    """
    shared = [label for label in np.unique(target_classes) if np.any(classes == label)]
    if not shared:
        return windows[:0]
    target_counts = np.array([np.sum(target_classes == label) for label in shared], dtype=np.float64)
    shares = target_counts / target_counts.sum()
    available = np.array([np.sum(classes == label) for label in shared])
    total = int(np.floor(np.min(available / shares)))
    chosen = []
    for label, share in zip(shared, shares):
        index = np.flatnonzero(classes == label)
        count = min(len(index), max(1, int(round(total * share))))
        chosen.append(rng.choice(index, size=count, replace=False))
    return windows[np.sort(np.concatenate(chosen))]


def group_metrics(real: np.ndarray, synthetic: np.ndarray, training: np.ndarray, settings: ReportSettings) -> dict:
    """Compute fidelity, diversity and memorisation of one class (or of all classes) of one generator.

    A metric that the group is too small for is recorded as ``{"skipped": reason}``.
    """
    result = {"n_real": int(len(real)), "n_synthetic": int(len(synthetic))}
    fidelity = {}
    minimum = max(5, settings.nearest_k + 1)
    if len(real) < minimum or len(synthetic) < minimum:
        reason = f"needs at least {minimum} real and synthetic windows, got {len(real)} and {len(synthetic)}"
        result.update({"fidelity": {"skipped": reason}, "diversity": {"skipped": reason}})
    else:
        fidelity.update(quality.discriminative_score(real, synthetic, seed=settings.seed,
                                                     max_per_set=settings.max_per_set))
        fidelity["discriminative_score"] = fidelity.pop("score")
        fidelity["discriminative_accuracy"] = fidelity.pop("accuracy")
        mmd = quality.mmd_test(real, synthetic, seed=settings.seed, n_permutations=settings.n_permutations,
                               max_per_set=settings.max_per_set)
        fidelity.update({"mmd2": mmd["mmd2"], "mmd_p_value": mmd["p_value"], "mmd_bandwidth": mmd["bandwidth"]})
        fidelity.update(quality.curve_distances(real, synthetic))
        result["fidelity"] = fidelity
        result["diversity"] = quality.diversity_summary(real, synthetic, settings.nearest_k)
    if len(synthetic) and len(real):
        result["memorisation"] = quality.memorisation_summary(training, synthetic, real)
    else:
        result["memorisation"] = {"skipped": "no synthetic or no held-out real windows"}
    return result


def generator_metrics(inputs: ReportInputs, name: str, settings: ReportSettings) -> dict:
    """Compute the per-class and overall metrics of one generator, plus its flags."""
    windows, classes = inputs.synthetic[name]
    real, real_classes = inputs.reference_anomalies, inputs.reference_classes
    per_class = {}
    for label in np.unique(classes):
        started = time.perf_counter()
        per_class[str(int(label))] = group_metrics(real[real_classes == label], windows[classes == label],
                                                   inputs.anomalies, settings)
        logger.info("report: %s class %d done in %.1f s", name, label, time.perf_counter() - started)
    rng = np.random.default_rng(settings.seed)
    matched = match_class_mix(windows, classes, real_classes, rng)
    overall = group_metrics(real, matched, inputs.anomalies, settings)
    overall["synthetic_selection"] = (f"{len(matched)} of {len(windows)} synthetic windows, subsampled to the "
                                      "class shares of the real reference anomalies")
    flags = []
    for group, entry in [*per_class.items(), (OVERALL, overall)]:
        where = OVERALL if group == OVERALL else f"class {group}"
        diversity, memorisation = entry.get("diversity", {}), entry.get("memorisation", {})
        if diversity.get("mode_collapse"):
            flags.append(f"mode collapse in {where}: {'; '.join(diversity['mode_collapse_reasons'])}")
        if memorisation.get("memorisation"):
            flags.append(f"memorisation in {where}: {memorisation['near_copies']} near-copies of training "
                         f"anomalies ({memorisation['near_copy_share']:.0%})")
    return {"per_class": per_class, OVERALL: overall, "flags": flags}


def detector_metrics(inputs: ReportInputs) -> dict:
    """Return each detector's test ROC-AUC and, per generator, the share of synthetic windows it flags."""
    from sklearn.metrics import roc_auc_score

    is_anomaly = inputs.test_y != inputs.normal_class
    result = {}
    for name, scores in inputs.detector_test_scores.items():
        entry = {"test_roc_auc": float(roc_auc_score(is_anomaly, scores))}
        threshold = inputs.detector_thresholds.get(name)
        if threshold is not None:
            entry["threshold"] = threshold
            entry["test_recall"] = float((scores[is_anomaly] > threshold).mean())
            entry["test_fpr"] = float((scores[~is_anomaly] > threshold).mean())
        flagged = {}
        for generator, per_detector in inputs.detector_synthetic_scores.items():
            if name in per_detector and threshold is not None:
                flagged[generator] = float((per_detector[name] > threshold).mean())
        if flagged:
            entry["synthetic_flagged"] = flagged
        result[name] = entry
    return result


def compute_report_metrics(inputs: ReportInputs, settings: ReportSettings) -> dict:
    """Compute every metric of the report; the per-window memorisation arrays stay in the result."""
    started = time.perf_counter()
    generators = {name: generator_metrics(inputs, name, settings) for name in inputs.synthetic}
    utility_started = time.perf_counter()
    trained_on = {}
    for name, (windows, _) in inputs.synthetic.items():
        trained_on[name] = quality.train_synthetic_test_real(
            inputs.normals, inputs.anomalies, windows, inputs.test_x, inputs.test_y, inputs.normal_class,
            seed=settings.seed)
    first = next(iter(trained_on.values()))
    utility = {
        "classifier": ("logistic regression (C=0.1, balanced class weights) on "
                       f"{quality.DISCRIMINATOR_FEATURES}"),
        "trtr": first["trtr"],
        "tstr": {name: entry["tstr"] for name, entry in trained_on.items()},
        "real_and_synthetic": {name: entry["real_and_synthetic"] for name, entry in trained_on.items()},
    }
    for name, entry in trained_on.items():
        gap = entry["tstr"]["roc_auc"] - entry["trtr"]["roc_auc"]
        utility.setdefault("tstr_minus_trtr", {})[name] = gap
    utility_seconds = time.perf_counter() - utility_started
    return {
        "inputs": {
            "normals": int(len(inputs.normals)),
            "k_anomalies": int(len(inputs.anomalies)),
            "anomalies_per_class": count_classes(inputs.anomaly_classes),
            "reference": inputs.reference_source,
            "reference_per_class": count_classes(inputs.reference_classes),
            "test_windows": int(len(inputs.test_x)),
            "synthetic_per_class": {name: count_classes(classes) for name, (_, classes) in inputs.synthetic.items()},
            "window_length": int(inputs.normals.shape[1]),
        },
        "settings": {
            "seed": settings.seed,
            "feature_space": quality.FEATURE_SPACE,
            "discriminator": f"logistic regression (C=0.1), 5-fold cross-validation, on {quality.DISCRIMINATOR_FEATURES}",
            "mmd": (f"RBF kernel, median-distance bandwidth, {settings.n_permutations} permutations, "
                    f"at most {settings.max_per_set} windows per set"),
            "nearest_k": settings.nearest_k,
            "collapse_rule": (f"coverage < {quality.COLLAPSE_COVERAGE} or more than "
                              f"{quality.COLLAPSE_DUPLICATE_SHARE:.0%} near-duplicates (nearest synthetic "
                              f"neighbour closer than {quality.DUPLICATE_FRACTION} x the real median)"),
            "copy_rule": (f"distance to the closest training anomaly < {quality.COPY_FRACTION} x the median "
                          "of the held-out real anomalies' distances; memorisation when more than "
                          f"{quality.MEMORISATION_COPY_SHARE:.0%} are near-copies"),
        },
        "generators": generators,
        "utility": utility,
        "detectors": detector_metrics(inputs),
        "seconds": {"metrics": round(time.perf_counter() - started, 2), "utility": round(utility_seconds, 2)},
    }


def count_classes(classes: np.ndarray) -> dict:
    labels, counts = np.unique(classes, return_counts=True)
    return {str(int(label)): int(count) for label, count in zip(labels, counts)}


def to_json(value):
    """Convert numpy scalars and drop per-window arrays so ``value`` serialises to JSON."""
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items() if not isinstance(item, np.ndarray)}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- figures


def draw_figures(inputs: ReportInputs, metrics: dict, figure_dir: Path, settings: ReportSettings) -> list[dict]:
    """Draw every figure into ``figure_dir``; return [{"file", "title", "caption"}] in report order."""
    from anomalyforge.training import plots

    figures = []
    real, real_classes = inputs.reference_anomalies, inputs.reference_classes
    real_by_class = {int(label): real[real_classes == label] for label in np.unique(real_classes)}
    for index, (name, (windows, classes)) in enumerate(inputs.synthetic.items()):
        synthetic_by_class = {int(label): windows[classes == label] for label in np.unique(classes)}
        path = plots.plot_class_overlays(real_by_class, synthetic_by_class, name,
                                         figure_dir / f"overlays_{index}.png", seed=settings.seed,
                                         colour=plots.generator_colour(index))
        figures.append({"file": path.name, "title": f"Real vs {name}, per class",
                        "caption": "Top: random windows of each set. Bottom: per-time-step mean with a band of "
                                   "one standard deviation either side."})

    groups = {"real normal": inputs.normals, "real anomaly": real}
    groups.update({f"{name} synthetic": windows for name, (windows, _) in inputs.synthetic.items()})
    path = plots.plot_embeddings(groups, figure_dir / "embeddings.png", seed=settings.seed,
                                 max_per_group=settings.embedding_per_group)
    figures.append({"file": path.name, "title": "Embeddings",
                    "caption": f"At most {settings.embedding_per_group} windows per group. Synthetic anomalies "
                               "should fall among the real anomalies, not among the normals."})

    if inputs.detector_test_scores:
        is_anomaly = inputs.test_y != inputs.normal_class
        histogram_groups = {}
        for detector, scores in inputs.detector_test_scores.items():
            entry = {"real normal": scores[~is_anomaly], "real anomaly": scores[is_anomaly]}
            for name in inputs.synthetic:
                per_detector = inputs.detector_synthetic_scores.get(name, {})
                if detector in per_detector:
                    entry[f"{name} synthetic"] = per_detector[detector]
            histogram_groups[detector] = entry
        path = plots.plot_score_histograms(histogram_groups, inputs.detector_thresholds,
                                           figure_dir / "score_histograms.png")
        figures.append({"file": path.name, "title": "Detector scores",
                        "caption": "Real normals and anomalies of the test split and the synthetic anomalies; "
                                   "dashed: calibrated threshold."})
        path = plots.plot_roc_curves(inputs.detector_test_scores, is_anomaly, figure_dir / "roc_curves.png")
        figures.append({"file": path.name, "title": "ROC curves on held-out real data",
                        "caption": "Every detector on the test split; the inset zooms on false-positive rates "
                                   "up to 5 %."})

    memorisation = {name: entry[OVERALL]["memorisation"] for name, entry in metrics["generators"].items()
                    if "dcr" in entry[OVERALL]["memorisation"]}
    # The overall group contains a class-matched subsample, so the DCR figure uses all windows.
    full = {name: quality.memorisation_summary(inputs.anomalies, inputs.synthetic[name][0], real)
            for name in memorisation}
    if full:
        path = plots.plot_dcr(full, figure_dir / "dcr.png")
        figures.append({"file": path.name, "title": "Distance to the closest training anomaly (DCR)",
                        "caption": "Synthetic windows against held-out real anomalies; windows left of the "
                                   "dashed line are near-copies."})
        for index, (name, entry) in enumerate(full.items()):
            path = plots.plot_nearest_pairs(inputs.synthetic[name][0], inputs.anomalies, entry, name,
                                            figure_dir / f"nearest_pairs_{index}.png",
                                            colour=plots.generator_colour(index))
            figures.append({"file": path.name, "title": f"{name}: closest synthetic windows",
                            "caption": "Each synthetic window drawn over the training anomaly closest to it."})
    return figures


# ---------------------------------------------------------------- documents


def format_value(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def format_counts(counts: dict) -> str:
    return ", ".join(f"class {label}: {count}" for label, count in counts.items())


GROUP_COLUMNS = (
    ("n real", ("n_real",)),
    ("n synth", ("n_synthetic",)),
    ("discrim.", ("fidelity", "discriminative_score")),
    ("MMD²", ("fidelity", "mmd2")),
    ("MMD p", ("fidelity", "mmd_p_value")),
    ("mean RMSE", ("fidelity", "mean_curve_rmse")),
    ("std RMSE", ("fidelity", "std_curve_rmse")),
    ("spectrum L1", ("fidelity", "spectrum_l1")),
    ("ACF RMSE", ("fidelity", "autocorrelation_rmse")),
    ("precision", ("diversity", "precision")),
    ("recall", ("diversity", "recall")),
    ("density", ("diversity", "density")),
    ("coverage", ("diversity", "coverage")),
    ("near-dup.", ("diversity", "near_duplicate_share")),
    ("collapse", ("diversity", "mode_collapse")),
    ("DCR median", ("memorisation", "dcr_median")),
    ("holdout median", ("memorisation", "holdout_dcr_median")),
    ("< holdout p5", ("memorisation", "share_below_holdout_p5")),
    ("near-copies", ("memorisation", "near_copies")),
)


def lookup(entry: dict, keys: tuple):
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def build_blocks(metrics: dict, figures: list[dict]) -> list[tuple]:
    """Lay out the report as blocks ("h1" | "h2" | "p" | "table" | "figure", ...) for Markdown and HTML."""
    blocks = [("h1", "Synthetic-data quality report")]
    inputs, settings = metrics["inputs"], metrics["settings"]
    blocks.append(("p", f"{inputs['normals']} real normals and k = {inputs['k_anomalies']} real training anomalies "
                        f"({format_counts(inputs['anomalies_per_class'])}). Real reference: {inputs['reference']} "
                        f"({format_counts(inputs['reference_per_class'])}). Test split: {inputs['test_windows']} "
                        "windows."))
    blocks.append(("p", f"Feature space for distances: {settings['feature_space']}."))

    flags = [f"{name}: {flag}" for name, entry in metrics["generators"].items() for flag in entry["flags"]]
    blocks.append(("h2", "Flags"))
    blocks.append(("p", "; ".join(flags) if flags else "No mode collapse and no memorisation flagged."))

    blocks.append(("h2", "Fidelity, diversity and memorisation per class"))
    blocks.append(("p", f"Discriminative score = |accuracy - 0.5| of {settings['discriminator']}. MMD: "
                        f"{settings['mmd']}. Precision / recall / density / coverage with k = "
                        f"{settings['nearest_k']}. Mode collapse: {settings['collapse_rule']}. Near-copy: "
                        f"{settings['copy_rule']}."))
    header = ["generator", "group"] + [title for title, _ in GROUP_COLUMNS]
    rows = []
    for name, entry in metrics["generators"].items():
        for group, values in [*entry["per_class"].items(), (OVERALL, entry[OVERALL])]:
            label = OVERALL if group == OVERALL else f"class {group}"
            rows.append([name, label] + [format_value(lookup(values, keys)) for _, keys in GROUP_COLUMNS])
    blocks.append(("table", header, rows))
    for name, entry in metrics["generators"].items():
        if "synthetic_selection" in entry[OVERALL]:
            blocks.append(("p", f"{name}, overall: {entry[OVERALL]['synthetic_selection']}."))

    utility = metrics["utility"]
    blocks.append(("h2", "Utility: train on synthetic, test on real"))
    blocks.append(("p", f"Classifier: {utility['classifier']}. TRTR trains on the real normals and the k real "
                        "anomalies, TSTR on the real normals and the synthetic anomalies only, 'real + synthetic' "
                        "on all three. ROC-AUC on the whole test split and per class (that class against all "
                        "test normals)."))
    classes = list(utility["trtr"]["roc_auc_per_class"])
    header = ["training set", "ROC-AUC"] + [f"class {label}" for label in classes]
    rows = [["TRTR (real anomalies)", format_value(utility["trtr"]["roc_auc"], 4)]
            + [format_value(utility["trtr"]["roc_auc_per_class"][label], 4) for label in classes]]
    for key, title in (("tstr", "TSTR"), ("real_and_synthetic", "real + synthetic")):
        for name, entry in utility[key].items():
            rows.append([f"{title} ({name})", format_value(entry["roc_auc"], 4)]
                        + [format_value(entry["roc_auc_per_class"].get(label), 4) for label in classes])
    blocks.append(("table", header, rows))

    if metrics["detectors"]:
        blocks.append(("h2", "Detectors"))
        generators = list(metrics["generators"])
        header = ["detector", "test ROC-AUC", "threshold", "test recall", "test FPR"] + [
            f"{name} flagged" for name in generators]
        rows = []
        for name, entry in metrics["detectors"].items():
            rows.append([name, format_value(entry["test_roc_auc"], 4), format_value(entry.get("threshold"), 4),
                         format_value(entry.get("test_recall")), format_value(entry.get("test_fpr"), 4)]
                        + [format_value(entry.get("synthetic_flagged", {}).get(generator)) for generator in generators])
        blocks.append(("table", header, rows))
        blocks.append(("p", "'flagged' is the share of a generator's synthetic anomalies that score above the "
                            "detector's threshold."))

    if figures:
        blocks.append(("h2", "Figures"))
        for figure in figures:
            blocks.append(("figure", figure))
    blocks.append(("p", f"Metrics computed in {metrics['seconds']['metrics']:.1f} s (seed {settings['seed']})."))
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        elif kind == "figure":
            figure = block[1]
            lines += [f"### {figure['title']}", "", f"![{figure['title']}](figures/{figure['file']})", "",
                      figure["caption"], ""]
    return "\n".join(lines)


HTML_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: right; }
th { background: #eee; }
td:first-child, td:nth-child(2) { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0 2em; }
figcaption { font-size: 13px; color: #555; }
"""


def render_html(blocks: list[tuple], figure_dir: Path) -> str:
    """Render the blocks as one HTML page with every PNG embedded as a base64 data URI."""
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<title>Synthetic-data quality report</title>", f"<style>{HTML_STYLE}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in block[1]) + "</tr>")
            for row in block[2]:
                parts.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
            parts.append("</table>")
        elif kind == "figure":
            figure = block[1]
            encoded = base64.b64encode((figure_dir / figure["file"]).read_bytes()).decode("ascii")
            parts.append(f"<figure><h3>{html.escape(figure['title'])}</h3>"
                         f"<img alt=\"{html.escape(figure['title'])}\" src=\"data:image/png;base64,{encoded}\">"
                         f"<figcaption>{html.escape(figure['caption'])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- entry points


def report_from_arrays(output_dir, inputs: ReportInputs, settings: ReportSettings = ReportSettings()) -> dict:
    """Compute the report from arrays in memory and write it into ``output_dir``.

    Writes ``metrics.json``, ``report.md``, ``report.html`` and, unless
    ``settings.figures`` is false, the PNG files under ``figures/``.

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    from threadpoolctl import threadpool_limits

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figure_dir = output_dir / "figures"
    logger.info("report: computing metrics for generators %s", list(inputs.synthetic))
    figures = []
    with threadpool_limits(limits=settings.threads):
        metrics = compute_report_metrics(inputs, settings)
        if settings.figures:
            started = time.perf_counter()
            figures = draw_figures(inputs, metrics, figure_dir, settings)
            metrics["seconds"]["figures"] = round(time.perf_counter() - started, 2)
    metrics = to_json(metrics)
    metrics["figures"] = figures

    blocks = build_blocks(metrics, figures)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (output_dir / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (output_dir / "report.html").write_text(render_html(blocks, figure_dir), encoding="utf-8")
    logger.info("report: wrote %s", output_dir / "report.html")
    return metrics


def build_report(run_dir, output_dir=None, settings: ReportSettings = ReportSettings()) -> dict:
    """Read ``run_dir/report_inputs.npz`` and write the report into ``output_dir`` (default ``run_dir/report``)."""
    run_dir = Path(run_dir)
    inputs = load_report_inputs(run_dir / INPUTS_FILE)
    return report_from_arrays(run_dir / REPORT_DIR if output_dir is None else output_dir, inputs, settings)


def format_report_summary(metrics: dict) -> str:
    """Render the headline figures of a report as plain text."""
    lines = []
    for name, entry in metrics["generators"].items():
        overall = entry[OVERALL]
        fidelity, diversity = overall.get("fidelity", {}), overall.get("diversity", {})
        memorisation = overall.get("memorisation", {})
        lines.append(
            f"{name}: discriminative {format_value(fidelity.get('discriminative_score'))}, "
            f"MMD p {format_value(fidelity.get('mmd_p_value'))}, precision {format_value(diversity.get('precision'))}, "
            f"recall {format_value(diversity.get('recall'))}, coverage {format_value(diversity.get('coverage'))}, "
            f"near-copies {format_value(memorisation.get('near_copies'))}, "
            f"TSTR {format_value(metrics['utility']['tstr'][name]['roc_auc'], 4)} vs TRTR "
            f"{format_value(metrics['utility']['trtr']['roc_auc'], 4)}"
        )
        lines += [f"  flag: {flag}" for flag in entry["flags"]]
    return "\n".join(lines)


def add_report_command(subparsers) -> None:
    """Register ``anomalyforge report`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "report",
        help="write the synthetic-data quality report of a run directory",
        description=(
            "Compare synthetic anomalies with real held-out anomalies, per class and overall: fidelity "
            "(discriminative score, MMD² permutation test, mean / std / spectrum / autocorrelation distances), "
            "precision, recall, density and coverage, mode collapse, memorisation (distance to the closest "
            "training anomaly), and utility (train on synthetic, test on real). Reads RUN_DIR/report_inputs.npz "
            "and writes metrics.json, report.md and a self-contained report.html into RUN_DIR/report."
        ),
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory holding report_inputs.npz")
    parser.add_argument("--output", type=Path, default=None,
                        help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of subsampling, cross-validation folds, permutations and t-SNE (default: 0)")
    parser.add_argument("--permutations", type=int, default=200,
                        help="permutations of the MMD² test; the smallest p-value is 1/(N+1) (default: 200)")
    parser.add_argument("--max-per-set", type=int, default=1000,
                        help="windows per set at most for the discriminator and MMD², subsampled (default: 1000)")
    parser.add_argument("--nearest-k", type=int, default=quality.NEAREST_K,
                        help=f"k of the k-NN balls for precision, recall, density and coverage "
                             f"(default: {quality.NEAREST_K})")
    parser.add_argument("--embedding-samples", type=int, default=300,
                        help="windows per group at most in the PCA and t-SNE figure (default: 300)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures (metrics and tables only)")
    parser.set_defaults(handler=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    for module in ("sklearn", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(
                f"the report needs {module}, which is not installed; install the training extras "
                "with pip install 'anomalyforge[train]'"
            )
    if not args.run_dir.is_dir():
        raise InvalidInputError(f"run directory {args.run_dir} not found or not a directory; pass the "
                                "directory written by anomalyforge demo")
    for option, value, minimum in (("--permutations", args.permutations, 1), ("--max-per-set", args.max_per_set, 10),
                                   ("--nearest-k", args.nearest_k, 1), ("--embedding-samples", args.embedding_samples, 10)):
        if value < minimum:
            raise InvalidInputError(f"{option} must be at least {minimum}, got {value}")
    settings = ReportSettings(seed=args.seed, n_permutations=args.permutations, max_per_set=args.max_per_set,
                              nearest_k=args.nearest_k, embedding_per_group=args.embedding_samples,
                              figures=not args.no_figures)
    output_dir = args.run_dir / REPORT_DIR if args.output is None else args.output
    metrics = build_report(args.run_dir, output_dir, settings)
    print(format_report_summary(metrics))
    print(f"\nReport: {output_dir / 'report.html'}")
    return 0
