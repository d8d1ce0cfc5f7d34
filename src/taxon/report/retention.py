"""Retention of composite adapters: how much of each member's own score a composite keeps on that
member's task, beside what a multi-task adapter trained on all the members' data keeps.

Retention = composite score / member score on the member's task (member / composite for metrics
where lower is better, so 1 means "as good as the member" either way), over the same test items,
with a 95% interval from the report's paired two-level bootstrap (`stats.paired_ratio_bootstrap`:
seeds paired by position, then items jointly). A member's task: an evaluated task whose dataset
card is one its last stage trains on; where none is, every evaluated task.
"""

from __future__ import annotations

import pandas as pd

from taxon.data.cards import get_card
from taxon.errors import TaxonError
from taxon.evals.tasks import get_task
from taxon.report import stats
from taxon.report.arms import Arm, ArmScore, Scores
from taxon.study.load import arm_of

METHOD = ("Retention: the composite's score on each member's task as a share of that member's own "
          "score (for loss-like metrics, the member's over the composite's), on the same items; 95% "
          "interval from a paired two-level bootstrap (seeds paired, then items), "
          "{n:,} resamples, seed {seed}. Baseline: the multi-task adapter named by the composite's "
          "`compose.baseline`, against the same member score.")


def _card(dataset: str) -> str | None:
    try:
        return get_card(dataset).id
    except TaxonError:  # a corpus folder or a card no longer known: matches no task
        return None


def member_tasks(member: Arm, tasks: list[str]) -> list[str]:
    """The evaluated tasks that score the data the member's last stage trained on (by dataset
    card); every task where none does."""
    stages = member.spec.get("stages") or []
    trained = {_card(ref["dataset"]) for ref in (stages[-1].get("data") or [])} if stages else set()
    own = [t for t in tasks if _card(get_task(t).dataset) in trained - {None}]
    return own or list(tasks)


def _ratio(scores: Scores, top: ArmScore, member: ArmScore) -> tuple[float, float, float]:
    """top / member (member / top where lower is better) with its interval."""
    a, b = (top, member) if member.higher_is_better else (member, top)
    return stats.paired_ratio_bootstrap(a.stats, b.stats, member.n_items, scores.n_resamples, scores.seed)


def retention_table(scores: Scores, tasks: list[str]) -> pd.DataFrame:
    """One row per (composite arm, member, member task)."""
    rows = []
    for arm in scores.arms:
        if not arm.compose:
            continue
        baseline = scores.arm(arm.compose["baseline"]) if arm.compose.get("baseline") else None
        for member_name in dict.fromkeys(arm_of(m) for m in arm.compose["members"]):
            member = scores.arm(member_name)
            if member is None:
                continue
            for t in member_tasks(member, tasks):
                c, m = scores.score(arm, t), scores.score(member, t)
                if c is None or m is None or c.n_items != m.n_items:
                    continue
                value, low, high = _ratio(scores, c, m)
                row = {"composite": arm.name, "method": arm.compose["method"], "member": member.name,
                       "task": t, "metric": m.metric, "n": m.n_items, "member_score": m.mean,
                       "composite_score": c.mean, "retention": value, "ret_low": low,
                       "ret_high": high, "baseline": None, "baseline_score": None,
                       "baseline_retention": None, "base_low": None, "base_high": None}
                b = scores.score(baseline, t) if baseline is not None else None
                if b is not None and b.n_items == m.n_items:
                    bv, bl, bh = _ratio(scores, b, m)
                    row.update(baseline=baseline.name, baseline_score=b.mean,  # type: ignore[union-attr]
                               baseline_retention=bv, base_low=bl, base_high=bh)
                rows.append(row)
    return pd.DataFrame(rows)


def retention_view(df: pd.DataFrame) -> pd.DataFrame:
    """The table as the report prints it: scores to 3 places, retention with its interval."""
    if df.empty:
        return df

    def ret(v, lo, hi) -> str:
        return "-" if v is None or pd.isna(v) else f"{v:.1%} [{lo:.1%}, {hi:.1%}]"

    return pd.DataFrame({
        "composite": df["composite"], "method": df["method"], "member": df["member"],
        "task": df["task"], "metric": df["metric"], "n": df["n"],
        "member score": df["member_score"].map(lambda v: f"{v:.3f}"),
        "composite score": df["composite_score"].map(lambda v: f"{v:.3f}"),
        "retention [95% CI]": [ret(v, lo, hi) for v, lo, hi in
                               zip(df["retention"], df["ret_low"], df["ret_high"], strict=True)],
        "multi-task baseline": df["baseline"].map(lambda v: v or "-"),
        "baseline retention [95% CI]": [ret(v, lo, hi) for v, lo, hi in
                                        zip(df["baseline_retention"], df["base_low"], df["base_high"],
                                            strict=True)],
    })


def method_note(scores: Scores) -> str:
    return METHOD.format(n=scores.n_resamples, seed=scores.seed)
