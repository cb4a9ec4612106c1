"""``anomalyforge experiment``: a resumable sweep over k, generators, detectors and seeds.

The sweep covers every seed, every k (number of real training anomalies) and every
generator. In each cell it trains detectors on ECG5000 TRAIN data and calibrates a threshold
for ``target_fpr`` on normal scores that no scoring model trained on. It then evaluates the
detector once on the held-out TEST split.

Work is shared where the inputs allow it:

- the autoencoder and the nearest-neighbour baseline depend only on the normals, which the
  split draws from the seed alone, so they are trained once per seed;
- the PCA baseline (its component count is chosen on the k anomalies) and each generator
  are fitted once per (k, seed);
- a classifier is trained once per (k, generator, seed). Generator ``none`` gives the
  real-only classifier that every other row is compared with;
- the combined detector reuses the stored autoencoder and classifier scores.

Every finished unit is stored under the run directory as a JSON record plus an ``.npz``
file of its scores or windows, and a later run with the same settings loads it instead of
recomputing it. Calibration uses ``n_folds`` out-of-fold refits (3 by default, against 5 in
the demo) to keep the sweep affordable. The autoencoder and the classifiers of one seed
share the same folds, so the combined detector's calibration scores also come from models
that did not train on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from anomalyforge.errors import InvalidInputError

logger = logging.getLogger(__name__)

GENERATORS = ("none", "augment", "cvae", "gan")
DETECTORS = ("autoencoder", "classifier", "combined")
DEFAULT_KS = (1, 5, 10, 20, 50)
RARE_CLASSES = ("3", "4", "5")
ALL_CLASSES = ("2", "3", "4", "5")
# Epochs (or generator steps for the GAN) per model at each --epochs-scale. "small" exists
# for tests and smoke runs, and its numbers mean nothing.
EPOCH_SCALES = {
    "full": {"autoencoder": 80, "classifier": 25, "cvae": 150, "gan": 300},
    "small": {"autoencoder": 3, "classifier": 2, "cvae": 4, "gan": 6},
}
# Settings that change stored cells. A run directory keeps the values it was created with.
CELL_SETTINGS = ("n_synthetic", "n_folds", "target_fpr", "epochs_scale", "validity_filter", "quality")
# Real TEST anomalies per class used as the reference of the quality metrics (a measurement only).
QUALITY_REFERENCE_SIZE = 300
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
PLOT_FILE = "recall_vs_k.png"


@dataclass
class SweepConfig:
    """Settings of one sweep; see ``anomalyforge experiment --help`` for each."""

    run_dir: Path
    ks: tuple = DEFAULT_KS
    generators: tuple = GENERATORS
    detectors: tuple = DETECTORS
    seeds: tuple = (0, 1, 2, 3, 4)
    n_synthetic: int = 1000
    n_folds: int = 3
    target_fpr: float = 0.01
    epochs_scale: str = "full"
    validity_filter: bool = True
    quality: bool = True
    plot: bool = True

    def validate(self) -> None:
        """Raise InvalidInputError naming the first invalid setting."""
        unknown = sorted(set(self.generators) - set(GENERATORS))
        if unknown or not self.generators:
            raise InvalidInputError(f"unknown generators {unknown}; choose from {list(GENERATORS)}")
        unknown = sorted(set(self.detectors) - set(DETECTORS))
        if unknown or not self.detectors:
            raise InvalidInputError(f"unknown detectors {unknown}; choose from {list(DETECTORS)}")
        if not self.ks or min(self.ks) < 1:
            raise InvalidInputError(f"every k must be at least 1, got {list(self.ks)}")
        if not self.seeds:
            raise InvalidInputError("the seed list is empty; pass at least one seed")
        if self.n_synthetic < 1 or self.n_folds < 2:
            raise InvalidInputError(f"n_synthetic must be >= 1 and n_folds >= 2, got {self.n_synthetic} "
                                    f"and {self.n_folds}")
        if not 0.0 < self.target_fpr < 1.0:
            raise InvalidInputError(f"target_fpr must lie in (0, 1), got {self.target_fpr}")
        if self.epochs_scale not in EPOCH_SCALES:
            raise InvalidInputError(f"epochs_scale {self.epochs_scale!r} is unknown; choose from {list(EPOCH_SCALES)}")

    def cell_settings(self) -> dict:
        return {name: getattr(self, name) for name in CELL_SETTINGS}


# ---------------------------------------------------------------- storage and progress


class CellStore:
    """JSON records plus ``.npz`` arrays under the run directory, with counts of what was computed.

    A cell counts as finished when its JSON file exists. The arrays are written first and
    each file is renamed into place, so an interrupted run never leaves a JSON record
    without its arrays.
    """

    def __init__(self, run_dir: Path, planned: Counter):
        self.run_dir = Path(run_dir)
        self.computed: Counter = Counter()
        self.loaded: Counter = Counter()
        self.planned = planned
        self.total_cells = sum(planned.values())
        self.done_cells = 0
        self.seconds_by_kind: Counter = Counter()
        self.started = time.perf_counter()

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.run_dir / f"{name}.json", self.run_dir / f"{name}.npz"

    def get(self, name: str, kind: str, compute) -> tuple[dict, dict]:
        """Return the stored (record, arrays) of cell ``name``, computing and storing it if missing.

        ``compute()`` returns (record, arrays): a JSON-serialisable dict and a dict of numpy arrays.
        """
        json_path, npz_path = self.paths(name)
        if json_path.exists():
            record = json.loads(json_path.read_text(encoding="utf-8"))
            with np.load(npz_path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            self.loaded[kind] += 1
            self.advance(name, None)
            return record, arrays

        started = time.perf_counter()
        record, arrays = compute()
        seconds = time.perf_counter() - started
        record["seconds"] = round(seconds, 2)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = npz_path.with_name(npz_path.stem + ".tmp.npz")
        np.savez_compressed(temporary, **arrays)
        temporary.replace(npz_path)
        temporary = json_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        temporary.replace(json_path)
        self.computed[kind] += 1
        self.seconds_by_kind[kind] += seconds
        self.advance(name, seconds)
        return record, arrays

    def advance(self, name: str, seconds: float | None) -> None:
        """Log one finished cell with the elapsed time and an ETA for the cells still to come."""
        self.done_cells += 1
        if seconds is None:
            logger.debug("cell %d/%d %s loaded from an earlier run", self.done_cells, self.total_cells, name)
            return
        logger.info("cell %d/%d %s computed in %.1f s; elapsed %.0f s, ETA %.0f s", self.done_cells,
                    self.total_cells, name, seconds, time.perf_counter() - self.started, self.eta_seconds())

    def eta_seconds(self) -> float:
        """Estimate the remaining time: mean seconds per computed cell of each kind times the cells left.

        A kind not computed yet counts at the mean over all computed cells. Cells that a
        resumed run will load count as cells left too, so the estimate is an upper bound there.
        """
        n_computed = sum(self.computed.values())
        overall = sum(self.seconds_by_kind.values()) / n_computed if n_computed else 0.0
        remaining = 0.0
        for kind, planned in self.planned.items():
            left = planned - self.computed[kind] - self.loaded[kind]
            mean = self.seconds_by_kind[kind] / self.computed[kind] if self.computed[kind] else overall
            remaining += max(left, 0) * mean
        return remaining


def planned_cells(config: SweepConfig) -> Counter:
    """Number of cells of each kind that the sweep visits (computed or loaded)."""
    n_seeds, n_ks = len(config.seeds), len(config.ks)
    planned = Counter({"autoencoder": n_seeds, "nearest_neighbour": n_seeds, "pca": n_seeds * n_ks})
    for name in config.generators:
        if name != "none":
            planned[f"generator-{name}"] = n_seeds * n_ks
    if "classifier" in config.detectors or "combined" in config.detectors:
        planned["classifier"] = n_seeds * n_ks * len(config.generators)
    if "combined" in config.detectors:
        planned["combined"] = n_seeds * n_ks * len(config.generators)
    return planned


def count_cells(config: SweepConfig) -> int:
    """Number of cells the sweep visits (computed or loaded)."""
    return sum(planned_cells(config).values())


# ---------------------------------------------------------------- models


def epochs_for(config: SweepConfig) -> dict:
    return EPOCH_SCALES[config.epochs_scale]


def nearest_neighbour_detector(normals: np.ndarray):
    """Return a torch module scoring each window by its Euclidean distance to the nearest of ``normals``."""
    import torch
    from torch import nn

    class NearestNeighbourDistance(nn.Module):
        """Distance from each (batch, length) window to the closest stored normal window."""

        def __init__(self, reference: np.ndarray):
            super().__init__()
            self.register_buffer("reference", torch.as_tensor(np.asarray(reference, dtype=np.float32)))

        def forward(self, window: torch.Tensor) -> torch.Tensor:
            return torch.cdist(window, self.reference).amin(dim=1)

    return NearestNeighbourDistance(normals).eval()


def make_generator(name: str, config: SweepConfig):
    """Return an unfitted generator of the given name with the sweep's epoch scale."""
    epochs = epochs_for(config)
    if name == "augment":
        from anomalyforge.training.augment import AugmentGenerator

        return AugmentGenerator()
    if name == "cvae":
        from anomalyforge.training.generators import CVAEConfig, CVAEGenerator

        return CVAEGenerator(CVAEConfig(epochs=epochs["cvae"]))
    if name == "gan":
        from anomalyforge.training.gan import GANConfig, GANGenerator

        return GANGenerator(GANConfig(generator_steps=epochs["gan"]))
    raise InvalidInputError(f"generator {name!r} is unknown; choose from {list(GENERATORS[1:])}")


def detector_cell(fit, split, config: SweepConfig, seed: int) -> tuple[dict, dict]:
    """Fit a detector, collect its calibration scores, set the threshold and evaluate it on TEST."""
    from anomalyforge.training.detectors import calibration_scores
    from anomalyforge.training.fitting import score_windows

    module = fit(split.normal_train, seed)
    calibration = calibration_scores(fit, module, split.normal_train, split.normal_val,
                                     n_folds=config.n_folds, seed=seed)
    test_scores = score_windows(module, split.test.x)
    record = evaluate_cell(test_scores, calibration.scores, split, config)
    record["calibration_data"] = calibration.describe()
    return record, {"test_scores": test_scores, "calibration_scores": calibration.scores}


def evaluate_cell(test_scores: np.ndarray, calibration: np.ndarray, split, config: SweepConfig) -> dict:
    from anomalyforge.thresholds import calibrate_threshold
    from anomalyforge.training.evaluation import evaluate_scores

    threshold = calibrate_threshold(calibration, config.target_fpr)
    evaluation = evaluate_scores(test_scores, split.test.y, split.normal_class, threshold.value,
                                 diagnostic_fpr=config.target_fpr)
    return {"evaluation": evaluation, "threshold": threshold.to_dict()}


def combined_cell(autoencoder_arrays: dict, classifier_arrays: dict, split, config: SweepConfig):
    """Evaluate autoencoder + classifier, each standardised on its calibration (normal) scores."""
    from anomalyforge.training.combined import combine_scores, fit_standardisation

    autoencoder = fit_standardisation(autoencoder_arrays["calibration_scores"], "autoencoder")
    classifier = fit_standardisation(classifier_arrays["calibration_scores"], "classifier")
    calibration = combine_scores(autoencoder_arrays["calibration_scores"], classifier_arrays["calibration_scores"],
                                 autoencoder, classifier)
    test_scores = combine_scores(autoencoder_arrays["test_scores"], classifier_arrays["test_scores"],
                                 autoencoder, classifier)
    record = evaluate_cell(test_scores, calibration, split, config)
    record["standardisation"] = {"autoencoder": asdict(autoencoder), "classifier": asdict(classifier)}
    return record, {"test_scores": test_scores, "calibration_scores": calibration}


def generator_cell(name: str, split, config: SweepConfig, seed: int) -> tuple[dict, dict]:
    """Fit one generator, sample (and filter) its synthetic anomalies, and measure their quality."""
    from anomalyforge.training.filters import sample_valid

    started = time.perf_counter()
    generator = make_generator(name, config).fit(split.normal_train, split.anomalies, split.anomaly_classes, seed)
    fit_seconds = time.perf_counter() - started
    if config.validity_filter:
        windows, labels, report = sample_valid(generator, config.n_synthetic, seed, split.normal_train,
                                               split.anomalies, split.anomaly_classes)
        filter_record = report.to_dict()
    else:
        windows, labels = generator.sample(config.n_synthetic, seed=seed)
        filter_record = None
    record = {"generator": name, "fit_seconds": round(fit_seconds, 2), "n_windows": int(len(windows)),
              "filter": filter_record, "has_decoder": generator.decoder is not None}
    if config.quality and len(windows):
        record["quality"] = generator_quality(windows, labels, split, seed)
    return record, {"windows": np.asarray(windows, dtype=np.float32), "labels": np.asarray(labels, dtype=np.int64)}


def generator_quality(windows: np.ndarray, labels: np.ndarray, split, seed: int) -> dict:
    """Coverage, near-duplicate share and near-copy share per class, against real TEST anomalies.

    TEST anomalies are only measured here, never used to choose anything.
    """
    from anomalyforge.training.quality import NEAREST_K, diversity_summary, memorisation_summary

    rng = np.random.default_rng(seed)
    per_class = {}
    for label in np.unique(labels):
        synthetic = windows[labels == label]
        reference = split.test.x[split.test.y == label]
        if len(reference) > QUALITY_REFERENCE_SIZE:
            reference = reference[np.sort(rng.choice(len(reference), QUALITY_REFERENCE_SIZE, replace=False))]
        if len(synthetic) <= NEAREST_K or len(reference) <= NEAREST_K:
            continue
        diversity = diversity_summary(reference, synthetic)
        memorisation = memorisation_summary(split.anomalies[split.anomaly_classes == label], synthetic, reference)
        per_class[str(int(label))] = {
            "precision": diversity["precision"], "coverage": diversity["coverage"],
            "near_duplicate_share": diversity["near_duplicate_share"], "mode_collapse": diversity["mode_collapse"],
            "near_copy_share": memorisation["near_copy_share"],
        }
    if not per_class:
        return {"per_class": {}}
    mean = {metric: float(np.mean([entry[metric] for entry in per_class.values()]))
            for metric in ("precision", "coverage", "near_duplicate_share", "near_copy_share")}
    mean["classes_with_mode_collapse"] = [label for label, entry in per_class.items() if entry["mode_collapse"]]
    return {"per_class": per_class, "mean": mean}


# ---------------------------------------------------------------- the sweep


def check_run_dir(config: SweepConfig) -> None:
    """Create the run directory, or check that its stored settings match this sweep's."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings_path = run_dir / "sweep_settings.json"
    settings = config.cell_settings()
    if settings_path.exists():
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
        different = {name: (stored.get(name), value) for name, value in settings.items() if stored.get(name) != value}
        if different:
            raise InvalidInputError(
                f"run directory {run_dir} contains cells computed with other settings (stored, requested): "
                f"{different}; choose another --run-dir or repeat the stored settings"
            )
    else:
        settings_path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def run_sweep(config: SweepConfig) -> dict:
    """Run (or resume) the sweep and write the summary, table and plot; return the summary.

    Sets torch to one intra-op thread for the whole process and leaves it there.
    """
    import torch

    from anomalyforge.training.datasets import load_ecg5000
    from anomalyforge.training.detectors import AutoencoderConfig, ClassifierConfig, fit_autoencoder, fit_classifier, fit_pca
    from anomalyforge.training.experiment import prepare
    from anomalyforge.training.splits import few_shot_split

    config.validate()
    # Tiny models: one intra-op thread is as fast as two on an idle machine and many times
    # faster when other processes compete for the cores.
    torch.set_num_threads(1)
    check_run_dir(config)
    epochs = epochs_for(config)
    autoencoder_config = AutoencoderConfig(epochs=epochs["autoencoder"])
    classifier_config = ClassifierConfig(epochs=epochs["classifier"])
    store = CellStore(config.run_dir, planned_cells(config))
    train, test = load_ecg5000()
    need_classifier = "classifier" in config.detectors or "combined" in config.detectors
    cells: dict[str, dict] = {}
    logger.info("sweep: %d cells over k %s, generators %s, detectors %s, seeds %s (%d out-of-fold refits)",
                store.total_cells, list(config.ks), list(config.generators), list(config.detectors),
                list(config.seeds), config.n_folds)

    for seed in config.seeds:
        # The split draws the normal train / validation partition from the seed before it
        # draws anomalies, so every k of one seed shares the normals checked below.
        normal_split = prepare(few_shot_split(train, test, min(config.ks), seed=seed))

        def fit_ae(normals, fit_seed):
            return fit_autoencoder(normals, fit_seed, autoencoder_config)

        def fit_nn(normals, fit_seed):
            return nearest_neighbour_detector(normals)

        ae_record, ae_arrays = store.get(f"seed-{seed}/autoencoder", "autoencoder",
                                         lambda: detector_cell(fit_ae, normal_split, config, seed))
        cells[f"autoencoder/{seed}"] = ae_record
        nn_record, _ = store.get(f"seed-{seed}/nearest_neighbour", "nearest_neighbour",
                                 lambda: detector_cell(fit_nn, normal_split, config, seed))
        cells[f"nearest_neighbour/{seed}"] = nn_record

        for k in config.ks:
            split = prepare(few_shot_split(train, test, k, seed=seed))
            if not np.array_equal(split.normal_train, normal_split.normal_train):
                raise RuntimeError(f"the normals of seed {seed} differ between k values; the per-seed "
                                   "autoencoder cannot be shared")
            prefix = f"k-{k}/seed-{seed}"
            n_components = fit_pca(split.normal_train, validation_normals=split.normal_val,
                                   validation_anomalies=split.anomalies).components.shape[0]

            def fit_pca_fixed(normals, fit_seed, count=n_components):
                return fit_pca(normals, n_components=count)

            pca_record, _ = store.get(f"{prefix}/pca", "pca", lambda: detector_cell(fit_pca_fixed, split, config, seed))
            cells[f"pca/{k}/{seed}"] = pca_record

            for generator_name in config.generators:
                synthetic = None
                if generator_name != "none":
                    generator_record, generator_arrays = store.get(
                        f"{prefix}/generator-{generator_name}", f"generator-{generator_name}",
                        lambda: generator_cell(generator_name, split, config, seed))
                    cells[f"generator/{k}/{generator_name}/{seed}"] = generator_record
                    synthetic = generator_arrays["windows"]
                if not need_classifier:
                    continue

                def fit_clf(normals, fit_seed, anomalies=split.anomalies, synthetic=synthetic):
                    return fit_classifier(normals, anomalies, synthetic, fit_seed, classifier_config)

                classifier_record, classifier_arrays = store.get(
                    f"{prefix}/classifier-{generator_name}", "classifier",
                    lambda: detector_cell(fit_clf, split, config, seed))
                cells[f"classifier/{k}/{generator_name}/{seed}"] = classifier_record
                if "combined" in config.detectors:
                    combined_record, _ = store.get(
                        f"{prefix}/combined-{generator_name}", "combined",
                        lambda: combined_cell(ae_arrays, classifier_arrays, split, config))
                    cells[f"combined/{k}/{generator_name}/{seed}"] = combined_record

    summary = summarise(cells, config)
    summary["counts"] = {"computed": dict(store.computed), "loaded": dict(store.loaded)}
    summary["seconds"] = round(time.perf_counter() - store.started, 1)
    write_outputs(summary, config)
    logger.info("sweep finished in %.0f s: computed %s, loaded %s", summary["seconds"], dict(store.computed),
                dict(store.loaded))
    return summary


# ---------------------------------------------------------------- summary


def metric_values(record: dict) -> dict:
    """Flatten one detector record into the metrics the summary aggregates."""
    evaluation = record["evaluation"]
    diagnostic = evaluation["diagnostic_recall_at_test_fpr"]
    values = {
        "roc_auc": evaluation["roc_auc"],
        "pr_auc": evaluation["pr_auc"],
        "recall_at_1pct": diagnostic["recall"],
        "recall": evaluation["recall"],
        "fpr": evaluation["fpr"],
    }
    for label in ALL_CLASSES:
        values[f"recall_at_1pct_class_{label}"] = diagnostic["recall_per_class"].get(label, float("nan"))
        values[f"recall_class_{label}"] = evaluation["recall_per_class"].get(label, float("nan"))
    return values


def mean_std(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def summarise(cells: dict[str, dict], config: SweepConfig) -> dict:
    """Aggregate cells into rows (mean, sample std over seeds) and paired differences against real-only."""
    rows = []
    per_seed: dict[tuple, dict[int, dict]] = {}
    for k in config.ks:
        row_keys = [("autoencoder", "-", "autoencoder/{seed}"), ("pca", "-", f"pca/{k}/{{seed}}"),
                    ("nearest_neighbour", "-", "nearest_neighbour/{seed}")]
        for detector in ("classifier", "combined"):
            if detector in config.detectors:
                row_keys += [(detector, name, f"{detector}/{k}/{name}/{{seed}}") for name in config.generators]
        for detector, generator, pattern in row_keys:
            seeds = {seed: metric_values(cells[pattern.format(seed=seed)]) for seed in config.seeds
                     if pattern.format(seed=seed) in cells}
            if not seeds:
                continue
            per_seed[(k, detector, generator)] = seeds
            metrics = {name: mean_std([values[name] for values in seeds.values()]) for name in next(iter(seeds.values()))}
            rows.append({"k": k, "detector": detector, "generator": generator, "metrics": metrics})

    compared = ["recall_at_1pct"] + [f"recall_at_1pct_class_{label}" for label in RARE_CLASSES] + ["recall", "roc_auc"]
    for row in rows:
        baseline = per_seed.get((row["k"], "classifier", "none"))
        own = per_seed[(row["k"], row["detector"], row["generator"])]
        if baseline is None or (row["detector"], row["generator"]) == ("classifier", "none"):
            continue
        shared = sorted(set(own) & set(baseline))
        row["difference_vs_real_only"] = {}
        for name in compared:
            differences = np.array([own[seed][name] - baseline[seed][name] for seed in shared])
            entry = mean_std(differences.tolist())
            entry["seeds_better"] = int((differences > 0).sum())
            entry["seeds_worse"] = int((differences < 0).sum())
            row["difference_vs_real_only"][name] = entry

    generators = []
    for k in config.ks:
        for name in config.generators:
            records = [cells[key] for seed in config.seeds if (key := f"generator/{k}/{name}/{seed}") in cells]
            if not records:
                continue
            entry = {"k": k, "generator": name, "n_seeds": len(records),
                     "fit_seconds": mean_std([record["fit_seconds"] for record in records]),
                     "n_windows": mean_std([record["n_windows"] for record in records])}
            if all(record["filter"] for record in records):
                entry["filter_dropped_share"] = mean_std([record["filter"]["dropped_share"] for record in records])
                entry["filter_other_class_share"] = mean_std(
                    [record["filter"]["other_class_nearest"] / record["filter"]["n_candidates"] for record in records])
            qualities = [record["quality"]["mean"] for record in records if record.get("quality", {}).get("mean")]
            if qualities:
                entry["quality"] = {metric: mean_std([quality[metric] for quality in qualities])
                                    for metric in ("precision", "coverage", "near_duplicate_share", "near_copy_share")}
                entry["quality"]["seeds_with_mode_collapse"] = sum(
                    1 for quality in qualities if quality["classes_with_mode_collapse"])
            generators.append(entry)
    return {"settings": {key: (str(value) if isinstance(value, Path) else value)
                         for key, value in asdict(config).items()},
            "rows": rows, "generators": generators}


def format_cell(entry: dict, digits: int = 3) -> str:
    # A standard deviation over one seed is undefined, so only the mean is shown then.
    if entry.get("n", 2) < 2:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def format_difference(entry: dict) -> str:
    return f"{entry['mean']:+.3f} ({entry['seeds_better']}/{entry['n']})"


def format_tables(summary: dict) -> str:
    """Render the summary as Markdown tables: detectors, paired differences, generator quality."""
    settings = summary.get("settings", {})
    setting_names = ("ks", "generators", "detectors", "seeds", "n_synthetic", "n_folds", "target_fpr",
                     "epochs_scale", "validity_filter")
    lines = ["# Few-shot sweep on ECG5000 (held-out TEST)", "",
             "Settings: " + ", ".join(f"{name} = {settings[name]}" for name in setting_names if name in settings)
             + ". Cells are mean ± standard deviation over seeds.", "",
             "## Detectors", "",
             "| k | detector | generator | ROC-AUC | PR-AUC | recall@1% | class 2 | class 3 | class 4 | class 5 "
             "| recall (calibrated) | FPR (calibrated) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        metrics = row["metrics"]
        classes = " | ".join(format_cell(metrics[f"recall_at_1pct_class_{label}"], 2) for label in ALL_CLASSES)
        lines.append(f"| {row['k']} | {row['detector']} | {row['generator']} | {format_cell(metrics['roc_auc'])} | "
                     f"{format_cell(metrics['pr_auc'])} | {format_cell(metrics['recall_at_1pct'])} | {classes} | "
                     f"{format_cell(metrics['recall'])} | {format_cell(metrics['fpr'], 4)} |")
    lines += ["", "## Paired differences against the real-only classifier", "",
              "Same k and seed: mean difference "
              "(seeds better / seeds compared).", "",
              "| k | detector | generator | recall@1% | class 3 | class 4 | class 5 | recall (calibrated) | ROC-AUC |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        differences = row.get("difference_vs_real_only")
        if not differences:
            continue
        cells = [differences["recall_at_1pct"]] + [differences[f"recall_at_1pct_class_{label}"] for label in RARE_CLASSES]
        cells += [differences["recall"], differences["roc_auc"]]
        lines.append(f"| {row['k']} | {row['detector']} | {row['generator']} | "
                     + " | ".join(format_difference(entry) for entry in cells) + " |")
    if summary["generators"]:
        lines += ["", "## Generators: filter and quality", "", "| k | generator | fit s | windows kept | dropped by filter | nearest real anomaly of another class "
                  "| precision | coverage | near-duplicates | near-copies |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for entry in summary["generators"]:
            quality = entry.get("quality", {})
            parts = [format_cell(entry["fit_seconds"], 1), format_cell(entry["n_windows"], 0)]
            parts += [format_cell(entry[name], 2) if name in entry else "n/a"
                      for name in ("filter_dropped_share", "filter_other_class_share")]
            parts += [format_cell(quality[name], 2) if name in quality else "n/a"
                      for name in ("precision", "coverage", "near_duplicate_share", "near_copy_share")]
            lines.append(f"| {entry['k']} | {entry['generator']} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot_recall_vs_k(summary: dict, path: Path) -> None:
    """Plot recall at 1 % TEST FPR against k, overall and for classes 3-5, one line per generator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("recall_at_1pct", "all anomalies")] + [(f"recall_at_1pct_class_{label}", f"class {label}")
                                                     for label in RARE_CLASSES]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True)
    styles = {"classifier": "-", "combined": "--"}
    for axis, (metric, title) in zip(axes, panels):
        series: dict[tuple, list] = {}
        for row in summary["rows"]:
            if row["detector"] in styles:
                series.setdefault((row["detector"], row["generator"]), []).append((row["k"], row["metrics"][metric]))
            elif row["detector"] == "autoencoder":
                series.setdefault(("autoencoder", "-"), []).append((row["k"], row["metrics"][metric]))
        for (detector, generator), points in series.items():
            ks = [k for k, _ in points]
            means = np.array([entry["mean"] for _, entry in points])
            stds = np.array([entry["std"] for _, entry in points])
            label = detector if generator == "-" else f"{detector}, {generator}"
            axis.errorbar(ks, means, yerr=stds, linestyle=styles.get(detector, ":"), marker="o", markersize=3,
                          capsize=2, label=label)
        axis.set_xscale("log")
        axis.set_xlabel("k real training anomalies")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("recall at 1 % TEST FPR (mean ± std)")
    axes[-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(summary: dict, config: SweepConfig) -> None:
    run_dir = Path(config.run_dir)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (run_dir / TABLE_FILE).write_text(format_tables(summary) + "\n", encoding="utf-8")
    if config.plot:
        plot_recall_vs_k(summary, run_dir / PLOT_FILE)
    logger.info("wrote %s, %s%s", run_dir / SUMMARY_FILE, run_dir / TABLE_FILE,
                f" and {run_dir / PLOT_FILE}" if config.plot else "")


# ---------------------------------------------------------------- command line


def add_experiment_command(subparsers) -> None:
    """Register ``anomalyforge experiment`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "experiment",
        help="sweep k, generators, detectors and seeds on ECG5000 (resumable)",
        description=(
            "Train and evaluate detectors on ECG5000 for every k (real training anomalies), generator "
            "(none, augment, cvae, gan), detector (autoencoder, classifier, combined) and seed, with PCA and "
            "nearest-neighbour baselines. Finished cells are stored in the run directory and reused by a "
            "later run with the same settings. Writes summary.json, summary.md and recall_vs_k.png."
        ),
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/experiment"),
                        help="output directory; an existing one is resumed (default: runs/experiment)")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS),
                        help="numbers of real training anomalies (default: 1 5 10 20 50)")
    parser.add_argument("--generators", nargs="+", choices=GENERATORS, default=list(GENERATORS),
                        help="synthetic-anomaly generators; none = real anomalies only (default: all)")
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS),
                        help="detectors (default: all); PCA and nearest-neighbour baselines always run")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default: 5)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first-seed, first-seed + 1, ... (default: 0)")
    parser.add_argument("--synthetic", type=int, default=1000,
                        help="synthetic anomalies per generator and cell after filtering (default: 1000)")
    parser.add_argument("--folds", type=int, default=3,
                        help="out-of-fold refits per detector for threshold calibration (default: 3)")
    parser.add_argument("--target-fpr", type=float, default=0.01,
                        help="false-positive rate the thresholds are set for (default: 0.01)")
    parser.add_argument("--epochs-scale", choices=sorted(EPOCH_SCALES), default="full",
                        help="training length: full, or small for smoke tests (default: full)")
    parser.add_argument("--no-filter", action="store_true",
                        help="keep synthetic anomalies that lie closer to a normal beat than to any real anomaly")
    parser.add_argument("--no-quality", action="store_true", help="skip the per-generator quality metrics")
    parser.add_argument("--no-plot", action="store_true", help="skip recall_vs_k.png")
    parser.set_defaults(handler=run_experiment_command)


def run_experiment_command(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise InvalidInputError(f"--seeds must be at least 1, got {args.seeds}")
    config = SweepConfig(
        run_dir=args.run_dir, ks=tuple(args.k), generators=tuple(dict.fromkeys(args.generators)),
        detectors=tuple(dict.fromkeys(args.detectors)),
        seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)), n_synthetic=args.synthetic,
        n_folds=args.folds, target_fpr=args.target_fpr, epochs_scale=args.epochs_scale,
        validity_filter=not args.no_filter, quality=not args.no_quality, plot=not args.no_plot,
    )
    summary = run_sweep(config)
    print(format_tables(summary))
    print(f"\nSummary: {Path(args.run_dir) / SUMMARY_FILE}  ({summary['seconds']:.0f} s; computed "
          f"{sum(summary['counts']['computed'].values())} cells, loaded {sum(summary['counts']['loaded'].values())})")
    return 0
