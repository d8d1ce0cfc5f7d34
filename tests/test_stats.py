"""taxon.report.stats: each test equals the library called directly; the bootstrap behaves on
identical, clearly different and F1-vs-accuracy cases; the notes say what the design cannot do."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scikit_posthocs
from scipy import stats as sps
from sklearn.metrics import f1_score, matthews_corrcoef
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from taxon.evals.metrics import scalar_metrics
from taxon.report import stats


def _systems(n=200, acc_a=0.9, acc_b=0.5, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < acc_a, y, 1 - y)
    b = np.where(rng.random(n) < acc_b, y, 1 - y)
    return y, a, b


def test_comparison_is_frozen():
    c = stats.Comparison("t", 3, 1.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.p = 0.1  # type: ignore[misc]
    assert c.p_adjusted is None


def test_bootstrap_identical_systems_effect_zero_p_one():
    y, a, _ = _systems()
    for metric in stats.BOOTSTRAP_METRICS:
        c = stats.paired_bootstrap(y, a, a.copy(), metric, n_resamples=100)
        assert c.effect == 0 and c.p == 1.0 and c.effect_low == 0 and c.effect_high == 0


def test_bootstrap_clearly_different_systems():
    y, a, b = _systems()
    c = stats.paired_bootstrap(y, a, b, "accuracy", n_resamples=1000, seed=0)
    assert c.effect == pytest.approx((a == y).mean() - (b == y).mean())
    assert c.p < 0.01 and c.effect_low > 0 and c.effect_high > c.effect > c.effect_low
    assert "paired bootstrap" in c.note and c.n == 200
    # a - b and b - a are mirror images; the seed makes it reproducible
    r = stats.paired_bootstrap(y, b, a, "accuracy", n_resamples=1000, seed=0)
    assert r.effect == -c.effect and r.effect_low == pytest.approx(-c.effect_high)
    mcc = stats.paired_bootstrap(y, a, b, "mcc", n_resamples=100, seed=5)
    assert stats.paired_bootstrap(y, a, b, "mcc", n_resamples=100, seed=5) == mcc
    assert mcc.effect == pytest.approx(matthews_corrcoef(y, a) - matthews_corrcoef(y, b))


def test_bootstrap_interval_agrees_with_scipy_paired_percentile_bootstrap():
    y, a, b = _systems(acc_a=0.8, acc_b=0.7, seed=3)
    c = stats.paired_bootstrap(y, a, b, "macro_f1", n_resamples=2000, seed=0)
    f1 = scalar_metrics(2)["macro_f1"]  # equal to scikit-learn's (tests/test_metrics.py), faster
    ref = sps.bootstrap((y, a, b), lambda t, p, q: f1(t, p, None) - f1(t, q, None),
                        paired=True, vectorized=False, method="percentile", n_resamples=2000,
                        rng=np.random.default_rng(7))
    assert c.effect == pytest.approx(f1_score(y, a, average="macro") - f1_score(y, b, average="macro"))
    assert c.effect_low == pytest.approx(ref.confidence_interval.low, abs=0.03)
    assert c.effect_high == pytest.approx(ref.confidence_interval.high, abs=0.03)


def test_bootstrap_recomputes_f1_rather_than_averaging_item_correctness():
    # 90 negatives, 10 positives. a: always 0 (accuracy 0.9). b: finds all 10 positives but calls 10
    # negatives positive (accuracy 0.9). Per-item correctness is equal on average; macro F1 is not.
    y = np.array([0] * 90 + [1] * 10)
    a = np.zeros(100, dtype=int)
    b = y.copy()
    b[:10] = 1
    acc = stats.paired_bootstrap(y, a, b, "accuracy", n_resamples=500)
    f1 = stats.paired_bootstrap(y, a, b, "macro_f1", n_resamples=500)
    assert acc.effect == 0 and acc.p == 1.0
    assert ((a == y).astype(float) - (b == y)).mean() == 0
    assert f1.effect == pytest.approx(f1_score(y, a, average="macro") - f1_score(y, b, average="macro"))
    assert f1.effect < -0.3 and f1.effect_high < 0 and f1.p < 0.01
    binary = stats.paired_bootstrap(y, a, b, "binary_f1", n_resamples=200)
    assert binary.effect == pytest.approx(f1_score(y, a, zero_division=0) - f1_score(y, b))


def test_bootstrap_rejects_unknown_metric_and_unpaired_inputs():
    with pytest.raises(ValueError, match="metric"):
        stats.paired_bootstrap([0, 1], [0, 1], [0, 1], "ece")
    with pytest.raises(ValueError, match="same length"):
        stats.paired_bootstrap([0, 1], [0, 1], [0], "accuracy")


def test_mcnemar_equals_statsmodels_on_a_hand_checked_table():
    # table [[both right 5, a right b wrong 10], [a wrong b right 2, both wrong 3]]
    y = np.zeros(20, dtype=int)
    a = np.array([0] * 5 + [0] * 10 + [1] * 2 + [1] * 3)
    b = np.array([0] * 5 + [1] * 10 + [0] * 2 + [1] * 3)
    c = stats.mcnemar_exact(y, a, b)
    ref = mcnemar([[5, 10], [2, 3]], exact=True)
    assert c.p == ref.pvalue == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 x P(Bin(12, .5) <= 2)
    assert c.p == pytest.approx(sps.binomtest(2, 12).pvalue)
    assert c.statistic == 2 and c.n == 20 and c.effect == pytest.approx(15 / 20 - 7 / 20)
    assert "10" in c.note and "2" in c.note


def test_wilcoxon_equals_scipy_and_notes_the_floor():
    a, b = [0.80, 0.81, 0.82], [0.70, 0.70, 0.70]
    c = stats.wilcoxon_seeds(a, b)
    ref = sps.wilcoxon(a, b, alternative="two-sided")
    assert c.p == ref.pvalue == 0.25 and c.statistic == ref.statistic
    assert c.effect == pytest.approx(0.11)
    assert "with 3 seeds the smallest possible p is 0.25" in c.note
    assert "need at least 6 seeds for p < 0.05" in c.note
    assert stats.smallest_wilcoxon_p(5) == 0.0625 and stats.smallest_wilcoxon_p(6) == 0.03125
    assert stats.seeds_needed() == 6
    rng = np.random.default_rng(0)
    x = rng.normal(0.8, 0.01, 8)
    y = x - rng.normal(0.02, 0.01, 8)
    c8 = stats.wilcoxon_seeds(x, y)
    assert c8.p == pytest.approx(sps.wilcoxon(x, y).pvalue) and "smallest possible" not in c8.note


def test_paired_t_equals_scipy_with_cohens_d():
    a, b = [1.0, 2.0, 3.5, 2.5], [0.0, 1.0, 1.0, 2.0]
    c = stats.paired_t_seeds(a, b)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval()
    diff = np.subtract(a, b)
    assert c.p == pytest.approx(ref.pvalue) and c.statistic == pytest.approx(ref.statistic)
    assert c.effect == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert (c.effect_low, c.effect_high) == pytest.approx((ci.low, ci.high))
    assert "Cohen" in c.note


SCORES = {  # 6 blocks x 4 arms, with a tie in block 3
    "full": [0.81, 0.79, 0.85, 0.80, 0.83, 0.82],
    "lora": [0.78, 0.80, 0.85, 0.77, 0.80, 0.79],
    "qlora": [0.75, 0.74, 0.80, 0.76, 0.78, 0.74],
    "zero_shot": [0.60, 0.62, 0.61, 0.65, 0.59, 0.63],
}


def test_friedman_nemenyi_ranks_equal_direct_library_calls():
    c = stats.friedman(SCORES)
    ref = sps.friedmanchisquare(*SCORES.values())
    assert c.statistic == pytest.approx(ref.statistic) and c.p == pytest.approx(ref.pvalue)
    assert c.n == 6 and c.effect == pytest.approx(ref.statistic / (6 * 3))
    matrix = np.array(list(SCORES.values())).T
    p = stats.nemenyi(SCORES)
    np.testing.assert_allclose(p.to_numpy(), scikit_posthocs.posthoc_nemenyi_friedman(matrix).to_numpy())
    assert list(p.columns) == list(SCORES) and list(p.index) == list(SCORES)
    ranks = stats.average_ranks(SCORES)
    expected = np.mean([sps.rankdata(-row) for row in matrix], axis=0)
    assert list(ranks.values()) == pytest.approx(list(expected))
    assert ranks["full"] == pytest.approx((1 + 2 + 1.5 + 1 + 1 + 1) / 6) and ranks["zero_shot"] == 4
    with pytest.raises(ValueError, match="3 arms"):
        stats.friedman({"a": [1, 2], "b": [2, 3]})


def test_critical_difference_matches_demsar_table():
    assert sps.studentized_range.ppf(0.95, 4, np.inf) / np.sqrt(2) == pytest.approx(2.569, abs=1e-3)
    assert stats.critical_difference(4, 10) == pytest.approx(1.483, abs=1e-2)
    assert stats.critical_difference(4, 40) < stats.critical_difference(4, 10)


def test_holm_equals_statsmodels_holm_not_its_default():
    ps = [0.01, 0.02, 0.03]
    comps = [stats.Comparison(f"c{i}", 10, None, p) for i, p in enumerate(ps)]
    adjusted = stats.holm(comps)
    holm = multipletests(ps, method="holm")[1]
    default = multipletests(ps)[1]  # Holm-Sidak
    assert [c.p_adjusted for c in adjusted] == pytest.approx(list(holm))
    assert list(holm) == pytest.approx([0.03, 0.04, 0.04])
    assert not np.allclose(holm, default)
    assert [c.p for c in adjusted] == ps and [c.test for c in adjusted] == ["c0", "c1", "c2"]
    assert stats.holm([]) == []


def test_items_needed_scales_n_and_says_it_is_an_approximation():
    c = stats.Comparison("mcnemar_exact", 100, 3.0, 0.2, effect=0.03)
    r = stats.items_needed(c)
    z_obs, z_crit = sps.norm.isf(0.1), sps.norm.isf(0.025)
    assert r.n == int(np.ceil(100 * (z_crit / z_obs) ** 2)) and r.n > 100
    assert r.note.startswith("approximation") and "not significant" in r.note
    y, a, b = _systems()
    sig = stats.items_needed(stats.paired_bootstrap(y, a, b, "accuracy", n_resamples=200))
    assert "already significant" in sig.note and sig.n < 200
    none = stats.items_needed(stats.paired_bootstrap(y, a, a, "accuracy", n_resamples=50))
    assert none.n == 0 and "no observed effect" in none.note
    with pytest.raises(ValueError):
        stats.items_needed(stats.Comparison("wilcoxon", 3, 0.0, 0.25))
