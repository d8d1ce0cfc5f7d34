"""Arms, not rows: experiments that differ only in their seed form one arm.

An arm's score on a task is the mean over its seeds of the task's metric, with the spread over
seeds (std, min, max) and a 95% interval from a two-level bootstrap (seeds, then test items). Every
figure is recomputed from the stored per-example predictions, so it can be traced to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from taxon.evals.metrics import UNPARSED, scalar_metrics
from taxon.evals.ner import micro_f1
from taxon.evals.tasks import get_task
from taxon.report import stats
from taxon.study.load import arm_of
from taxon.study.store import Store

N_RESAMPLES = 1000
LOWER_IS_BETTER = {"loss", "perplexity", "ece"}


@dataclass
class Arm:
    name: str
    experiments: list[dict]  # store rows, one per seed
    spec: dict  # the first experiment's spec (recipe, axes without seed, model, stages)

    @property
    def seeds(self) -> list[int | None]:
        return [_seed(e) for e in self.experiments]

    @property
    def recipe(self) -> str | None:
        return self.spec.get("recipe")

    @property
    def axes(self) -> dict:
        return {k: v for k, v in (self.spec.get("axes") or {}).items() if k != "seed"}

    @property
    def model(self) -> str:
        return self.experiments[0]["model"]

    @property
    def trains(self) -> bool:
        """Whether the arm's model differs from its base: stages, or a composite of adapters (a
        composite is no zero-shot baseline)."""
        return bool(self.spec.get("stages")) or bool(self.spec.get("compose"))

    @property
    def compose(self) -> dict | None:
        return self.spec.get("compose")


def _seed(exp: dict) -> int | None:
    spec = json.loads(exp["spec"])
    if "seed" in (spec.get("axes") or {}):
        return spec["axes"]["seed"]
    stages = spec.get("stages") or []
    return stages[-1].get("seed") if stages else None


def arms(store: Store, study: str | None = None) -> list[Arm]:
    """The study's arms in the order their first experiment was recorded."""
    groups: dict[str, Arm] = {}
    for exp in store.experiments(study):
        key = arm_of(exp["name"])
        if key not in groups:
            groups[key] = Arm(key, [], json.loads(exp["spec"]))
        groups[key].experiments.append(exp)
    for arm in groups.values():
        arm.experiments.sort(key=lambda e: (_seed(e) is None, _seed(e) or 0))
    return list(groups.values())


@dataclass
class ItemStat:
    """A metric of one result as a function of its test items' indices."""

    n: int
    fn: object  # idx -> float

    def __call__(self, idx: np.ndarray) -> float:
        return float(self.fn(idx))  # type: ignore[operator]


def item_stat(store: Store, result: dict, metric: str) -> ItemStat | None:
    """Recompute `metric` of a stored result on any subset of its items, from its predictions.
    None where the metric is not a function of items alone (corpus BLEU, ECE without choices)."""
    task = get_task(result["task"])
    preds = store.predictions(result["model_key"], result["eval_key"])
    if not preds:
        return None
    if task.output == "multiple_choice":
        if metric not in stats.BOOTSTRAP_METRICS:
            return None
        gold = np.asarray([p["gold"] for p in preds], dtype=int)
        # an API reply that named no label is UNPARSED (-1): wrong, and in no class's precision
        pred = np.asarray([UNPARSED if p["pred"] is None else p["pred"] for p in preds], dtype=int)
        k = max(len(result["metrics"].get("per_class") or {}), int(max(gold.max(), pred.max())) + 1, 2)
        fn = scalar_metrics(k)[metric]
        return ItemStat(len(preds), lambda idx: fn(gold[idx], pred[idx], None))
    if task.output == "perplexity":
        nll = np.asarray([p["scores"]["nll"] for p in preds], dtype=float)
        tok = np.asarray([p["scores"]["tokens"] for p in preds], dtype=float)
        if metric == "loss":
            return ItemStat(len(preds), lambda idx: nll[idx].sum() / tok[idx].sum())
        if metric == "perplexity":
            return ItemStat(len(preds), lambda idx: float(np.exp(nll[idx].sum() / tok[idx].sum())))
        return None
    if metric == "entity_f1":  # micro F1 over entities: sum the sentences' counts, then divide
        if not all(isinstance(p["scores"], dict) and "entities" in p["scores"] for p in preds):
            return None
        counts = np.asarray([[p["scores"]["entities"][k] for k in ("correct", "predicted", "gold")]
                             for p in preds], dtype=float)
        return ItemStat(len(preds), lambda idx: micro_f1(counts[idx]))
    values = [p["scores"].get(metric) if isinstance(p["scores"], dict) else None for p in preds]
    if any(not isinstance(v, int | float) for v in values):
        return None
    arr = np.asarray(values, dtype=float)
    return ItemStat(len(preds), lambda idx: arr[idx].mean())


@dataclass
class ArmScore:
    arm: str
    task: str
    metric: str
    per_seed: list[float]
    n_items: int
    low: float
    high: float
    shots: int = 0
    stats: list[ItemStat] = field(default_factory=list, repr=False)

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_seed))

    @property
    def std(self) -> float:
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else 0.0

    @cached_property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER


def primary_metric(task: str) -> str:
    return get_task(task).primary


class Scores:
    """Every arm's score on every task, computed once per (arm, task, metric) and shared by the
    tables, the tests and the plots of one report."""

    def __init__(self, store: Store, study: str | None, n_resamples: int = N_RESAMPLES, seed: int = 0):
        self.store, self.study, self.n_resamples, self.seed = store, study, n_resamples, seed
        self.arms = arms(store, study)
        self._cache: dict[tuple[str, str, str], ArmScore | None] = {}

    def tasks(self) -> list[str]:
        seen: dict[str, None] = {}
        for arm in self.arms:
            for exp in arm.experiments:
                for r in self.store.experiment_results(exp):
                    seen.setdefault(r["task"], None)
        return list(seen)

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def results(self, arm: Arm, task: str) -> list[dict]:
        """One result per seed of the arm on the task (seeds without one are left out)."""
        out = []
        for exp in arm.experiments:
            rows = [r for r in self.store.experiment_results(exp) if r["task"] == task]
            if rows:
                out.append(rows[-1])
        return out

    def score(self, arm: Arm, task: str, metric: str | None = None) -> ArmScore | None:
        metric = metric or primary_metric(task)
        key = (arm.name, task, metric)
        if key not in self._cache:
            self._cache[key] = self._score(arm, task, metric)
        return self._cache[key]

    def _score(self, arm: Arm, task: str, metric: str) -> ArmScore | None:
        results = self.results(arm, task)
        item_stats = [item_stat(self.store, r, metric) for r in results]
        if not results or any(s is None for s in item_stats):
            return None
        ns = {s.n for s in item_stats}  # type: ignore[union-attr]
        if len(ns) != 1:
            return None  # seeds scored on different items cannot be averaged item by item
        n = ns.pop()
        every = np.arange(n)
        per_seed = [s(every) for s in item_stats]  # type: ignore[misc]
        low, high = stats.two_level_bootstrap(item_stats, n, self.n_resamples, self.seed)
        return ArmScore(arm.name, task, metric, per_seed, n, low, high, results[0]["shots"], item_stats)  # type: ignore[arg-type]
