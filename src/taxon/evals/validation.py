"""Validation prompts: a few hand-written prompts per dataset, each with an automatic check, so a
trained adapter is "validated" by checks that can fail, never by reading its answers.

A file in `validation/` names its dataset card and lists prompts. A prompt is a `row` of the
dataset's columns (rendered by the card's prompt template, the format the adapter trained on) or
a literal `prompt`; the model answers greedily in its chat format, and the answer is checked:

    label         the first of the card's labels the answer names is `expect`
    number        the answer's number (after "####", else its last) equals `expect` (within `rel_tol`)
    parses        the answer parses as `format` (`entities`: "name, TYPE" lines or "none"; `json`),
                  and holds every entity (or JSON value) listed in `expect`
    code_asserts  the prompt's code with the answer as its continuation, then `asserts`, runs in the
                  sandbox and exits cleanly
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from taxon.config import Spec, digest, parse
from taxon.data import render
from taxon.data.cards import get_card
from taxon.errors import TaxonError
from taxon.evals.ner import parse_entities as entity_lines

VALIDATION_DIR = Path(__file__).with_name("validation")
CHECKS = ("label", "number", "parses", "code_asserts")
ENTITY_TYPES = ("PER", "ORG", "LOC")  # the types the card teaches and the `ner` task scores


class Prompt(Spec):
    row: dict[str, Any] | None = None  # the dataset's columns, rendered by the card's prompt
    prompt: str | None = None  # or the prompt itself
    check: Literal["label", "number", "parses", "code_asserts"]
    expect: Any = None  # label name, number, entities / JSON values; unused by code_asserts
    format: Literal["entities", "json"] | None = None  # parses
    asserts: str | None = None  # code_asserts: Python run after the completed code
    rel_tol: float = Field(0.0, ge=0)  # number

    @model_validator(mode="after")
    def _complete(self) -> Prompt:
        if (self.row is None) == (self.prompt is None):
            raise ValueError("give a prompt either a `row` (rendered by the card) or a `prompt`")
        if self.check in ("label", "number") and self.expect is None:
            raise ValueError(f"check {self.check} needs `expect` (the right answer)")
        if self.check == "parses" and self.format is None:
            raise ValueError("check parses needs `format: entities` or `format: json`")
        if self.check == "code_asserts" and not self.asserts:
            raise ValueError("check code_asserts needs `asserts` (Python that fails on a wrong answer)")
        return self


class ValidationSet(Spec):
    dataset: str  # card id or alias
    config: str | None = None
    chat: bool | None = None  # None: the chat template when the model has one (code: false)
    max_new_tokens: int = Field(64, ge=1)
    stop: tuple[str, ...] = ()
    prompts: tuple[Prompt, ...] = Field(min_length=1)

    def key(self) -> str:
        """Identity of the prompts and checks: stored results are reused while it holds."""
        return digest(self.canonical())


@cache
def all_sets() -> dict[str, ValidationSet]:
    """Every validation file, by its dataset's card id (one file per dataset)."""
    out: dict[str, ValidationSet] = {}
    for path in sorted(VALIDATION_DIR.glob("*.yaml")):
        vset = load_set(path)
        out[get_card(vset.dataset).id] = vset
    return out


def load_set(path: Path) -> ValidationSet:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TaxonError(f"validation file {path}: not valid YAML ({e}); fix the file") from e
    vset = parse(ValidationSet, data or {}, f"validation file {path}")
    card = get_card(vset.dataset).for_config(vset.config)
    for i, p in enumerate(vset.prompts):
        if p.check == "label" and str(p.expect) not in (card.labels or ()):
            raise TaxonError(f"validation file {path}: prompt {i}: label '{p.expect}' is not one of "
                             f"the card's labels {list(card.labels or ())}; fix the file")
        if p.row is not None:
            render.render(card, card.templates.prompt or "", p.row)  # a missing column fails now
    return vset  # type: ignore[return-value]


def for_dataset(dataset: str) -> ValidationSet | None:
    """The validation prompts of a dataset (card id or alias), or None when it has none."""
    return all_sets().get(get_card(dataset).id)


def prompt_text(vset: ValidationSet, p: Prompt) -> str:
    """The prompt as the dataset's card renders it (before chat formatting)."""
    if p.prompt is not None:
        return p.prompt
    card = get_card(vset.dataset).for_config(vset.config)
    return render.render(card, card.templates.prompt, p.row or {})


# --- checks: (passed, why) for one answer -------------------------------------------------------


def _label(answer: str, expect: str, labels: tuple[str, ...]) -> tuple[bool, str]:
    first = next((line for line in answer.splitlines() if line.strip()), "").lower()
    hits = [(m.start(), lab) for lab in labels
            for m in [re.search(rf"\b{re.escape(lab.lower())}\b", first)] if m]
    if not hits:
        return False, f"no label of {list(labels)} in the answer"
    said = min(hits)[1]
    return said == expect, f"said '{said}', expected '{expect}'"


def _number(answer: str, expect, rel_tol: float) -> tuple[bool, str]:
    from taxon.evals.generation import extract
    from taxon.evals.metrics import numeric_match

    got = extract("last_number", answer)
    if not got:
        return False, "no number in the answer"
    ok = numeric_match(str(expect), got, rel_tol) == 1.0
    return ok, f"answered {got}, expected {expect}"


def parse_entities(text: str) -> list[tuple[str, str]] | None:
    """"name, TYPE" lines (FinBen's format, the card's and the `ner` task's) or `none` as
    (name, TYPE) pairs; None when a non-blank line is neither, so prose does not pass."""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if len(lines) == 1 and lines[0].lower().rstrip(".") == "none":
        return []
    found = [entity_lines(line, ENTITY_TYPES) for line in lines]
    if not lines or not all(found):
        return None
    return [e for one in found for e in one]


def _parses(answer: str, fmt: str, expect) -> tuple[bool, str]:
    if fmt == "entities":
        found = parse_entities(answer)
        if found is None:
            return False, "not 'entity name, TYPE' lines with TYPE one of PER, ORG, LOC (or 'none')"
        want = [tuple(e) if isinstance(e, list | tuple) else (str(e), None) for e in expect or []]
        missing = [w for w in want if not any(t == w[0] and w[1] in (None, k) for t, k in found)]
        if missing:
            return False, f"parses, but lacks {', '.join(str(m[0]) for m in missing)}"
        return True, f"parses: {len(found)} entities"
    try:
        value = json.loads(answer.strip())
    except ValueError as e:
        return False, f"not JSON ({e.msg})"
    if expect is not None and value != expect:
        return False, f"JSON {value!r}, expected {expect!r}"
    return True, "parses as JSON"


def _code(prompt: str, answer: str, asserts: str) -> tuple[bool, str]:
    from taxon.evals.generation import extract
    from taxon.evals.sandbox import run_program

    program = f"{prompt}{extract('function_body', answer)}\n\n{asserts}\n"
    outcome = run_program(program)
    return outcome.passed, outcome.status if outcome.passed else f"{outcome.status}: {outcome.reason}"


def check(vset: ValidationSet, p: Prompt, answer: str) -> tuple[bool, str]:
    """Whether `answer` to prompt `p` passes its check, and a short reason."""
    if p.check == "label":
        labels = tuple(get_card(vset.dataset).for_config(vset.config).labels or ())
        return _label(answer, str(p.expect), labels)
    if p.check == "number":
        return _number(answer, p.expect, p.rel_tol)
    if p.check == "parses":
        return _parses(answer, p.format or "json", p.expect)
    return _code(prompt_text(vset, p), answer, p.asserts or "")


def run_set(model, tokenizer, vset: ValidationSet, bf16: bool = False, batch_size: int = 8) -> list[dict]:
    """Each prompt of `vset` answered by `model` (greedy, through the evaluation's generation
    path) and checked: dicts with idx, prompt, answer, check, expect, passed, detail."""
    from taxon.evals.generation import generate

    chat = render.uses_chat(tokenizer, vset.chat)
    texts = [prompt_text(vset, p) for p in vset.prompts]
    formatted = [render.format_prompt(tokenizer, t, chat) for t in texts]
    gens = generate(model, tokenizer, formatted, max_new_tokens=vset.max_new_tokens, stop=vset.stop,
                    batch_size=batch_size, bf16=bf16, desc=f"validate {vset.dataset}")
    out = []
    for i, (p, text, g) in enumerate(zip(vset.prompts, texts, gens, strict=True)):
        passed, detail = check(vset, p, g.text)
        out.append({"idx": i, "prompt": text, "answer": g.text, "check": p.check,
                    "expect": p.expect, "passed": passed, "detail": detail})
    return out
