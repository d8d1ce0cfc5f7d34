"""The test text of every eval task, for `taxon corpus build` to remove from training text."""

from __future__ import annotations

from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.sources import load_rows
from taxon.errors import TaxonError
from taxon.evals.tasks import all_tasks, missing_data


def test_texts() -> tuple[dict[str, list[str]], dict[str, str]]:
    """{task: its test split's rows as text (the card's text template)}, and {task: why it was
    skipped} for tasks whose data is not on this machine. Tasks that share a split read it once."""
    texts: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for task in all_tasks():
        base = get_card(task.dataset)
        configs = ([c for c in base.configs if c != "all"] if task.configs == "all"
                   else list(task.configs or [task.config]))
        for config in configs:
            card = base.for_config(config)
            key = (card.id, card.config, task.split)
            if key in seen:
                skipped[task.name] = f"same test split as {seen[key]}"
                continue
            part = task.model_copy(update={"config": config, "configs": None})
            reason = missing_data(part)
            if reason:
                skipped[task.name] = reason
                continue
            seen[key] = task.name
            try:
                rows = load_rows(task.dataset, config, task.split)
            except TaxonError as e:
                skipped[task.name] = str(e)
                continue
            texts.setdefault(task.name, []).extend(
                t for t in (render.as_text(card, r) for r in rows) if t.strip())
            skipped.pop(task.name, None)  # one subset read is enough to count the task covered
    return texts, skipped
