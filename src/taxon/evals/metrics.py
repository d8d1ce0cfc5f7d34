"""Metrics researchers report for classification, with bootstrap confidence intervals.

The point values come from scikit-learn; intervals from scipy's bootstrap over test items.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def expected_calibration_error(y_true, probs, n_bins: int = 10) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| x share."""
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def scalar_metrics(n_classes: int) -> dict[str, Callable]:
    labels = list(range(n_classes))
    return {
        "accuracy": lambda t, p, pr: accuracy_score(t, p),
        "macro_f1": lambda t, p, pr: f1_score(t, p, labels=labels, average="macro", zero_division=0),
        "weighted_f1": lambda t, p, pr: f1_score(
            t, p, labels=labels, average="weighted", zero_division=0
        ),
        "ece": lambda t, p, pr: expected_calibration_error(t, pr),
    }


def classification_report(y_true, y_pred, probs, label_names, names, seed=0, n_resamples=1000):
    """{metric: {value, low, high}} for each scalar metric in `names`, plus the confusion matrix
    and per-class precision/recall/F1."""
    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs)
    fns = scalar_metrics(len(label_names))
    out: dict = {}
    for name in names:
        fn = fns[name]
        value = float(fn(y_true, y_pred, probs))
        low, high = bootstrap_ci(lambda idx, fn=fn: fn(y_true[idx], y_pred[idx], probs[idx]),
                                 len(y_true), seed, n_resamples)
        out[name] = {"value": value, "low": low, "high": high}
    labels = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out["per_class"] = {
        label_names[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                         "support": int(s[i])}
        for i in labels
    }
    out["confusion"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, seed: int, n_resamples: int = 1000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over resampled item indices."""
    if n < 2:
        v = float(stat(np.arange(n)))
        return v, v
    res = bootstrap(
        (np.arange(n),), lambda idx: stat(idx.astype(int)), vectorized=False,
        n_resamples=n_resamples, confidence_level=level, method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
