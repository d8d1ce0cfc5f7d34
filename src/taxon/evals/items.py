"""A task's items: each row of a split (each row x question, when the task asks several) with the
variables its templates see, rendered with the task's own templates or, where it gives none, the
card's. The same functions render test items and few-shot demonstrations, so both look alike."""

from __future__ import annotations

from dataclasses import dataclass

from taxon.data import render
from taxon.data.cards import Card
from taxon.errors import TaxonError
from taxon.evals.tasks import TaskSpec


@dataclass(frozen=True)
class Item:
    idx: int  # unique in the split: row index x number of questions + question index
    row: dict
    vars: dict  # the row's columns, the question's keys, and the row itself as `row`
    group: str | None = None  # the question's name


def variables(row: dict, question: dict | None = None) -> dict:
    return {**row, **(question or {}), "row": row}


def expand(task: TaskSpec, rows) -> list[Item]:
    """Items of `rows` (each with its split index `_idx`): one per row, or one per question."""
    questions = task.questions or (None,)
    k = len(questions)
    return [Item(row["_idx"] * k + j, row, variables(row, q), q["name"] if q else None)
            for row in rows for j, q in enumerate(questions)]


def _templates(task: TaskSpec, card: Card) -> tuple[str, str]:
    prompt = task.prompt or card.templates.prompt
    completion = task.completion or card.templates.completion
    if prompt is None or completion is None:
        raise TaxonError(f"task '{task.name}': dataset '{card.id}' has no prompt/completion templates; "
                         "give the task its own `prompt` and `completion`")
    return prompt, completion


def pair(task: TaskSpec, card: Card, vars: dict) -> tuple[str, str]:
    """(prompt, reference completion) of one item."""
    prompt, completion = _templates(task, card)
    return render.render(card, prompt, vars), render.render(card, completion, vars)


def choices(task: TaskSpec, card: Card) -> tuple[str, ...]:
    names = task.choices or card.labels
    if not names:
        raise TaxonError(f"task '{task.name}': dataset '{card.id}' has no labels; give the task `choices`")
    return names


def gold_index(task: TaskSpec, card: Card, vars: dict) -> int:
    """The gold choice: the card's integer label, or the task's `label` template's name."""
    if task.label is None:
        return int(vars[card.label_field])
    name = render.render(card, task.label, vars).strip()
    names = choices(task, card)
    if name not in names:
        raise TaxonError(f"task '{task.name}': label template gave {name!r}, which is not one of "
                         f"choices {list(names)}; fix the task's `label` or `choices`")
    return names.index(name)


def choice_text(task: TaskSpec, card: Card, vars: dict, i: int) -> str:
    """The completion that states choice `i` (its verbaliser)."""
    _, completion = _templates(task, card)
    v = {**vars, "label_name": choices(task, card)[i]}
    if task.choices is None:
        v[card.label_field] = i
    return render.render(card, completion, v)


def demo_pair(task: TaskSpec, card: Card, vars: dict) -> tuple[str, str]:
    """A demonstration: the prompt and, for multiple choice, the gold choice's verbaliser."""
    if task.output != "multiple_choice":
        return pair(task, card, vars)
    prompt = render.render(card, _templates(task, card)[0], vars)
    return prompt, choice_text(task, card, vars, gold_index(task, card, vars))
