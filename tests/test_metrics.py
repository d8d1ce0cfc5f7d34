"""Classification metrics against scikit-learn, ECE against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from taxon.evals.metrics import classification_report, expected_calibration_error

NAMES = ("accuracy", "macro_f1", "weighted_f1", "ece")
LABELS = ["negative", "neutral", "positive"]


def random_case(seed, n=300, k=3, skill=0.5):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    # Make predictions better than chance, so metrics are not all near 1/k.
    boost = rng.random(n) < skill
    probs[boost, y_true[boost]] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    return y_true, probs.argmax(axis=1), probs


@pytest.fixture(scope="module", params=[0, 1, 2])
def case(request):
    y_true, y_pred, probs = random_case(request.param)
    report = classification_report(y_true, y_pred, probs, LABELS, NAMES, seed=0, n_resamples=300)
    return y_true, y_pred, probs, report


def test_point_values_equal_sklearn(case):
    y_true, y_pred, probs, report = case
    assert report["accuracy"]["value"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert report["macro_f1"]["value"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert report["weighted_f1"]["value"] == pytest.approx(
        f1_score(y_true, y_pred, average="weighted"), abs=1e-12)
    assert 0 < report["macro_f1"]["value"] < 1


def test_intervals_contain_point_value(case):
    *_, report = case
    for name in NAMES:
        m = report[name]
        assert m["low"] <= m["value"] <= m["high"], (name, m)
        assert m["low"] < m["high"], (name, m)  # 300 items: a real interval, not a point


def test_interval_width_is_plausible(case):
    y_true, y_pred, _, report = case
    acc = report["accuracy"]
    se = np.sqrt(acc["value"] * (1 - acc["value"]) / len(y_true))
    # A 95% interval is about 2 x 1.96 standard errors wide.
    assert 2.5 * se < acc["high"] - acc["low"] < 5.5 * se


def test_confusion_and_per_class_equal_sklearn(case):
    y_true, y_pred, _, report = case
    assert report["confusion"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    for i, name in enumerate(LABELS):
        got = report["per_class"][name]
        assert got["precision"] == pytest.approx(p[i])
        assert got["recall"] == pytest.approx(r[i])
        assert got["f1"] == pytest.approx(f[i])
        assert got["support"] == s[i]


def test_absent_class_counts_as_zero_in_macro_f1():
    # Class 2 is never the gold label nor predicted: sklearn with labels=[0,1,2] averages a 0 in.
    y_true = np.array([0, 0, 1, 1, 1, 0])
    y_pred = np.array([0, 1, 1, 1, 0, 0])
    probs = np.eye(3)[y_pred] * 0.7 + 0.1
    report = classification_report(y_true, y_pred, probs, LABELS, NAMES, n_resamples=50)
    expected = f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert report["macro_f1"]["value"] == pytest.approx(expected)
    assert report["confusion"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    assert report["per_class"]["positive"]["support"] == 0


def test_ece_by_hand():
    probs = np.array([
        [0.90, 0.10],  # conf 0.90, bin 9, correct
        [0.80, 0.20],  # conf 0.80, bin 8, wrong
        [0.85, 0.15],  # conf 0.85, bin 8, correct
        [0.40, 0.60],  # conf 0.60, bin 6, correct
        [0.30, 0.70],  # conf 0.70, bin 7, wrong
        [0.00, 1.00],  # conf 1.00, last bin (9), correct
    ])
    y = np.array([0, 1, 0, 1, 0, 1])
    n = 6
    expected = (
        2 / n * abs(1.0 - (0.90 + 1.00) / 2)  # bin 9: both correct
        + 2 / n * abs(0.5 - (0.80 + 0.85) / 2)  # bin 8: one of two correct
        + 1 / n * abs(1.0 - 0.60)  # bin 6
        + 1 / n * abs(0.0 - 0.70)  # bin 7
    )
    assert expected_calibration_error(y, probs) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.85 / n)


def test_ece_perfect_and_worst():
    y = np.array([0, 1, 2, 0])
    assert expected_calibration_error(y, np.eye(3)[y]) == pytest.approx(0.0)
    wrong = np.eye(3)[(y + 1) % 3]
    assert expected_calibration_error(y, wrong) == pytest.approx(1.0)


def test_ece_in_report_equals_direct(case):
    y_true, _, probs, report = case
    assert report["ece"]["value"] == pytest.approx(expected_calibration_error(y_true, probs))


def test_bootstrap_is_seeded():
    y_true, y_pred, probs = random_case(5, n=100)
    a = classification_report(y_true, y_pred, probs, LABELS, ["accuracy"], seed=1, n_resamples=200)
    b = classification_report(y_true, y_pred, probs, LABELS, ["accuracy"], seed=1, n_resamples=200)
    assert a["accuracy"] == b["accuracy"]


def test_bootstrapped_f1s_equal_sklearn_on_random_resamples():
    """The confusion-matrix F1s the bootstrap uses equal scikit-learn's on many random inputs,
    including classes that never occur and resamples without class 1."""
    from taxon.evals.metrics import scalar_metrics

    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 5):
        fns = scalar_metrics(n_classes)
        labels = list(range(n_classes))
        for _ in range(200):
            n = int(rng.integers(1, 30))
            t = rng.integers(0, n_classes - (n_classes > 2), n)
            p = rng.integers(0, n_classes, n)
            for name, average in (("macro_f1", "macro"), ("weighted_f1", "weighted")):
                assert fns[name](t, p, None) == pytest.approx(
                    f1_score(t, p, labels=labels, average=average, zero_division=0), abs=1e-12)
            assert fns["binary_f1"](t, p, None) == pytest.approx(
                f1_score(t, p, labels=[1], average="macro", zero_division=0), abs=1e-12)
