"""Run one eval task on a loaded model: build prompts, score, keep every prediction, compute
metrics with intervals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.mixture import encode_pair
from taxon.data.sources import load_rows
from taxon.evals.metrics import classification_report
from taxon.evals.scoring import loglikelihoods
from taxon.evals.tasks import TaskSpec


@dataclass
class TaskResult:
    task: str
    n: int  # items scored
    n_total: int  # items in the split
    shots: int
    metrics: dict  # {name: {value, low, high}} plus per_class, confusion
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _demos(pool, card, rng, k: int, exclude: str) -> list[tuple[str, str]]:
    """k demonstrations drawn with the seed from the few-shot split (never the test split)."""
    picks = []
    for i in rng.permutation(len(pool)):
        p, c = render.as_pair(card, pool[int(i)])
        if p != exclude:
            picks.append((p, c))
        if len(picks) == k:
            break
    return picks


def evaluate_task(
    model, tokenizer, task: TaskSpec, *, shots: int | None = None, limit: int | None = None,
    seed: int = 0, batch_size: int = 16, bf16: bool = False,
) -> TaskResult:
    t0 = time.time()
    card = get_card(task.dataset).for_config(task.config)
    shots = task.shots if shots is None else shots
    rows = load_rows(task.dataset, task.config, task.split)
    n_total = len(rows)
    rows = rows.add_column("_idx", list(range(n_total)))
    if limit is not None and limit < n_total:
        rows = rows.shuffle(seed=seed).select(range(limit))
    chat = render.uses_chat(tokenizer, task.chat)
    pool = load_rows(task.dataset, task.config, task.fewshot_split) if shots else None
    rng = np.random.default_rng(seed)
    n_labels = len(card.labels or ())
    requests, golds, idxs = [], [], []
    for row in rows:
        prompt, _ = render.as_pair(card, row)
        demos = _demos(pool, card, rng, shots, prompt) if shots else []
        context = render.format_prompt(tokenizer, prompt, chat, demos)
        for label in range(n_labels):
            choice = render.render(card, card.templates.completion, {**row, card.label_field: label})
            ctx_ids, cont_ids = encode_pair(
                tokenizer, context, render.format_completion(tokenizer, choice, chat, end=False)
            )
            requests.append((ctx_ids, cont_ids))
        golds.append(row[card.label_field])
        idxs.append(row["_idx"])
    scores = loglikelihoods(
        model, requests, tokenizer.pad_token_id, batch_size=batch_size, bf16=bf16, desc=task.name
    )
    ll = np.array(scores).reshape(len(golds), n_labels)
    probs = np.exp(ll - ll.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    preds = ll.argmax(axis=1)
    metrics = classification_report(golds, preds, probs, list(card.labels), task.metrics, seed=seed)
    metrics["settings"] = {"precision": "bf16" if bf16 else "fp32", "chat": chat, "seed": seed}
    predictions = [
        {"idx": int(i), "gold": int(g), "pred": int(p), "scores": [float(x) for x in s]}
        for i, g, p, s in zip(idxs, golds, preds, ll, strict=True)
    ]
    return TaskResult(task.name, len(golds), n_total, shots, metrics, predictions, time.time() - t0)
