"""Tasks made of subsets: several configs of one card (MMLU's 57 subjects) or the values of one
column (MMLU-Pro's 14 categories). Items of all subsets are scored together, so the scorer sees
every subject's shared demonstrations at once; demonstrations come from the item's own subset,
and metrics are reported per subset and macro-averaged over subsets.

An item's `_idx` is its position in the subsets laid end to end, in order (configs in the order
the task gives them, each config's rows in split order), so stored predictions stay unique per task
and `settings.subsets` maps every index range back to its subset."""

from __future__ import annotations

import numpy as np

from taxon.data import render
from taxon.data.cards import Card, get_card
from taxon.data.sources import load_rows
from taxon.evals.tasks import TaskSpec

SUBSET = "_subset"  # the subset's name, added to every item
CONFIG = "_config"  # the card config an item comes from


def has_subsets(task: TaskSpec) -> bool:
    return bool(task.configs or task.group_by)


def task_configs(task: TaskSpec) -> list[str | None]:
    if not task.configs:
        return [task.config]
    if task.configs == "all":
        # A card's union config (the Hub's `all` for MMLU) repeats the subjects: leave it out.
        return [c for c in get_card(task.dataset).configs if c != "all"]
    return list(task.configs)


def item_card(task: TaskSpec, row: dict) -> Card:
    return get_card(task.dataset).for_config(row.get(CONFIG, task.config))


def _subset_of(task: TaskSpec, row: dict, config: str | None) -> str:
    return str(row[task.group_by]) if task.group_by else str(config)


def items(task: TaskSpec, limit: int | None, seed: int) -> tuple[list[dict], int, list[dict]]:
    """The scored items (`limit`: a seeded subsample of each subset), the number of items in
    all subsets, and each subset's name, first index and size."""
    out, layout, offset = [], [], 0
    for config in task_configs(task):
        rows = load_rows(task.dataset, config, task.split)
        groups: dict[str, list[dict]] = {}
        for i, row in enumerate(rows):
            row = {**row, "_idx": offset + i, CONFIG: config}
            groups.setdefault(_subset_of(task, row, config), []).append(row)
        for name, members in groups.items():
            layout.append({"name": name, "first": members[0]["_idx"], "size": len(members)})
            picked = range(len(members))
            if limit is not None and limit < len(members):
                picked = sorted(np.random.default_rng(seed).permutation(len(members))[:limit])
            out += [{**members[int(j)], SUBSET: name} for j in picked]
        offset += len(rows)
    return out, offset, layout


def fewshot_pool(task: TaskSpec, row: dict, pools: dict):
    """The rows an item's demonstrations come from: its subset's part of the few-shot split, less
    rows failing the task's `where` (loaded once per evaluation into `pools`)."""
    config = row.get(CONFIG, task.config)
    group = str(row[task.group_by]) if task.group_by else None
    if (config, group) not in pools:
        rows = load_rows(task.dataset, config, task.fewshot_split)
        if task.group_by:
            rows = rows.filter(lambda r: str(r[task.group_by]) == group)
        if task.where:
            card = item_card(task, row)
            rows = rows.filter(lambda r: render.holds(card, task.where, r))
        pools[(config, group)] = rows
    return pools[(config, group)]


def report(subsets: list[str], correct: np.ndarray, seed: int, n_resamples: int = 1000) -> tuple[dict, dict]:
    """Per-subset accuracy ({name: {n, accuracy}}) and the macro average over subsets with a 95%
    interval from a stratified bootstrap (items resampled within each subset)."""
    names = list(dict.fromkeys(subsets))
    subsets_arr = np.asarray(subsets)
    rng = np.random.default_rng(seed)
    per, boot = {}, []
    for name in names:
        c = correct[subsets_arr == name].astype(float)
        per[name] = {"n": int(len(c)), "accuracy": float(c.mean())}
        boot.append(c[rng.integers(0, len(c), (n_resamples, len(c)))].mean(axis=1))
    means = np.mean(boot, axis=0)
    value = float(np.mean([p["accuracy"] for p in per.values()]))
    low, high = np.percentile(means, [2.5, 97.5])
    return per, {"value": value, "low": float(low), "high": float(high)}
