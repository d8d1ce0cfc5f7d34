"""Evaluation tasks: YAML files in `tasks/`, each naming its card, split, output type and metrics."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from taxon.config import Spec, parse
from taxon.data.cards import get_card
from taxon.errors import TaxonError

TASKS_DIR = Path(__file__).with_name("tasks")


class Reference(Spec):
    """A published large-model score to compare against (from shared/reference, with source)."""

    model: str
    metric: str
    shots: int | str
    value: float
    source: str
    note: str = ""


class TaskSpec(Spec):
    name: str
    description: str = ""
    dataset: str
    config: str | None = None
    split: str = "test"
    fewshot_split: str = "train"  # demonstrations come from here, never from `split`
    output: Literal["multiple_choice"] = "multiple_choice"
    shots: int = Field(0, ge=0)
    chat: bool | None = None  # None: use the chat template when the model has one
    metrics: tuple[str, ...] = ("accuracy", "macro_f1", "weighted_f1", "ece")
    primary: str = "macro_f1"
    references: tuple[Reference, ...] = ()


@cache
def _registry() -> dict[str, TaskSpec]:
    out = {}
    for f in sorted(TASKS_DIR.glob("*.yaml")):
        data = yaml.safe_load(f.read_text())
        task = parse(TaskSpec, data, str(f))
        out[task.name] = task  # type: ignore[index]
    return out


def all_tasks() -> list[TaskSpec]:
    return list(_registry().values())


def get_task(name: str) -> TaskSpec:
    if name not in _registry():
        raise TaxonError(
            f"unknown eval task '{name}'; choose from: {', '.join(sorted(_registry()))}"
        )
    return _registry()[name]


def parse_task_list(tasks: str | list[str] | tuple[str, ...]) -> list[TaskSpec]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return all_tasks()
    if not names:
        raise TaxonError("no eval tasks given; pass --tasks fpb,tfns (or all)")
    return [get_task(n) for n in names]


def held_out_splits(dataset: str) -> set[str]:
    """Splits of `dataset` that some eval task scores on: training must never read them."""
    card_id = get_card(dataset).id
    return {t.split for t in all_tasks() if get_card(t.dataset).id == card_id}
