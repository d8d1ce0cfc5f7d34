"""Render a dataset row as pretraining text or as an SFT (prompt, completion) pair.

Templates are Jinja2 strings in the card; a row's columns are the variables, plus `label_name`
for classification cards. Two filters help with nested columns: `fromjson` (a JSON or
Python-literal string to its value; anything else passes through) and `entities` (tokens and their
IO/BIO tags to a list of {text, type} spans). Chat formatting for instruct models is applied here
too, so training and evaluation format a prompt the same way.
"""

from __future__ import annotations

import ast
import json
from functools import cache

import jinja2

from taxon.data.cards import Card
from taxon.errors import TaxonError


def fromjson(value):
    """A column that holds JSON (or a Python literal) as a string, as its value; a string that is
    neither comes back unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def entities(tokens: list[str], tags: list[str]) -> list[dict]:
    """Entity spans from IO or BIO tags ("I-ORG", "B-PER", "O"): consecutive tokens of one type
    form a span, and a "B-" tag starts a new one. [{"text": "Evergreen Solar Inc", "type": "ORG"}]"""
    spans: list[tuple[list[str], str]] = []
    current = None
    for token, tag in zip(tokens, tags, strict=True):
        if not tag or tag == "O":
            current = None
            continue
        prefix, _, kind = tag.partition("-") if "-" in tag else ("I", "", tag)
        if current is not None and current[1] == kind and prefix != "B":
            current[0].append(token)
        else:
            current = ([token], kind)
            spans.append(current)
    return [{"text": " ".join(words), "type": kind} for words, kind in spans]


_env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_env.filters["fromjson"] = fromjson
_env.filters["entities"] = entities


@cache
def compile_template(source: str) -> jinja2.Template:
    """A card template, compiled once (raises jinja2.TemplateSyntaxError if it does not parse)."""
    return _env.from_string(source)


def _context(card: Card, row: dict) -> dict:
    ctx = dict(row)
    if card.labels and card.label_field:
        value = row.get(card.label_field)
        if isinstance(value, int) and 0 <= value < len(card.labels):  # else label_name is undefined
            ctx["label_name"] = card.labels[value]
    return ctx


def render(card: Card, template: str, row: dict) -> str:
    try:
        return compile_template(template).render(**_context(card, row))
    except jinja2.UndefinedError as e:
        raise TaxonError(f"dataset card {card.path}: template uses {e.message}; fix the card") from e
    except jinja2.TemplateSyntaxError as e:
        raise TaxonError(f"dataset card {card.path}: template line {e.lineno}: {e.message}; "
                         "fix the card") from e


def as_text(card: Card, row: dict) -> str:
    return render(card, card.templates.text, row)


def as_pair(card: Card, row: dict) -> tuple[str, str]:
    t = card.templates
    if t.prompt is None or t.completion is None:
        raise TaxonError(
            f"dataset '{card.id}' has no prompt/completion templates, so it cannot be used for "
            "SFT; use it with objective pretrain, or add templates to its card"
        )
    return render(card, t.prompt, row), render(card, t.completion, row)


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """`chat=None` means: use the chat template when the tokenizer has one (instruct models)."""
    has = getattr(tokenizer, "chat_template", None) is not None
    return has if chat is None else (chat and has)


@cache
def bos_prefix(tokenizer) -> str:
    """The BOS token as text for tokenizers that add it by default (Gemma: without it the model's
    outputs degrade badly), else "". Prompts are encoded without special tokens, so it is written
    into the text, as a chat template does; SmolLM2 and GPT-2 add none, so their prompts stay.
    Asked of the tokenizer's output, not its `add_bos_token` flag, which a saved copy may lose."""
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a", add_special_tokens=False)["input_ids"][:1] == [bos]:
        return ""
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [bos] else ""


def format_prompt(tokenizer, prompt: str, chat: bool, demos: list[tuple[str, str]] = ()) -> str:
    """The text that precedes the completion. Base models: demonstrations ("prompt completion"
    blocks separated by a blank line) then the prompt. Chat: one user/assistant exchange per
    demonstration, then the user turn and the assistant header."""
    if not chat:
        return bos_prefix(tokenizer) + "".join(f"{p}{c}\n\n" for p, c in demos) + prompt
    messages = []
    for p, c in demos:
        messages += [{"role": "user", "content": p}, {"role": "assistant", "content": c.lstrip()}]
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_completion(tokenizer, completion: str, chat: bool, end: bool = True) -> str:
    """A completion as the model should produce it. In a chat the assistant's turn starts right
    after the header, so the leading space of a base-model verbaliser is dropped."""
    text = completion.lstrip() if chat else completion
    return text + (tokenizer.eos_token if end else "")


@cache
def compile_expression(source: str):
    return _env.compile_expression(source)


def holds(card: Card, expression: str, row: dict) -> bool:
    """A Jinja expression over a row's columns (e.g. a task's `where`), as a truth value."""
    try:
        return bool(compile_expression(expression)(**_context(card, row)))
    except jinja2.UndefinedError as e:
        raise TaxonError(f"expression {expression!r} uses {e.message}; fix the task") from e
    except jinja2.TemplateSyntaxError as e:
        raise TaxonError(f"expression {expression!r}: {e.message}; fix the task") from e
