"""Significance of differences between systems, for the report (issue 10, item 3).

A score table alone cannot say whether recipe A beats recipe B or the gap is noise from the test
items or the seed. Each function here answers one such question and returns a `Comparison`: the
test, the sample size, the statistic, the p value (and, after `holm`, the adjusted one), an effect
size with its interval where one exists, and a note in words saying how it was computed or why the
design cannot reach significance.

The tests themselves are library calls (scipy, statsmodels, scikit-posthocs), never re-derived
here; the only loop is the paired bootstrap's resampling of test items, which must recompute
non-additive metrics (F1, MCC) on each resample rather than average per-item correctness.

- Over the items of one test set: `paired_bootstrap` (any scalar classification metric) and
  `mcnemar_exact` (accuracy), with `items_needed` for a rough test-set size.
- Over seeds: `wilcoxon_seeds` and `paired_t_seeds`.
- Three or more arms over the same blocks (seeds or tasks): `friedman`, then `nemenyi`,
  `average_ranks` and `critical_difference` for a Demšar (2006) critical-difference diagram.
- Several comparisons at once: `holm`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scikit_posthocs
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from taxon.evals.metrics import scalar_metrics

ALPHA = 0.05
# The metrics of `scalar_metrics` that need only labels (ECE needs probabilities).
BOOTSTRAP_METRICS = ("accuracy", "macro_f1", "weighted_f1", "mcc", "binary_f1")


@dataclass(frozen=True)
class Comparison:
    """One test's result. `effect` is a-b unless `note` says otherwise; `effect_low`/`effect_high`
    its 95% interval where the test gives one; `p_adjusted` stays None until `holm` fills it."""

    test: str
    n: int
    statistic: float | None
    p: float
    p_adjusted: float | None = None
    effect: float | None = None
    effect_low: float | None = None
    effect_high: float | None = None
    note: str = ""


def _labels(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=int) for a in arrays]
    if len({len(a) for a in out}) != 1:
        raise ValueError(f"paired inputs must have the same length, got {[len(a) for a in out]}")
    if len(out[0]) == 0:
        raise ValueError("no items to compare")
    return out


def _paired_floats(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D sequences of equal length, got {x.shape}, {y.shape}")
    return x, y


def _interval_and_p(effect: float, diffs: np.ndarray) -> tuple[float, float, float]:
    """Percentile 95% interval of resampled differences, and the two-sided bootstrap p: twice the
    share of differences on the other side of 0 from the observed effect (capped at 1)."""
    low, high = np.percentile(diffs, [2.5, 97.5])
    if effect > 0:
        p = min(1.0, 2 * float(np.mean(diffs <= 0)))
    elif effect < 0:
        p = min(1.0, 2 * float(np.mean(diffs >= 0)))
    else:
        p = 1.0
    return float(low), float(high), p


def paired_bootstrap(y_true, pred_a, pred_b, metric: str, n_resamples: int = 1000, seed: int = 0,
                     n_classes: int | None = None) -> Comparison:
    """Difference metric(a) - metric(b) on the same test items, with a percentile 95% interval and a
    two-sided bootstrap p.

    Why paired: both systems answered the same items, so resampling items jointly removes the
    between-item variance that two independent intervals would double count. Why recompute: F1 and
    MCC are not means over items, so each resample recomputes the metric on its items.
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"metric must be one of {BOOTSTRAP_METRICS}, got {metric!r}")
    y, a, b = _labels(y_true, pred_a, pred_b)
    k = n_classes if n_classes is not None else int(max(y.max(), a.max(), b.max())) + 1
    fn = scalar_metrics(max(k, 2))[metric]
    effect = float(fn(y, a, None)) - float(fn(y, b, None))
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = rng.integers(0, n, n)
        diffs[r] = float(fn(y[idx], a[idx], None)) - float(fn(y[idx], b[idx], None))
    low, high, p = _interval_and_p(effect, diffs)
    note = (f"paired bootstrap of {metric} over {n} items, {n_resamples} resamples (seed {seed}), "
            f"metric recomputed on each resample; effect = a - b with its percentile 95% interval; "
            f"p = 2 x share of resampled differences on the other side of 0 (capped at 1; "
            f"resolution 1/{n_resamples})")
    return Comparison("paired_bootstrap", n, effect, p, None, effect, float(low), float(high), note)


def mcnemar_exact(y_true, pred_a, pred_b) -> Comparison:
    """McNemar's exact test on the 2x2 correct/incorrect table of two systems over the same items.

    Why: for accuracy only the items where the systems disagree carry evidence; the exact
    (binomial) version stays valid when there are few such items.
    """
    y, a, b = _labels(y_true, pred_a, pred_b)
    ca, cb = a == y, b == y
    table = np.array([[np.sum(ca & cb), np.sum(ca & ~cb)], [np.sum(~ca & cb), np.sum(~ca & ~cb)]])
    res = mcnemar(table, exact=True)
    effect = float(ca.mean() - cb.mean())
    note = (f"McNemar exact (statsmodels, binomial on the discordant items): a right b wrong "
            f"{table[0, 1]}, a wrong b right {table[1, 0]}; effect = accuracy(a) - accuracy(b)")
    return Comparison("mcnemar_exact", len(y), float(res.statistic), float(res.pvalue), None, effect,
                      note=note)


def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p an exact Wilcoxon signed-rank test can give with n pairs: all
    differences on one side, probability 2 / 2**n."""
    return min(1.0, 2.0 / 2**n)


def seeds_needed(alpha: float = ALPHA) -> int:
    """The fewest pairs with which an exact two-sided Wilcoxon test can give p < alpha."""
    n = 1
    while smallest_wilcoxon_p(n) >= alpha:
        n += 1
    return n


def seeds_for_power(d_z: float, alpha: float = ALPHA, power: float = 0.8) -> int | None:
    """Seeds a paired t test needs to detect a standardised per-seed effect d_z with the given
    power (statsmodels `TTestPower.solve_power`); None when there is no effect to detect."""
    from statsmodels.stats.power import TTestPower

    if not d_z or not math.isfinite(d_z):
        return None
    n = TTestPower().solve_power(effect_size=abs(d_z), alpha=alpha, power=power, alternative="two-sided")
    return max(2, math.ceil(float(n)))


def wilcoxon_seeds(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> Comparison:
    """Wilcoxon signed-rank test (scipy, two-sided) on paired per-seed scores of two arms.

    Why: seeds are few and their scores need not be normal, so a rank test; but with few seeds it
    cannot reach significance at all, which the note says rather than leaving a bare p.
    """
    x, y = _paired_floats(a, b)
    n = len(x)
    effect = float(np.median(x - y))
    if not np.any(x - y):  # scipy returns nan here: no signed rank carries any evidence
        return Comparison("wilcoxon", n, 0.0, 1.0, None, effect,
                          note="Wilcoxon signed-rank: every per-seed difference is 0, so p = 1")
    res = stats.wilcoxon(x, y, alternative="two-sided")
    floor = smallest_wilcoxon_p(n)
    note = "Wilcoxon signed-rank (scipy, two-sided); effect = median of per-seed differences a - b"
    if floor >= alpha:
        note += (f"; with {n} seeds the smallest possible p is {floor:.3g}; need at least "
                 f"{seeds_needed(alpha)} seeds for p < {alpha:g}")
    return Comparison("wilcoxon", n, float(res.statistic), float(res.pvalue), None, effect, note=note)


def paired_t_seeds(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Paired t test (scipy `ttest_rel`) on per-seed scores of two arms.

    Why: where seed-to-seed noise is roughly normal it has more power than Wilcoxon with few seeds.
    effect is Cohen's d for paired samples (mean difference / sd of differences); effect_low and
    effect_high are the 95% t-interval of the mean difference itself (in the metric's units).
    """
    x, y = _paired_floats(a, b)
    n = len(x)
    diff = x - y
    if not np.any(diff - diff.mean()):  # constant differences: t is undefined (scipy: nan)
        return Comparison("paired_t", n, None, 1.0 if not diff.any() else float("nan"), None, None,
                          float(diff.mean()), float(diff.mean()),
                          note="paired t: every per-seed difference is the same, so t is undefined; "
                               "p is 1 when that difference is 0, else undefined (nan)")
    res = stats.ttest_rel(x, y)
    ci = res.confidence_interval(0.95)
    sd = float(np.std(diff, ddof=1)) if n > 1 else 0.0
    mean = float(diff.mean())
    d = mean / sd if sd > 0 else None
    note = (f"paired t (scipy ttest_rel); effect = Cohen's d_z (mean difference / sd of differences); "
            f"effect_low/effect_high = 95% t-interval of the mean difference a - b ({mean:.4g})")
    return Comparison("paired_t", n, float(res.statistic), float(res.pvalue), None, d,
                      float(ci.low), float(ci.high), note)


def _block_matrix(scores: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """Rows are blocks (seeds or tasks), columns arms: the layout the Friedman family expects."""
    if len(scores) < 3:
        raise ValueError(f"the Friedman family needs at least 3 arms, got {len(scores)}")
    lengths = {len(v) for v in scores.values()}
    if len(lengths) != 1:
        raise ValueError(f"every arm needs a score for the same blocks, got lengths {sorted(lengths)}")
    return pd.DataFrame({arm: np.asarray(v, dtype=float) for arm, v in scores.items()})


def friedman(scores: Mapping[str, Sequence[float]]) -> Comparison:
    """Friedman test (scipy) across three or more arms scored on the same blocks.

    Why: the omnibus test before any pairwise claim among many arms (Demšar 2006); effect is
    Kendall's W = chi2 / (N (k - 1)), the agreement of the blocks' rankings (0 none, 1 full).
    """
    m = _block_matrix(scores)
    n_blocks, k = m.shape
    if all(len(set(row)) == 1 for row in m.to_numpy()):  # every block ties all arms: scipy gives nan
        return Comparison("friedman", n_blocks, 0.0, 1.0, None, 0.0,
                          note=f"Friedman over {k} arms x {n_blocks} blocks: every block ties all "
                               "arms, p = 1")
    res = stats.friedmanchisquare(*(m[c].to_numpy() for c in m.columns))
    w = float(res.statistic) / (n_blocks * (k - 1))
    note = (f"Friedman chi-square (scipy) over {k} arms x {n_blocks} blocks; "
            f"effect = Kendall's W; follow with nemenyi() for pairs")
    return Comparison("friedman", n_blocks, float(res.statistic), float(res.pvalue), None, w, note=note)


def nemenyi(scores: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """Pairwise Nemenyi p values after Friedman (scikit-posthocs `posthoc_nemenyi_friedman`), an
    arm x arm DataFrame. Why: it controls the family-wise error over all pairs of arms."""
    return scikit_posthocs.posthoc_nemenyi_friedman(_block_matrix(scores))


def average_ranks(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each arm's mean rank over blocks, rank 1 = highest score (ties share the mean rank; scipy
    `rankdata`). Why: the axis of a critical-difference diagram."""
    m = _block_matrix(scores).to_numpy()
    ranks = np.vstack([stats.rankdata(-row) for row in m])
    return {arm: float(r) for arm, r in zip(scores, ranks.mean(axis=0), strict=True)}


def critical_difference(n_arms: int, n_blocks: int, alpha: float = ALPHA) -> float:
    """Nemenyi critical difference of average ranks (Demšar 2006): q_alpha * sqrt(k (k+1) / (6 N)),
    q_alpha the studentized range quantile (infinite df) / sqrt(2). Two arms whose average ranks
    differ by less than this are not distinguishable."""
    q = stats.studentized_range.ppf(1 - alpha, n_arms, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(n_arms * (n_arms + 1) / (6 * n_blocks)))


def holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The same comparisons with `p_adjusted` from Holm's step-down correction (statsmodels
    `multipletests(method="holm")`; its default is Holm-Šidák). Why: a report makes many
    comparisons; Holm controls the family-wise error without assuming independence."""
    if not comparisons:
        return []
    _, adjusted, _, _ = multipletests([c.p for c in comparisons], method="holm")
    return [dataclasses.replace(c, p_adjusted=float(p)) for c, p in zip(comparisons, adjusted, strict=True)]


def items_needed(comparison: Comparison, alpha: float = ALPHA) -> Comparison:
    """A rough test-set size at which the observed effect would become significant, for a
    `paired_bootstrap` or `mcnemar_exact` result.

    Approximation: the test statistic grows with sqrt(n) at a fixed effect, so n is scaled by
    (z_crit / z_obs)^2, z_obs the normal quantile of the observed two-sided p. Returns a
    Comparison with `n` the estimated item count (the observed p and effect kept), or n = 0 when
    there is no observed effect to scale.
    """
    if comparison.test not in ("paired_bootstrap", "mcnemar_exact"):
        raise ValueError(f"items_needed applies to paired_bootstrap or mcnemar_exact, got {comparison.test}")
    z_crit = float(stats.norm.isf(alpha / 2))
    p = max(comparison.p, 1e-300)
    z_obs = float(stats.norm.isf(p / 2))
    base = dataclasses.replace(comparison, test=f"items_needed({comparison.test})")
    if z_obs <= 0 or not comparison.effect:
        return dataclasses.replace(base, n=0, statistic=z_obs, note=(
            f"approximation: no observed effect (p = {comparison.p:.3g}) at {comparison.n} items; "
            f"more items of the same kind would not make it significant"))
    needed = math.ceil(comparison.n * (z_crit / z_obs) ** 2)
    observed = f"at {comparison.n} items (p = {comparison.p:.3g})"
    verdict = f"already significant {observed}" if comparison.p < alpha else f"not significant {observed}"
    return dataclasses.replace(base, n=needed, statistic=z_obs, note=(
        f"approximation: {verdict}; if the effect stayed at {comparison.effect:.4g}, about {needed} items "
        f"would give p < {alpha:g} (n scaled by (z_crit / z_obs)^2 = ({z_crit:.3f} / {z_obs:.3f})^2)"))


# --- seeds and items together ------------------------------------------------------------------
# A seed's score is a statistic of its test items: `ItemStat(idx) -> float` recomputes the metric
# (F1, MCC, loss) on the item indices `idx`. The two functions below resample both levels, so the
# interval carries the seed-to-seed spread and the test-set sampling error, and seed x item rows
# are never pooled as if independent.

def two_level_bootstrap(per_seed: Sequence, n_items: int, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of an arm's mean over seeds: each resample draws seeds with
    replacement, then, for each drawn seed, its test items with replacement, and averages the
    recomputed metric over the drawn seeds (a hierarchical bootstrap, seeds then items)."""
    rng = np.random.default_rng(seed)
    k = len(per_seed)
    values = np.empty(n_resamples)
    for r in range(n_resamples):
        drawn = rng.integers(0, k, k)
        values[r] = np.mean([per_seed[s](rng.integers(0, n_items, n_items)) for s in drawn])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _paired_draws(a: Sequence, b: Sequence, n_items: int, n_resamples: int, seed: int):
    """((mean_a, mean_b) on every item, (resampled mean_a, resampled mean_b) arrays): seeds paired
    by position (an arm with one seed pairs with every seed of the other) drawn with
    replacement, then items drawn with replacement jointly for both arms."""
    k = max(len(a), len(b))
    if min(len(a), len(b)) not in (1, k):
        raise ValueError(f"arms need equal seed counts (or one seed), got {len(a)} and {len(b)}")
    pick_a = (lambda s: a[s]) if len(a) == k else (lambda s: a[0])
    pick_b = (lambda s: b[s]) if len(b) == k else (lambda s: b[0])
    every = np.arange(n_items)
    means = (float(np.mean([pick_a(s)(every) for s in range(k)])),
             float(np.mean([pick_b(s)(every) for s in range(k)])))
    rng = np.random.default_rng(seed)
    draws_a, draws_b = np.empty(n_resamples), np.empty(n_resamples)
    for r in range(n_resamples):
        drawn = rng.integers(0, k, k) if k > 1 else np.zeros(1, dtype=int)
        total_a = total_b = 0.0
        for s in drawn:
            idx = rng.integers(0, n_items, n_items)
            total_a += pick_a(s)(idx)
            total_b += pick_b(s)(idx)
        draws_a[r], draws_b[r] = total_a / len(drawn), total_b / len(drawn)
    return means, (draws_a, draws_b)


def paired_ratio_bootstrap(a: Sequence, b: Sequence, n_items: int, n_resamples: int = 1000,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """mean_s metric(a_s) / mean_s metric(b_s) over the same test items, with its percentile
    interval from the paired two-level resampling of `paired_two_level_bootstrap` (e.g. a
    composite adapter's score as a share of a member's own). Resamples where b's mean is 0 are
    left out; the ratio is nan when b's mean is 0 on every item."""
    (mean_a, mean_b), (draws_a, draws_b) = _paired_draws(a, b, n_items, n_resamples, seed)
    ratio = mean_a / mean_b if mean_b else float("nan")
    keep = draws_b != 0
    if not keep.any():
        return ratio, float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws_a[keep] / draws_b[keep], [tail, 100 - tail])
    return ratio, float(low), float(high)


def paired_two_level_bootstrap(a: Sequence, b: Sequence, n_items: int, n_resamples: int = 1000,
                               seed: int = 0, metric: str = "metric") -> Comparison:
    """Difference mean_s metric(a_s) - mean_s metric(b_s) over the same test items, resampling
    seeds (paired by position: a's i-th seed with b's i-th; an arm with one seed, such as zero-shot,
    pairs with every seed of the other) and then items jointly for both arms.

    With one seed on each side this is `paired_bootstrap` over items; with several it also carries
    the seed-to-seed spread, which a bootstrap over pooled seed x item rows would hide."""
    (mean_a, mean_b), (draws_a, draws_b) = _paired_draws(a, b, n_items, n_resamples, seed)
    effect = mean_a - mean_b
    diffs = draws_a - draws_b
    low, high, p = _interval_and_p(effect, diffs)
    k = max(len(a), len(b))
    levels = f"{k} seeds, then {n_items} items" if k > 1 else f"{n_items} items"
    note = (f"paired bootstrap of {metric} ({levels}), {n_resamples} resamples (seed {seed}), metric "
            f"recomputed on each resample; effect = a - b with its percentile 95% interval; p = 2 x "
            f"share of resampled differences on the other side of 0 (resolution 1/{n_resamples})")
    return Comparison("paired_bootstrap", n_items, effect, p, None, effect, float(low), float(high), note)
