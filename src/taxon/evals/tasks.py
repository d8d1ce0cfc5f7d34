"""Evaluation tasks: YAML files in `tasks/`, each naming its card, split, output type and metrics.

Three output types, each with one code path in `evaluate.py`:

- `multiple_choice`: each label's verbaliser scored by log-likelihood; the best one is the answer.
- `generate`: greedy generation until a stop string, EOS or `max_new_tokens`; `extractor` takes
  the answer out of the generated text (and out of the reference completion, unless `target`
  gives the gold answer as its own template).
- `perplexity`: loss and perplexity of the split's texts, in non-overlapping `max_length` windows.

A task renders its items with its card's templates unless it gives its own (`prompt`,
`completion`; for multiple choice also `choices` and a gold `label` template); `questions` asks
each row several questions (one item each), `where` leaves rows out. Published scores to compare
with live in `references.yaml`, not here: they change no number, so no task identity.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from taxon.config import Spec, parse
from taxon.data.cards import corpus_folder, get_card
from taxon.errors import TaxonError

TASKS_DIR = Path(__file__).with_name("tasks")


class NerSpec(Spec):
    """Where a NER task finds its words and gold tags, and which entity types it scores."""

    tokens: str = "tokens"  # column of words
    tags: str = "ner_tags"  # column of IO/BIO tags, one per word
    types: tuple[str, ...] = ("PER", "ORG", "LOC")  # other types count as O


Output = Literal["multiple_choice", "generate", "perplexity"]

# Per output type: (the metrics it can report, its default metrics, its default primary metric).
# `bleu` stands for bleu_1 .. bleu_4.
METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "multiple_choice": (("accuracy", "macro_f1", "weighted_f1", "ece", "avg_f1", "mcc", "binary_f1",
                         "macro_accuracy"),
                        ("accuracy", "macro_f1", "weighted_f1", "ece"), "macro_f1"),
    "generate": (("exact_match", "token_f1", "rouge_l", "bleu", "bleu_1", "bleu_2", "bleu_3", "bleu_4",
                  "numeric_accuracy", "execution_accuracy", "entity_f1", "semantic_similarity", "pass_at_1"),
                 ("exact_match", "token_f1"), "exact_match"),
    "perplexity": (("loss", "perplexity"), ("loss", "perplexity"), "perplexity"),
}
# Fields that only one output type reads. They are left out of the canonical form of other tasks,
# so adding them did not change the identity (eval key) of the existing multiple-choice tasks.
OUTPUT_FIELDS = {
    "generate": ("max_new_tokens", "stop", "extractor", "target", "rel_tol"),
    "perplexity": ("max_length",),
}
# Fields added after tasks were first stored: left out of the canonical form while at their
# default, so adding them changed no task's identity; and fields that change no number (never
# part of the identity).
LATER_FIELDS = ("prompt", "completion", "choices", "label", "questions", "where", "ner",
                "configs", "group_by", "header", "fewshot_sampler", "choices_column")
NOT_IDENTITY = ("suite",)
EXTRACTORS = ("first_line", "last_number", "function_body", "regex:<pattern>")
# Code tasks only (`program` set): left out of other tasks' canonical form, so their keys stay.
CODE_FIELDS = ("program", "timeout", "memory_mb")


def expand_metrics(names) -> tuple[str, ...]:
    """`bleu` -> bleu_1 .. bleu_4; every other name stays."""
    out: list[str] = []
    for n in names:
        for m in ([f"bleu_{k}" for k in range(1, 5)] if n == "bleu" else [n]):
            if m not in out:
                out.append(m)
    return tuple(out)


class TaskSpec(Spec):
    name: str
    description: str = ""
    dataset: str
    config: str | None = None
    split: str = "test"
    fewshot_split: str = "train"  # demonstrations come from here, never from `split`
    output: Output = "multiple_choice"
    shots: int = Field(0, ge=0)
    chat: bool | None = None  # None: use the chat template when the model has one
    metrics: tuple[str, ...] = METRICS["multiple_choice"][1]  # default: by output (see METRICS)
    primary: str = "macro_f1"
    suite: bool = True  # part of `--tasks all`
    # The task's own templates (Jinja over the row's columns, plus the question's keys and `row`),
    # used instead of the card's; None: the card's. `completion` renders a choice (multiple
    # choice, with `label_name` set) or the reference answer and demonstrations (generate).
    prompt: str | None = None
    completion: str | None = None
    # multiple_choice: label names instead of the card's, and `label`, a template that renders the
    # gold label's name (for cards without integer labels, e.g. a score binned into classes).
    choices: tuple[str, ...] | None = None
    label: str | None = None
    # Each row is asked every question: a question is a dict of template variables with a `name`
    # (its group, for `avg_f1`). A row with k questions gives k items.
    questions: tuple[dict[str, str], ...] | None = None
    where: str | None = None  # Jinja expression over a row: rows where it is false are left out
    ner: NerSpec | None = None  # generate + entity_f1: words, gold tags and scored types
    # Several subsets scored as one task, each reported on its own and macro-averaged
    # (`macro_accuracy`); `accuracy` etc. pool all items. With subsets, `limit` is per subset.
    configs: Literal["all"] | tuple[str, ...] | None = None  # these configs of the card; "all":
    # every config except a union config named "all" (MMLU's 57 subjects)
    group_by: str | None = None  # or: subsets by this column's value (MMLU-Pro's category)
    header: str | None = None  # Jinja template, rendered with the item, once before demonstrations
    # first_n: the few-shot split's first rows in order, the same for every item (of a subset),
    # as lm-evaluation-harness does for MMLU; random: drawn per item with the seed.
    fewshot_sampler: Literal["random", "first_n"] = "random"
    choices_column: str | None = None  # multiple_choice: a column whose length is the item's number
    # of choices (MMLU-Pro has up to ten); None: every label is a choice
    # output: generate
    max_new_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = ()  # the generated text is cut at the first of these
    extractor: str = "first_line"  # first_line | last_number | regex:<pattern>
    target: str | None = None  # Jinja template of the gold answer; None: extractor(completion)
    rel_tol: float = Field(1e-2, ge=0)  # numeric_accuracy: |pred - gold| <= rel_tol * |gold|
    # output: generate, metric pass_at_1: Jinja template of the program run in the sandbox (row
    # columns plus `completion`, the extracted answer), its wall-clock and memory limits
    program: str | None = None
    timeout: float = Field(3.0, gt=0)
    memory_mb: int = Field(1024, ge=64)
    # output: perplexity
    max_length: int = Field(1024, ge=2)  # window length in tokens

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_output(cls, data):
        if isinstance(data, dict):
            output = data.get("output", "multiple_choice")
            if output in METRICS:
                data = {"metrics": METRICS[output][1], "primary": METRICS[output][2], **data}
        return data

    @field_validator("extractor")
    @classmethod
    def _known_extractor(cls, v: str) -> str:
        if v.startswith("regex:"):
            try:
                re.compile(v[len("regex:"):])
            except re.error as e:
                raise ValueError(f"extractor {v!r}: bad regular expression ({e})") from e
        elif v not in EXTRACTORS:
            raise ValueError(f"unknown extractor {v!r}; use one of: {', '.join(EXTRACTORS)}")
        return v

    @model_validator(mode="after")
    def _metrics_fit_output(self) -> TaskSpec:
        known = METRICS[self.output][0]
        bad = [m for m in self.metrics if m not in known]
        if bad:
            raise ValueError(f"metrics {bad} do not apply to output '{self.output}'; "
                             f"choose from: {', '.join(known)}")
        if "pass_at_1" in self.metrics and self.program is None:
            raise ValueError("metric pass_at_1 runs the answer: give a `program` template (the code "
                             "to execute, with {{ completion }} where the answer goes)")
        if self.primary not in self.all_metrics:
            raise ValueError(f"primary metric '{self.primary}' is not one of metrics {list(self.metrics)}")
        if "avg_f1" in self.metrics and not self.questions:
            raise ValueError("metric avg_f1 averages over question groups: give `questions`")
        if "entity_f1" in self.metrics and self.ner is None:
            raise ValueError("metric entity_f1 needs `ner` (tokens, tags and types columns)")
        if self.label is not None and self.choices is None:
            raise ValueError("`label` renders a label name: give the names as `choices`")
        for q in self.questions or ():
            if "name" not in q:
                raise ValueError(f"question {q} has no `name`")
        if "macro_accuracy" in self.metrics and not (self.configs or self.group_by):
            raise ValueError("metric macro_accuracy needs subsets: set configs or group_by")
        if self.configs and self.config:
            raise ValueError("give either config or configs, not both")
        return self

    @property
    def all_metrics(self) -> tuple[str, ...]:
        """The scalar metrics this task reports, `bleu` expanded."""
        return expand_metrics(self.metrics)

    def canonical(self) -> str:
        data = self.model_dump(mode="json")
        for output, fields in OUTPUT_FIELDS.items():
            if output != self.output:
                for f in fields:
                    data.pop(f)
        if self.program is None:
            for f in CODE_FIELDS:
                data.pop(f)
        for f in LATER_FIELDS:
            if getattr(self, f) == type(self).model_fields[f].default:
                data.pop(f)
        for f in NOT_IDENTITY:
            data.pop(f)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


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


def suite() -> list[TaskSpec]:
    """What `--tasks all` runs: every built-in task not marked `suite: false`."""
    return [t for t in all_tasks() if t.suite]


def corpus_task(folder: str) -> TaskSpec:
    """Loss and perplexity on the test split of a corpus folder (`taxon corpus build`)."""
    card = get_card(folder)
    if "test" not in card.splits:
        raise TaxonError(f"corpus {folder} has no test split to evaluate on; rebuild it with "
                         "--test-fraction above 0")
    return TaskSpec(name=folder, description=f"perplexity on the test split of corpus {folder}",
                    dataset=folder, split="test", output="perplexity", suite=False)


def get_task(name: str) -> TaskSpec:
    """A built-in task by name, or a corpus folder's perplexity task (by its path)."""
    if name not in _registry() and corpus_folder(name) is not None:
        return corpus_task(name)
    if name not in _registry():
        raise TaxonError(
            f"unknown eval task '{name}'; choose from: {', '.join(sorted(_registry()))} (or a "
            "corpus folder written by `taxon corpus build`)"
        )
    return _registry()[name]


def parse_task_list(tasks: str | list[str] | tuple[str, ...]) -> list[TaskSpec]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return suite()
    if not names:
        raise TaxonError("no eval tasks given; pass --tasks fpb,tfns (or all)")
    return [get_task(n) for n in names]


def held_out_splits(dataset: str) -> set[str]:
    """Splits of `dataset` that some eval task scores on: training must never read them."""
    card_id = get_card(dataset).id
    return {t.split for t in all_tasks() if get_card(t.dataset).id == card_id}


def missing_data(task: TaskSpec) -> str | None:
    """Why the test split of `task` cannot be loaded now (no mirror file, Hub unreachable), or
    None when it can. Only looks for the file; `load_rows` still reports a broken one."""
    from taxon import hub
    from taxon.data.sources import mirror_file

    card = get_card(task.dataset).for_config(task.config)
    split = card.source_split(task.split)
    if mirror_file(card, card.config, split) is not None or hub.reachable():
        return None
    return f"no {card.id}/{card.config}/{split} in the mirror and the Hub is unreachable"
