"""Evaluation of detector scores on held-out real data."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalyforge.thresholds import threshold_at_fpr


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, normal_class: int, threshold: float,
                    diagnostic_fpr: float = 0.01) -> dict:
    """Summarise how well ``scores`` separate normal from anomalous windows.

    Returns ROC-AUC, PR-AUC (average precision, anomalies positive), recall overall and per
    anomaly class at ``threshold``, the false-positive rate that threshold gives on the
    normals here, and, as a diagnostic only, the recall at exactly ``diagnostic_fpr`` of
    these normals (a threshold read off the test labels, never used to choose anything).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    is_anomaly = labels != normal_class
    flagged = scores > threshold
    normal_scores = scores[~is_anomaly]
    oracle_threshold = threshold_at_fpr(normal_scores, diagnostic_fpr)
    per_class = {
        str(int(label)): float(flagged[labels == label].mean())
        for label in np.unique(labels[is_anomaly])
    }
    per_class_oracle = {
        str(int(label)): float((scores[labels == label] > oracle_threshold).mean())
        for label in np.unique(labels[is_anomaly])
    }
    return {
        "roc_auc": float(roc_auc_score(is_anomaly, scores)),
        "pr_auc": float(average_precision_score(is_anomaly, scores)),
        "threshold": float(threshold),
        "recall": float(flagged[is_anomaly].mean()),
        "recall_per_class": per_class,
        "fpr": float(flagged[~is_anomaly].mean()),
        "n_normals": int((~is_anomaly).sum()),
        "n_anomalies": int(is_anomaly.sum()),
        "diagnostic_recall_at_test_fpr": {
            "fpr": diagnostic_fpr,
            "recall": float((scores[is_anomaly] > oracle_threshold).mean()),
            "recall_per_class": per_class_oracle,
        },
    }
