"""Published scores to compare with (`references.yaml`): one entry per (model, task, metric, shots),
each naming its source. The results table reads them to show "% of GPT-4"."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import field_validator

from taxon.config import Spec, parse
from taxon.errors import TaxonError

REFERENCES_FILE = Path(__file__).with_name("references.yaml")
TARGET_MODEL = "GPT-4"  # the large model the table's percentage is of


class Reference(Spec):
    model: str
    task: str
    metric: str
    shots: int | str
    value: float
    source: str  # the full citation (the file's key, resolved)
    conf: str = ""
    note: str = ""

    @field_validator("value")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"value {v} must be on a 0-1 scale (divide percentages by 100)")
        return v


class ReferenceFile(Spec):
    sources: dict[str, str]
    references: tuple[dict, ...]


@cache
def all_references() -> tuple[Reference, ...]:
    where = str(REFERENCES_FILE)
    data: ReferenceFile = parse(ReferenceFile, yaml.safe_load(REFERENCES_FILE.read_text()), where)  # type: ignore[assignment]
    out = []
    for i, entry in enumerate(data.references):
        key = entry.get("source")
        if key not in data.sources:
            raise TaxonError(f"{where}: reference {i} names source {key!r}, which `sources` lacks; "
                             "fix the file")
        out.append(parse(Reference, {**entry, "source": data.sources[key]}, f"{where} reference {i}"))
    return tuple(out)  # type: ignore[arg-type]


def for_task(task: str) -> list[Reference]:
    return [r for r in all_references() if r.task == task]


def target(task: str, metrics: dict, shots: int) -> Reference | None:
    """The GPT-4 score to set a result against: among the task's GPT-4 entries whose metric the
    result reports, one at the result's shot count if any, else the first in the file."""
    refs = [r for r in for_task(task) if r.model == TARGET_MODEL and r.metric in metrics]
    return next((r for r in refs if r.shots == shots), refs[0] if refs else None)
