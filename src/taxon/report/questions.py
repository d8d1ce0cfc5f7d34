"""The study's research questions, answered from its results.

A question compares arms. Two arms: on each task, a paired bootstrap of the metric difference over
seeds then test items (the test that decides), with Wilcoxon and a paired t test over seeds and
McNemar's exact test per seed pair (accuracy) beside it. Three or more arms: Friedman over seeds
(or tasks) with Nemenyi pairs and average ranks for a critical-difference diagram. The deciding
tests of one question are one family, corrected with Holm's method; a claim is made only where the
corrected p is below 0.05, and otherwise the answer is "not enough evidence", with what the design
could not reach and what would.

The thesis plan's questions are templates (rq1-rq5) that find their arms from the recipes and
axes of a grid study; a study may also ask its own (`questions:` in the study file).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from taxon.config import QuestionSpec
from taxon.evals import references
from taxon.report import stats
from taxon.report.arms import Arm, ArmScore, Scores, primary_metric

ALPHA = stats.ALPHA
TEMPLATES = {
    "rq1": "Does continued pretraining before fine-tuning beat fine-tuning directly?",
    "rq2": "Which data mixture and order works best?",
    "rq3": "Does training on one task transfer to the others (trained on X, gain on Y)?",
    "rq4": "Which recipe ranks best across task types?",
    "rq5": "What is the least data or compute that reaches {share:.0%} of GPT-4's score?",
}
PRETRAIN_FIRST = ("sequential", "domain_pretraining", "general_pretraining")
MIXTURES = ("multi_task", "curriculum", "mixed_objective", "sequential")


@dataclass
class Row:
    """One test, as the report prints it."""

    task: str
    metric: str
    a: str
    b: str
    comparison: stats.Comparison
    decides: bool  # in the question's Holm family


@dataclass
class Answer:
    id: str
    ask: str
    answer: str  # one line
    evidence: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    ranks: dict[str, dict] = field(default_factory=dict)  # task -> {ranks, cd, n_blocks}
    matrix: dict | None = None  # rq3: {"trained": [...], "tasks": [...], "gain": [[...]], "p": [[...]]}
    supported: bool = False


def _better(score: ArmScore, effect: float) -> bool:
    return effect > 0 if score.higher_is_better else effect < 0


def pair_tests(scores: Scores, a: Arm, b: Arm, task: str, metric: str | None) -> list[Row]:
    sa, sb = scores.score(a, task, metric), scores.score(b, task, metric)
    if sa is None or sb is None or sa.n_items != sb.n_items:
        return []
    rows = [
        Row(
            task,
            sa.metric,
            a.name,
            b.name,
            stats.paired_two_level_bootstrap(
                sa.stats, sb.stats, sa.n_items, scores.n_resamples, scores.seed, sa.metric
            ),
            True,
        )
    ]
    if len(sa.per_seed) >= 2 and len(sa.per_seed) == len(sb.per_seed):
        rows.append(
            Row(task, sa.metric, a.name, b.name, stats.wilcoxon_seeds(sa.per_seed, sb.per_seed), False)
        )
        rows.append(
            Row(task, sa.metric, a.name, b.name, stats.paired_t_seeds(sa.per_seed, sb.per_seed), False)
        )
    ra, rb = scores.results(a, task), scores.results(b, task)
    if scores.store and ra and rb and "accuracy" in ra[0]["metrics"]:
        k = max(len(ra), len(rb))
        for i in range(k):
            x, y = ra[min(i, len(ra) - 1)], rb[min(i, len(rb) - 1)]
            pa, pb = (scores.store.predictions(r["model_key"], r["eval_key"]) for r in (x, y))
            if len(pa) != len(pb) or not pa or pa[0]["pred"] is None or isinstance(pa[0]["pred"], str):
                break
            gold = [p["gold"] for p in pa]
            c = stats.mcnemar_exact(
                gold,
                [p["pred"] if p["pred"] is not None else -1 for p in pa],
                [p["pred"] if p["pred"] is not None else -1 for p in pb],
            )
            seed_a, seed_b = a.seeds[min(i, len(a.seeds) - 1)], b.seeds[min(i, len(b.seeds) - 1)]
            rows.append(
                Row(
                    task,
                    "accuracy",
                    a.name + ("" if seed_a is None else f" (seed {seed_a})"),
                    b.name + ("" if seed_b is None else f" (seed {seed_b})"),
                    c,
                    False,
                )
            )
    return rows


def _holm(rows: list[Row]) -> list[Row]:
    deciding = [r for r in rows if r.decides]
    adjusted = stats.holm([r.comparison for r in deciding])
    for r, c in zip(deciding, adjusted, strict=True):
        r.comparison = c
    return rows


def _why_not(rows: list[Row], scores: Scores, a: Arm, b: Arm) -> str:
    """What the design could not reach, and what would reach it: more seeds where seeds vary
    (paired t power), more test items where one seed stands for an arm (bootstrap scaling)."""
    parts = []
    seeds = min(len(a.seeds), len(b.seeds))
    if seeds >= 2 and stats.smallest_wilcoxon_p(seeds) >= ALPHA:
        parts.append(
            f"Wilcoxon over {seeds} seeds cannot go below p = {stats.smallest_wilcoxon_p(seeds):.3g} "
            f"(at least {stats.seeds_needed()} seeds needed)"
        )
    for r in rows:
        c = r.comparison
        if seeds >= 2 and c.test == "paired_t" and c.effect is not None:
            need = stats.seeds_for_power(c.effect)
            if need:
                parts.append(
                    f"{r.task}: about {need} seeds would give a paired t test 80% power for the "
                    f"observed effect (d_z = {c.effect:.2f})"
                )
        elif seeds < 2 and r.decides and c.effect:
            need = stats.items_needed(c)
            if need.n:
                parts.append(
                    f"{r.task}: about {need.n} test items would make the observed "
                    f"{r.metric} difference {c.effect:+.3f} significant"
                )
    return "; ".join(parts)


def compare_two(
    scores: Scores, qid: str, ask: str, a: Arm, b: Arm, tasks: list[str], metric: str | None
) -> Answer:
    rows = _holm([r for t in tasks for r in pair_tests(scores, a, b, t, metric)])
    answer = Answer(qid, ask, "", rows=rows)
    wins, losses = [], []
    for r in rows:
        if not r.decides:
            continue
        c = r.comparison
        s = scores.score(a, r.task, metric)
        line = (
            f"{r.task} {r.metric}: {a.name} - {b.name} = {c.effect:+.3f} "
            f"[{c.effect_low:+.3f}, {c.effect_high:+.3f}], p = {c.p:.3g}, Holm p = {c.p_adjusted:.3g}"
        )
        answer.evidence.append(line)
        if c.p_adjusted is not None and c.p_adjusted < ALPHA:
            (wins if _better(s, c.effect) else losses).append(r.task)
    if not rows:
        answer.answer = f"not enough evidence: {a.name} and {b.name} have no results on the same items"
        return answer
    claims = []
    if wins:
        claims.append(f"{a.name} beats {b.name} on {', '.join(wins)}")
    if losses:
        claims.append(f"{b.name} beats {a.name} on {', '.join(losses)}")
    undecided = [r.task for r in rows if r.decides and r.task not in wins + losses]
    if claims:
        answer.supported = True
        answer.answer = "; ".join(claims) + " (Holm-corrected p < 0.05)"
        if undecided:
            answer.answer += f"; not enough evidence on {', '.join(undecided)}"
    else:
        why = _why_not(rows, scores, a, b)
        answer.answer = (
            f"not enough evidence: no difference between {a.name} and {b.name} survives "
            f"Holm correction on {', '.join(undecided)}" + (f" ({why})" if why else "")
        )
    return answer


def rank_many(
    scores: Scores, qid: str, ask: str, arms: list[Arm], tasks: list[str], metric: str | None
) -> Answer:
    """Friedman over seeds per task when every arm has the same number (>= 2) of seeds, else one
    Friedman over tasks (each arm's mean per task); Nemenyi pairs and average ranks."""
    answer = Answer(qid, ask, "")
    k = max(len(a.seeds) for a in arms)
    # Blocks are seeds when every arm has k >= 2 of them; an arm with one (zero-shot, which no seed
    # changes) repeats its score in every block.
    blocks_are_seeds = k >= 2 and all(len(a.seeds) in (1, k) for a in arms)
    families: list[tuple[str, dict[str, list[float]], bool]] = []
    if blocks_are_seeds:
        for t in tasks:
            ss = [scores.score(a, t, metric) for a in arms]
            if all(s is not None for s in ss):
                table = {
                    a.name: (s.per_seed * k if len(s.per_seed) == 1 else s.per_seed)  # type: ignore[union-attr]
                    for a, s in zip(arms, ss, strict=True)
                }
                families.append((t, table, ss[0].higher_is_better))  # type: ignore[union-attr]
    else:
        means: dict[str, list[float]] = {a.name: [] for a in arms}
        used = []
        for t in tasks:
            ss = [scores.score(a, t, metric) for a in arms]
            if all(s is not None for s in ss):
                used.append(t)
                for a, s in zip(arms, ss, strict=True):  # oriented so that higher is better
                    means[a.name].append(s.mean if s.higher_is_better else -s.mean)  # type: ignore[union-attr]
        if len(used) >= 2:
            families.append(("tasks: " + ", ".join(used), means, True))
    if not families:
        answer.answer = (
            "not enough evidence: comparing 3+ arms needs each arm on >= 2 seeds or >= 2 shared tasks"
        )
        return answer
    rows = []
    for label, table, higher in families:
        oriented = {k: (v if higher else [-x for x in v]) for k, v in table.items()}
        try:
            c = stats.friedman(oriented)
        except ValueError:
            continue
        rows.append(Row(label, metric or "primary", " vs ".join(table), "", c, True))
        ranks = stats.average_ranks(oriented)
        n_blocks = len(next(iter(table.values())))
        nemenyi = stats.nemenyi(oriented)
        answer.ranks[label] = {
            "ranks": ranks,
            "cd": stats.critical_difference(len(table), n_blocks),
            "n_blocks": n_blocks,
            "nemenyi": nemenyi,
        }
    _holm(rows)
    answer.rows = rows
    for r in rows:
        info = answer.ranks[r.task]
        best = min(info["ranks"], key=info["ranks"].get)
        c = r.comparison
        line = (
            f"{r.task}: Friedman chi2 = {c.statistic:.2f}, n = {c.n} blocks, p = {c.p:.3g}, "
            f"Holm p = {c.p_adjusted:.3g}, Kendall's W = {c.effect:.2f}; best average rank {best} "
            f"({info['ranks'][best]:.2f}), critical difference {info['cd']:.2f}"
        )
        answer.evidence.append(line)
        if c.p_adjusted is not None and c.p_adjusted < ALPHA:
            beaten = [k for k in info["ranks"] if k != best and info["nemenyi"].loc[best, k] < ALPHA]
            if beaten:
                answer.supported = True
                answer.answer += (
                    f"{'; ' if answer.answer else ''}{r.task}: {best} ranks best, ahead of "
                    f"{', '.join(beaten)} (Nemenyi p < 0.05)"
                )
    if not answer.answer:
        answer.answer = (
            "not enough evidence: no arm ranks significantly ahead (Friedman/Nemenyi "
            f"after Holm) over {rows[0].comparison.n if rows else 0} blocks"
        )
    return answer


def baseline_for(scores: Scores, arm: Arm) -> Arm | None:
    """The zero-shot arm of the same model."""
    return next(
        (b for b in scores.arms if not b.trains and b.model == arm.model and not b.model.startswith("api:")),
        None,
    )


def transfer(scores: Scores, qid: str, ask: str, tasks: list[str], metric: str | None) -> Answer:
    """rq3: arms trained on one task each (axis `task`, or named by `compare`) against their
    model's zero-shot arm, on every evaluated task."""
    trained = [a for a in scores.arms if a.trains and "task" in a.axes]
    answer = Answer(qid, ask, "")
    if not trained:
        answer.answer = "not enough evidence: no arms trained on different tasks (a `task` axis)"
        return answer
    rows, matrix = [], {"trained": [], "tasks": tasks, "gain": [], "p": [], "diagonal": []}
    for arm in trained:
        base = baseline_for(scores, arm)
        if base is None:
            continue
        gains, cells = [], []
        for t in tasks:
            tests = pair_tests(scores, arm, base, t, metric)
            first = tests[0] if tests else None
            if first is not None:
                rows.append(first)
            gains.append(None if first is None else first.comparison.effect)
            cells.append(first)
        matrix["trained"].append(f"{arm.name}")
        matrix["diagonal"].append(str(arm.axes.get("task")))
        matrix["gain"].append(gains)
        matrix["p"].append(cells)
    _holm(rows)
    matrix["p"] = [[None if c is None else c.comparison.p_adjusted for c in row] for row in matrix["p"]]
    answer.rows, answer.matrix = rows, matrix
    claims = []
    for name, diag, gains, ps in zip(
        matrix["trained"], matrix["diagonal"], matrix["gain"], matrix["p"], strict=True
    ):
        for t, g, p in zip(tasks, gains, ps, strict=True):
            if g is not None and p is not None and p < ALPHA and t != diag:
                claims.append(f"{name} -> {t} {g:+.3f}")
    answer.supported = bool(claims)
    answer.answer = (
        "transfer beyond the trained task (Holm p < 0.05): " + "; ".join(claims)
        if claims
        else "not enough evidence of transfer to other tasks after Holm correction"
    )
    return answer


def least_to_reach(
    scores: Scores, qid: str, ask: str, axis: str | None, share: float, tasks: list[str], metric: str | None
) -> Answer:
    """rq5: along a scaling axis (steps or data fraction), the smallest value whose arm's 95%
    interval lies above `share` of GPT-4's published score (or an API reference arm's)."""
    answer = Answer(qid, ask, "")
    axes = [axis] if axis else ["fraction", "steps"]
    series: dict[tuple, list[tuple[float, Arm]]] = {}
    for arm in scores.arms:
        for ax in axes:
            if ax in arm.axes:
                rest = tuple(sorted((k, str(v)) for k, v in arm.axes.items() if k != ax))
                series.setdefault((ax, arm.recipe, rest), []).append((float(arm.axes[ax]), arm))
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        answer.answer = (
            f"not enough evidence: the study has no scaling axis ({' or '.join(axes)}) with 2+ values"
        )
        return answer
    found = []
    for (ax, recipe, rest), points in series.items():
        for t in tasks:
            ref = reference(scores, t, metric)
            if ref is None:
                continue
            value, source = ref
            goal = share * value
            reached = None
            for x, arm in sorted(points, key=lambda p: p[0]):
                s = scores.score(arm, t, metric)
                if s is not None and s.low >= goal:
                    reached = (x, arm, s)
                    break
            label = f"{recipe or 'arm'} {dict(rest)}"
            if reached:
                x, arm, s = reached
                found.append(
                    f"{t}: {ax} = {x:g} ({arm.name}: {s.mean:.3f} [{s.low:.3f}, {s.high:.3f}] >= {goal:.3f})"
                )
                answer.evidence.append(
                    f"{label}, {t}: first {ax} whose interval clears {share:.0%} of {source} = {x:g}"
                )
            else:
                answer.evidence.append(
                    f"{label}, {t}: no {ax} value clears {share:.0%} of {source} "
                    f"({goal:.3f}) with its whole interval"
                )
    answer.supported = bool(found)
    answer.answer = (
        "; ".join(found)
        if found
        else f"not enough evidence: no value along the axis reaches {share:.0%} of the reference "
        "with its whole 95% interval"
    )
    return answer


def reference(scores: Scores, task: str, metric: str | None) -> tuple[float, str] | None:
    """The large-model score to set arms against: an API arm evaluated on the task (our prompts
    and items) if the store has one, else GPT-4's published score."""
    for arm in scores.arms:
        if arm.model.startswith("api:"):
            s = scores.score(arm, task, metric)
            if s is not None:
                return s.mean, f"{arm.model} (API, our prompts)"
    results = [r for a in scores.arms for r in scores.results(a, task)][:1]
    if not results:
        return None
    metrics = results[0]["metrics"]
    wanted = metric or primary_metric(task)
    ref = references.target(
        task, {wanted: metrics.get(wanted)} if wanted in metrics else {}, results[0]["shots"]
    )
    return None if ref is None else (ref.value, f"{ref.model}'s published {ref.metric} {ref.value:.3f}")



def _named(scores: Scores, names: tuple[str, ...], qid: str) -> list[Arm]:
    out = []
    for n in names:
        arm = scores.arm(n)
        if arm is None:
            known = ", ".join(a.name for a in scores.arms)
            raise ValueError(f"question {qid}: no arm named {n!r}; arms: {known}")
        out.append(arm)
    return out


def _pairs_by_recipe(scores: Scores, treat: tuple[str, ...], control: str) -> list[tuple[Arm, Arm]]:
    """Arms of a treatment recipe matched with the control recipe's arm of identical other axes."""
    out = []
    for a, b in itertools.product(scores.arms, scores.arms):
        if a.recipe in treat and b.recipe == control:
            shared = set(a.axes) & set(b.axes)
            if all(a.axes[k] == b.axes[k] for k in shared if k in ("model", "task", "fraction")):
                out.append((a, b))
    return out


def answer(scores: Scores, q: QuestionSpec, index: int) -> Answer:
    qid = q.id or q.template or f"q{index + 1}"
    ask = q.ask or TEMPLATES.get(q.template or "", "").format(share=q.share) or " vs ".join(q.compare)
    tasks = list(q.tasks) or scores.tasks()
    if q.template == "rq3":
        return transfer(scores, qid, ask, tasks, q.metric)
    if q.template == "rq5":
        return least_to_reach(scores, qid, ask, q.axis, q.share, tasks, q.metric)
    if q.compare:
        arms = _named(scores, q.compare, qid)
    elif q.template == "rq1":
        pairs = _pairs_by_recipe(scores, PRETRAIN_FIRST, "direct_finetuning")
        if not pairs:
            return Answer(
                qid,
                ask,
                "not enough evidence: the study has no arms that pretrain before "
                "fine-tuning next to direct fine-tuning",
            )
        parts = [compare_two(scores, qid, ask, a, b, tasks, q.metric) for a, b in pairs]
        merged = Answer(
            qid,
            ask,
            "; ".join(p.answer for p in parts),
            [e for p in parts for e in p.evidence],
            [r for p in parts for r in p.rows],
        )
        merged.supported = any(p.supported for p in parts)
        return merged
    elif q.template == "rq2":
        arms = [a for a in scores.arms if a.recipe in MIXTURES]
    elif q.template == "rq4":
        by_recipe: dict[str, Arm] = {}
        for a in scores.arms:
            if a.recipe and a.trains:
                by_recipe.setdefault(a.recipe, a)
        arms = list(by_recipe.values())
    else:
        arms = []
    if len(arms) < 2:
        return Answer(qid, ask, f"not enough evidence: the study has {len(arms)} arm(s) for this question")
    if len(arms) == 2:
        return compare_two(scores, qid, ask, arms[0], arms[1], tasks, q.metric)
    return rank_many(scores, qid, ask, arms, tasks, q.metric)


def default_questions(scores: Scores) -> list[QuestionSpec]:
    """Without `questions:`: the templates the study's shape supports, else every trained arm
    against its model's zero-shot arm."""
    recipes = {a.recipe for a in scores.arms}
    out = []
    if recipes & set(PRETRAIN_FIRST) and "direct_finetuning" in recipes:
        out.append(QuestionSpec(template="rq1"))
    if len(recipes & set(MIXTURES)) >= 2:
        out.append(QuestionSpec(template="rq2"))
    if any("task" in a.axes and a.trains for a in scores.arms):
        out.append(QuestionSpec(template="rq3"))
    if len({a.recipe for a in scores.arms if a.trains and a.recipe}) >= 3:
        out.append(QuestionSpec(template="rq4"))
    if any({"steps", "fraction"} & set(a.axes) for a in scores.arms):
        out.append(QuestionSpec(template="rq5"))
    if not out:
        for arm in scores.arms:
            base = baseline_for(scores, arm)
            if arm.trains and base is not None:
                out.append(
                    QuestionSpec(
                        id=f"lift:{arm.name}",
                        compare=(arm.name, base.name),
                        ask=f"Does {arm.name} lift the model over its zero-shot score?",
                    )
                )
    return out


def answer_all(scores: Scores, questions: tuple[QuestionSpec, ...] | list[QuestionSpec]) -> list[Answer]:
    qs = list(questions) or default_questions(scores)
    return [answer(scores, q, i) for i, q in enumerate(qs)]
