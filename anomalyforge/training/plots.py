"""Figures of the synthetic-data quality report (matplotlib, Agg canvas, PNG files).

Every function draws on a :class:`matplotlib.figure.Figure` without pyplot, so no GUI
backend or global figure state is involved, writes one PNG to ``path`` and returns the path.
matplotlib is imported inside the functions because it belongs to the ``train`` extra only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from anomalyforge.errors import MissingDependencyError

logger = logging.getLogger(__name__)

DPI = 100
REAL_COLOUR = "#1f77b4"
NORMAL_COLOUR = "#7f7f7f"
GENERATOR_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def new_figure(width: float, height: float):
    """Return a pyplot-free figure with an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError(
            "the quality report's figures need matplotlib; install it with pip install 'anomalyforge[train]'"
        ) from error
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    logger.debug("wrote %s", path)
    return path


def generator_colour(index: int) -> str:
    return GENERATOR_COLOURS[index % len(GENERATOR_COLOURS)]


def plot_class_overlays(real_by_class: dict, synthetic_by_class: dict, generator: str, path,
                        n_lines: int = 8, seed: int = 0, colour: str = GENERATOR_COLOURS[0]) -> Path:
    """Draw real and synthetic windows per anomaly class: overlays on top, mean ± std bands below.

    ``real_by_class`` and ``synthetic_by_class`` map a class label to an (n, length) array.
    The top row shows ``n_lines`` random windows of each set (seeded); the bottom row shows
    the per-time-step mean and a band of one standard deviation either side.
    """
    classes = [label for label in synthetic_by_class if label in real_by_class]
    figure = new_figure(3.2 * max(1, len(classes)), 5.6)
    axes = figure.subplots(2, max(1, len(classes)), squeeze=False, sharex=True)
    rng = np.random.default_rng(seed)
    for column, label in enumerate(classes):
        real, synthetic = np.asarray(real_by_class[label]), np.asarray(synthetic_by_class[label])
        steps = np.arange(real.shape[1])
        top, bottom = axes[0, column], axes[1, column]
        for windows, line_colour, name in ((real, REAL_COLOUR, "real"), (synthetic, colour, generator)):
            chosen = rng.choice(len(windows), size=min(n_lines, len(windows)), replace=False)
            for number, row in enumerate(chosen):
                top.plot(steps, windows[row], color=line_colour, linewidth=0.7, alpha=0.6,
                         label=name if number == 0 else None)
            mean, std = windows.mean(axis=0), windows.std(axis=0)
            bottom.plot(steps, mean, color=line_colour, linewidth=1.5, label=f"{name} mean")
            bottom.fill_between(steps, mean - std, mean + std, color=line_colour, alpha=0.2)
        top.set_title(f"class {label}: {len(real)} real, {len(synthetic)} synthetic", fontsize=9)
        bottom.set_xlabel("sample")
    axes[0, 0].set_ylabel("z-normalised amplitude")
    axes[1, 0].set_ylabel("mean ± 1 std")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[1, 0].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"Real held-out anomalies vs {generator} samples", fontsize=11)
    return save(figure, path)


def plot_embeddings(groups: dict, path, seed: int = 0, max_per_group: int = 300,
                    tsne_perplexity: float = 30.0) -> Path:
    """Draw PCA and t-SNE embeddings of labelled groups of windows side by side.

    ``groups`` maps a legend label to an (n, length) array; each group is subsampled to
    ``max_per_group`` windows (seeded) to keep t-SNE fast. PCA is fitted on the groups whose
    label starts with "real" only, so synthetic windows are placed in the real data's axes.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    names, parts = [], []
    for name, windows in groups.items():
        windows = np.asarray(windows, dtype=np.float64)
        if len(windows) > max_per_group:
            windows = windows[rng.choice(len(windows), size=max_per_group, replace=False)]
        names.extend([name] * len(windows))
        parts.append(windows)
    data = np.vstack(parts)
    names = np.array(names)
    is_real = np.char.startswith(names, "real")
    pca = PCA(n_components=2, random_state=seed).fit(data[is_real] if is_real.any() else data)
    embedded_pca = pca.transform(data)
    perplexity = min(tsne_perplexity, (len(data) - 1) / 3.0)
    # 500 iterations instead of the default 1000 halve the time. The figure is a visual aid, so a
    # layout short of full convergence is acceptable. scikit-learn renamed n_iter to max_iter in 1.5.
    iterations_key = "max_iter" if "max_iter" in TSNE().get_params() else "n_iter"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, **{iterations_key: 500})
    embedded_tsne = tsne.fit_transform(data)

    figure = new_figure(11.0, 4.8)
    axes = figure.subplots(1, 2)
    colours = {}
    generator_index = 0
    for name in groups:
        if name == "real normal":
            colours[name] = NORMAL_COLOUR
        elif name.startswith("real"):
            colours[name] = REAL_COLOUR
        else:
            colours[name] = generator_colour(generator_index)
            generator_index += 1
    for axis, points, title in ((axes[0], embedded_pca, "PCA (fitted on real windows)"),
                                (axes[1], embedded_tsne, f"t-SNE (perplexity {perplexity:.0f})")):
        for name in groups:
            chosen = names == name
            axis.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.55, color=colours[name],
                         label=f"{name} ({int(chosen.sum())})")
        axis.set_title(title, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0].legend(fontsize=8, markerscale=2.5, loc="best")
    return save(figure, path)


def plot_score_histograms(scores: dict, thresholds: dict, path, bins: int = 50) -> Path:
    """Draw one histogram panel per detector with a curve per group of windows.

    ``scores`` maps a detector name to {group label: (n,) scores}; ``thresholds`` maps a
    detector name to its calibrated threshold (drawn as a dashed line when given).
    Densities are normalised per group, so groups of different sizes compare directly.
    """
    detectors = list(scores)
    columns = min(2, max(1, len(detectors)))
    rows = int(np.ceil(len(detectors) / columns)) if detectors else 1
    figure = new_figure(5.5 * columns, 3.4 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axis, detector in zip(axes, detectors):
        groups = scores[detector]
        pooled = np.concatenate([np.asarray(values, dtype=np.float64) for values in groups.values()])
        low, high = np.quantile(pooled, [0.005, 0.995])
        edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
        generator_index = 0
        for label, values in groups.items():
            if label == "real normal":
                colour = NORMAL_COLOUR
            elif label.startswith("real"):
                colour = REAL_COLOUR
            else:
                colour = generator_colour(generator_index)
                generator_index += 1
            clipped = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
            axis.hist(clipped, bins=edges, density=True, histtype="step", linewidth=1.4, color=colour,
                      label=f"{label} ({len(values)})")
        threshold = thresholds.get(detector)
        if threshold is not None and edges[0] <= threshold <= edges[-1]:
            axis.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
        axis.set_title(detector, fontsize=10)
        axis.set_xlabel("score (clipped to the 0.5-99.5 % range)", fontsize=8)
        axis.set_ylabel("density", fontsize=8)
        axis.legend(fontsize=7)
    for axis in axes[len(detectors):]:
        axis.set_visible(False)
    return save(figure, path)


def plot_roc_curves(scores: dict, is_anomaly: np.ndarray, path) -> Path:
    """Draw the ROC curve of every detector on held-out real windows.

    ``scores`` maps a detector name to (n,) test scores and ``is_anomaly`` is the (n,)
    boolean truth. The inset zooms on false-positive rates up to 5 %, where thresholds sit.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = new_figure(6.0, 5.8)
    axis = figure.subplots()
    inset = axis.inset_axes([0.45, 0.12, 0.5, 0.45])
    for index, (name, values) in enumerate(scores.items()):
        fpr, tpr, _ = roc_curve(is_anomaly, values)
        auc = roc_auc_score(is_anomaly, values)
        colour = f"C{index}"
        axis.plot(fpr, tpr, color=colour, linewidth=1.4, label=f"{name} (AUC {auc:.4f})")
        inset.plot(fpr, tpr, color=colour, linewidth=1.2)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    inset.set_xlim(0, 0.05)
    inset.set_ylim(0, 1)
    inset.set_title("FPR <= 5 %", fontsize=8)
    inset.tick_params(labelsize=7)
    axis.set_xlabel("false-positive rate")
    axis.set_ylabel("true-positive rate (recall)")
    axis.set_title(f"Detectors on held-out real windows ({int(is_anomaly.sum())} anomalous, "
                   f"{int((~is_anomaly).sum())} normal)", fontsize=10)
    # Below the axes, so the legend hides neither the steep start of the curves nor the inset.
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    return save(figure, path)


def plot_dcr(memorisation: dict, path) -> Path:
    """Draw, per generator, histograms of synthetic and held-out real distances to the closest training anomaly.

    ``memorisation`` maps a generator name to the dict of
    :func:`anomalyforge.training.quality.memorisation_summary`; its ``copy_radius`` is drawn
    as a dashed line, and windows left of it are near-copies.
    """
    names = list(memorisation)
    figure = new_figure(5.0 * max(1, len(names)), 3.6)
    axes = np.atleast_1d(figure.subplots(1, max(1, len(names)), squeeze=False).ravel())
    for index, (axis, name) in enumerate(zip(axes, names)):
        entry = memorisation[name]
        pooled = np.concatenate([entry["dcr"], entry["holdout_dcr"]])
        edges = np.linspace(0.0, float(np.quantile(pooled, 0.995)) or 1.0, 50)
        axis.hist(np.clip(entry["holdout_dcr"], 0, edges[-1]), bins=edges, density=True, histtype="step",
                  linewidth=1.4, color=REAL_COLOUR, label=f"held-out real ({len(entry['holdout_dcr'])})")
        axis.hist(np.clip(entry["dcr"], 0, edges[-1]), bins=edges, density=True, histtype="step",
                  linewidth=1.4, color=generator_colour(index), label=f"{name} ({len(entry['dcr'])})")
        axis.axvline(entry["copy_radius"], color="black", linestyle="--", linewidth=1,
                     label=f"near-copy radius: {entry['near_copies']} copies")
        axis.set_xlabel("Euclidean distance to the closest training anomaly")
        axis.set_ylabel("density")
        axis.set_title(name, fontsize=10)
        axis.legend(fontsize=7)
    return save(figure, path)


def plot_nearest_pairs(synthetic: np.ndarray, training: np.ndarray, entry: dict, generator: str, path,
                       n_pairs: int = 4, colour: str = GENERATOR_COLOURS[0]) -> Path:
    """Draw the ``n_pairs`` synthetic windows closest to a training anomaly, each over that anomaly.

    ``entry`` is the dict of :func:`anomalyforge.training.quality.memorisation_summary` for
    ``synthetic`` against ``training``.
    """
    order = np.argsort(entry["dcr"])[:n_pairs]
    figure = new_figure(3.0 * max(1, len(order)), 2.8)
    axes = np.atleast_1d(figure.subplots(1, max(1, len(order)), squeeze=False).ravel())
    for axis, row in zip(axes, order):
        partner = entry["nearest_training_index"][row]
        axis.plot(training[partner], color=REAL_COLOUR, linewidth=1.6, label=f"training anomaly {partner}")
        axis.plot(synthetic[row], color=colour, linewidth=1.0, linestyle="--",
                  label=f"synthetic {row}")
        marker = "near-copy" if entry["dcr"][row] < entry["copy_radius"] else "not a copy"
        axis.set_title(f"DCR {entry['dcr'][row]:.2f} ({marker})", fontsize=9)
        axis.legend(fontsize=7)
    figure.suptitle(f"{generator}: the synthetic windows closest to a training anomaly", fontsize=10)
    return save(figure, path)
