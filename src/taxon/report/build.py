"""A study's report as data: the arm summary, compute, comparisons, answered questions and
figures, gathered once from the store and then written as HTML, Markdown, LaTeX, CSV and images
(report/write.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from taxon.config import QuestionSpec
from taxon.evals import references
from taxon.report import adapter_sets, forgetting, plots, retention
from taxon.report.arms import N_RESAMPLES, Scores
from taxon.report.compute import Compute, arm_compute, assumptions
from taxon.report.questions import Answer, answer_all, baseline_for, reference
from taxon.report.tables import results_table
from taxon.study.store import Store

METHOD = (
    f"Arm = experiments that differ only in seed. Mean ± sd over seeds; 95% interval from a "
    f"two-level bootstrap (seeds with replacement, then test items with replacement within "
    f"each drawn seed; metric recomputed on every resample; {N_RESAMPLES:,} resamples, seed 0). "
    "Gain: difference from the same model's zero-shot arm on the same items. % of reference: "
    "share of the large model's score (an API arm in this store with our prompts and items, "
    "else GPT-4's published score, cited below)."
)


@dataclass
class Report:
    study: str | None
    summary: pd.DataFrame
    compute: pd.DataFrame
    comparisons: pd.DataFrame
    answers: list[Answer]
    figures: dict[str, tuple[str, Figure]]  # key -> (caption, figure)
    experiments_md: str  # the per-experiment table (each seed's own row)
    notes: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    large_models: pd.DataFrame = field(default_factory=pd.DataFrame)
    decision: pd.DataFrame = field(default_factory=pd.DataFrame)  # watched stages (forgetting)
    retention: pd.DataFrame = field(default_factory=pd.DataFrame)  # composite adapters
    adapter_sets: list = field(default_factory=list)  # adapter_sets.SetView per declared set


def _large_models(scores: Scores, tasks: list[str]) -> pd.DataFrame:
    """API arms (the large-model yardstick on our prompts and items) beside the published score,
    with how each was scored, what it cost, and the prompt it was sent."""
    rows = []
    for arm in scores.arms:
        if not arm.model.startswith("api:"):
            continue
        for t in tasks:
            s = scores.score(arm, t)
            results = scores.results(arm, t)
            if s is None or not results:
                continue
            settings = results[0]["metrics"].get("settings", {})
            api = settings.get("api", {})
            published = references.target(t, results[0]["metrics"], results[0]["shots"])
            rows.append(
                {
                    "model": arm.model,
                    "task": t,
                    "shots": results[0]["shots"],
                    "metric": s.metric,
                    "score": s.mean,
                    "ci_low": s.low,
                    "ci_high": s.high,
                    "published": None
                    if published is None
                    else f"{published.model} {published.metric} {published.value:.3f} ({published.source})",
                    "method": api.get("method"),
                    "unparsed": api.get("unparsed"),
                    "prompt_tokens": api.get("prompt_tokens"),
                    "completion_tokens": api.get("completion_tokens"),
                    "cost_usd": api.get("cost_usd"),
                    "prompt_example": settings.get("prompt_example", ""),
                }
            )
    return pd.DataFrame(rows)


def _summary(scores: Scores, tasks: list[str]) -> tuple[pd.DataFrame, list[str]]:
    rows, cited = [], {}
    for arm in scores.arms:
        base = baseline_for(scores, arm)
        for t in tasks:
            s = scores.score(arm, t)
            if s is None:
                continue
            b = scores.score(base, t) if base is not None and base is not arm else None
            ref = reference(scores, t, s.metric)
            if ref is not None:
                cited[t] = f"{t}: {ref[1]}"
            rows.append(
                {
                    "arm": arm.name,
                    "model": arm.model,
                    "seeds": len(s.per_seed),
                    "task": t,
                    "metric": s.metric,
                    "n": s.n_items,
                    "mean": s.mean,
                    "sd": s.std,
                    "min": min(s.per_seed),
                    "max": max(s.per_seed),
                    "ci_low": s.low,
                    "ci_high": s.high,
                    "gain": None if b is None else s.mean - b.mean,
                    "pct_of_reference": None if ref is None or not ref[0] else 100 * s.mean / ref[0],
                }
            )
    return pd.DataFrame(rows), list(cited.values())


def _compute(store: Store, scores: Scores) -> tuple[pd.DataFrame, dict[str, Compute]]:
    out, rows = {}, []
    for arm in scores.arms:
        if arm.model.startswith("api:"):
            continue
        c = arm_compute(store, arm)
        out[arm.name] = c
        rows.append(
            {
                "arm": arm.name,
                "steps": c.steps,
                "tokens": c.tokens,
                "train_s": c.train_seconds,
                "eval_s": c.eval_seconds,
                "trainable_params": c.trainable_params,
                "peak_memory_mb": c.peak_memory_mb,
                "gpu_hours": c.gpu_hours,
                "kwh": c.kwh,
                "usd": c.usd,
            }
        )
    return pd.DataFrame(rows), out


def _comparisons(answers: list[Answer]) -> pd.DataFrame:
    rows = []
    for a in answers:
        for r in a.rows:
            c = r.comparison
            rows.append(
                {
                    "question": a.id,
                    "task": r.task,
                    "metric": r.metric,
                    "a": r.a,
                    "b": r.b,
                    "test": c.test,
                    "n": c.n,
                    "statistic": c.statistic,
                    "p": c.p,
                    "p_holm": c.p_adjusted,
                    "effect": c.effect,
                    "effect_low": c.effect_low,
                    "effect_high": c.effect_high,
                    "decides": r.decides,
                    "note": c.note,
                }
            )
    return pd.DataFrame(rows)


def build(store: Store, study: str | None, questions: list[QuestionSpec] | tuple = ()) -> Report:
    scores = Scores(store, study)
    tasks = scores.tasks()
    if not scores.arms:
        raise ValueError(f"the store has no experiments{f' of study {study}' if study else ''}")
    summary, cited = _summary(scores, tasks)
    compute_df, compute = _compute(store, scores)
    answers = answer_all(scores, questions)
    figures: dict[str, tuple[str, Figure | None]] = {
        "heatmap": (
            "Strategy x task: each task's primary metric, mean over seeds.",
            plots.heatmap(scores, tasks),
        ),
        "scaling": (
            "Scaling curves: score against steps or data fraction, 95% intervals.",
            plots.scaling(scores, tasks),
        ),
        "forgetting": ("Forgetting: domain against general loss per arm.", plots.forgetting(scores)),
        "lora": ("LoRA rank x alpha.", plots.lora_grid(scores, tasks)),
        "pareto": (
            "Score against training compute, with the Pareto front.",
            plots.pareto(scores, compute, tasks),
        ),
    }
    # stages watched during training (domain adaptation): the decision table and its figure
    decision = pd.DataFrame(forgetting.decision_table(store, study))
    watched = forgetting.forgetting_figure(store, study)
    if watched is not None:
        figures["watched"] = ("Watched stages: domain against general loss over training steps.", watched)
    for a in answers:
        if a.matrix:
            figures[f"transfer-{a.id}"] = (f"{a.id}: transfer matrix.", plots.transfer_matrix(a.matrix))
        for label, info in a.ranks.items():
            key = f"cd-{a.id}-{len(figures)}"
            figures[key] = (
                f"{a.id}: critical-difference diagram ({label}; Nemenyi, alpha 0.05).",
                plots.cd_diagram(info["ranks"], info["cd"], f"{a.id}: {label}"),
            )
    sets = adapter_sets.views(store, scores, study, tasks)
    for view in sets:
        figures[f"transfer-set-{view.name}"] = (
            f"Adapter set {view.name}: transfer matrix (base row first; outlined: own task).",
            plots.transfer_matrix(view.matrix),
        )
    notes = [METHOD, assumptions()]
    kept = retention.retention_table(scores, tasks)  # composites of adapters, if the study has any
    if not kept.empty:
        notes.append(retention.method_note(scores))
    return Report(
        study,
        summary,
        compute_df,
        _comparisons(answers),
        answers,
        {k: (cap, f) for k, (cap, f) in figures.items() if f is not None},
        results_table(store, study),
        notes,
        cited,
        _large_models(scores, tasks),
        decision,
        kept,
        sets,
    )


def answer_lines(report: Report) -> list[str]:
    return [f"{a.id}: {a.answer}" for a in report.answers]


def to_json(report: Report) -> str:
    return json.dumps(
        {
            "study": report.study,
            "answers": [
                {
                    "id": a.id,
                    "ask": a.ask,
                    "answer": a.answer,
                    "supported": a.supported,
                    "evidence": a.evidence,
                }
                for a in report.answers
            ],
        },
        indent=2,
    )
