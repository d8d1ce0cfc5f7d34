"""Run one eval task on a loaded model: build prompts, score or generate, keep every prediction,
compute metrics with intervals. One function per output type, all behind `evaluate_task`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.mixture import encode_pair
from taxon.data.sources import load_rows
from taxon.evals import subsets
from taxon.evals.generation import extract, generate
from taxon.evals.metrics import classification_report, generation_report, generation_scores, perplexity_report
from taxon.evals.scoring import loglikelihoods
from taxon.evals.tasks import TaskSpec

# Perplexity windows per forward pass: the scorer keeps logits at every predicted position, so a
# batch holds about this many positions x vocabulary floats (2,048 x 49,152 x 4 B = 400 MB).
PERPLEXITY_TOKENS_PER_BATCH = 2048


@dataclass
class TaskResult:
    task: str
    n: int  # items scored
    n_total: int  # items in the split
    shots: int
    metrics: dict  # {name: {value, low, high}}, settings, and per output type: per_class,
    # confusion (multiple_choice); tokens (perplexity)
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _demos(pool, card, rng, k: int, exclude: str, sampler: str = "random") -> list[tuple[str, str]]:
    """k demonstrations from the few-shot split (never the test split): drawn with the seed, or
    its first rows in order (`first_n`)."""
    picks = []
    for i in (rng.permutation(len(pool)) if sampler == "random" else range(len(pool))):
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
    """Evaluate `task`; `limit`: a seeded subsample of the test items (of the windows, for
    perplexity). Every prediction is kept with its index in the split."""
    t0 = time.time()
    shots = task.shots if shots is None else shots
    run = {"multiple_choice": _multiple_choice, "generate": _generate, "perplexity": _perplexity}
    r = run[task.output](model, tokenizer, task, shots=shots, limit=limit, seed=seed,
                         batch_size=batch_size, bf16=bf16)
    r.metrics["settings"] = {"precision": "bf16" if bf16 else "fp32", "seed": seed,
                             **r.metrics.get("settings", {})}
    r.seconds = time.time() - t0
    return r


def _items(task: TaskSpec, limit: int | None, seed: int):
    """The split's rows, each with its index `_idx`, subsampled with the seed; and the split size."""
    if subsets.has_subsets(task):
        rows, n_total, _ = subsets.items(task, limit, seed)
        return rows, n_total
    rows = load_rows(task.dataset, task.config, task.split)
    n_total = len(rows)
    rows = rows.add_column("_idx", list(range(n_total)))
    if limit is not None and limit < n_total:
        rows = rows.shuffle(seed=seed).select(range(limit))
    return rows, n_total


def _contexts(tokenizer, task: TaskSpec, rows, shots: int, seed: int):
    """Each row's prompt, demonstrations and chat formatting applied; whether chat was used."""
    chat = render.uses_chat(tokenizer, task.chat)
    rng = np.random.default_rng(seed)
    out, pools = [], {}
    for row in rows:
        card = subsets.item_card(task, row)
        prompt, _ = render.as_pair(card, row)
        pool = subsets.fewshot_pool(task, row, pools) if shots else None
        demos = _demos(pool, card, rng, shots, prompt, task.fewshot_sampler) if shots else []
        if task.header:  # e.g. MMLU's "The following are ... about {subject}." once, before all
            header = render.render(card, task.header, row)
            if demos:
                demos[0] = (header + demos[0][0], demos[0][1])
            else:
                prompt = header + prompt
        out.append(render.format_prompt(tokenizer, prompt, chat, demos))
    return out, chat


def multiple_choice_items(tokenizer, task: TaskSpec, *, shots: int, limit: int | None, seed: int):
    """The items as the scorer sees them: each one's index, context, choice texts (each as the
    model would continue the context), gold label and subset; with the split size, the subsets'
    layout (None without subsets) and whether the chat template was used."""
    card = get_card(task.dataset).for_config(task.config)
    if subsets.has_subsets(task):
        rows, n_total, layout = subsets.items(task, limit, seed)
    else:
        (rows, n_total), layout = _items(task, limit, seed), None
    contexts, chat = _contexts(tokenizer, task, rows, shots, seed)
    n_labels = len(card.labels or ())
    items = []
    for row, context in zip(rows, contexts, strict=True):
        # A row with fewer options than labels (MMLU-Pro) scores only the letters it has.
        n_row = min(n_labels, len(row[task.choices])) if task.choices else n_labels
        choices = [
            render.format_completion(
                tokenizer, render.render(card, card.templates.completion, {**row, card.label_field: label}),
                chat, end=False)
            for label in range(n_row)
        ]
        items.append({"idx": int(row["_idx"]), "context": context, "choices": choices,
                      "gold": int(row[card.label_field]), "subset": row.get(subsets.SUBSET)})
    return items, n_total, layout, chat


def _multiple_choice(model, tokenizer, task: TaskSpec, *, shots, limit, seed, batch_size,
                     bf16) -> TaskResult:
    card = get_card(task.dataset).for_config(task.config)
    items, n_total, layout, chat = multiple_choice_items(tokenizer, task, shots=shots, limit=limit, seed=seed)
    requests, slots = [], []
    for j, item in enumerate(items):
        for label, choice in enumerate(item["choices"]):
            requests.append(encode_pair(tokenizer, item["context"], choice))
            slots.append((j, label))
    scores = loglikelihoods(
        model, requests, tokenizer.pad_token_id, batch_size=batch_size, bf16=bf16, desc=task.name
    )
    ll = np.full((len(items), len(card.labels or ())), -np.inf)
    for (j, label), score in zip(slots, scores, strict=True):
        ll[j, label] = score
    golds = [item["gold"] for item in items]
    probs = np.exp(ll - ll.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    preds = ll.argmax(axis=1)
    pooled = [m for m in task.metrics if m != "macro_accuracy"]
    metrics = classification_report(golds, preds, probs, list(card.labels), pooled, seed=seed)
    metrics["settings"] = {"chat": chat}
    if layout is not None:
        per, macro = subsets.report([item["subset"] for item in items], preds == np.array(golds), seed)
        metrics["subsets"] = per
        if "macro_accuracy" in task.metrics:
            metrics["macro_accuracy"] = macro
        metrics["settings"]["subsets"] = layout
    predictions = [
        {"idx": item["idx"], "gold": int(g), "pred": int(p),
         "scores": [float(x) if np.isfinite(x) else None for x in s]}
        for item, g, p, s in zip(items, golds, preds, ll, strict=True)
    ]
    return TaskResult(task.name, len(golds), n_total, shots, metrics, predictions)


def gold_answer(task: TaskSpec, card, row: dict) -> str:
    """The reference answer: the task's `target` template, else the extractor applied to the
    card's completion (e.g. GSM8K: the number after '####' of the worked answer)."""
    if task.target is not None:
        return render.render(card, task.target, row).strip()
    _, completion = render.as_pair(card, row)
    return extract(task.extractor, completion)


def _generate(model, tokenizer, task: TaskSpec, *, shots, limit, seed, batch_size,
              bf16) -> TaskResult:
    card = get_card(task.dataset).for_config(task.config)
    rows, n_total = _items(task, limit, seed)
    contexts, chat = _contexts(tokenizer, task, rows, shots, seed)
    golds = [gold_answer(task, card, row) for row in rows]
    gens = generate(model, tokenizer, contexts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                    batch_size=batch_size, bf16=bf16, desc=task.name)
    preds = [extract(task.extractor, g.text) for g in gens]
    names = task.all_metrics
    items = generation_scores(golds, preds, names, task.rel_tol)
    metrics = generation_report(golds, preds, names, task.rel_tol, seed=seed, items=items)
    metrics["settings"] = {
        "chat": chat, "extractor": task.extractor, "stop": list(task.stop),
        "max_new_tokens": task.max_new_tokens, "rel_tol": task.rel_tol,
        "truncated_prompts": sum(g.truncated for g in gens),
        "hit_max_new_tokens": sum(g.new_tokens >= task.max_new_tokens for g in gens),
    }
    predictions = [
        {"idx": int(row["_idx"]), "gold": gold, "pred": pred,
         "scores": {"output": g.text, **{k: v[j] for k, v in items.items()}}}
        for j, (row, gold, pred, g) in enumerate(zip(rows, golds, preds, gens, strict=True))
    ]
    return TaskResult(task.name, len(golds), n_total, shots, metrics, predictions)


def perplexity_windows(tokenizer, texts, max_length: int) -> list[list[int]]:
    """Documents tokenised (no special tokens), each followed by EOS, concatenated and cut into
    non-overlapping windows of `max_length` tokens; the last window keeps the remainder (dropped
    if it is a single token, which nothing would predict). Blank documents are skipped."""
    texts = [t for t in texts if t.strip()]
    flat: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        flat += ids + [tokenizer.eos_token_id]
    windows = [flat[i : i + max_length] for i in range(0, len(flat), max_length)]
    return [w for w in windows if len(w) >= 2]


def _perplexity(model, tokenizer, task: TaskSpec, *, shots, limit, seed, batch_size,
                bf16) -> TaskResult:
    """Within a window every token but the first is predicted from the tokens before it in the
    same window (no context carries over between windows). Loss: summed token NLL over all
    predicted tokens / their number; perplexity: exp(loss). Windows are `task.max_length` tokens,
    or the model's context if that is shorter (the length used is in the settings)."""
    card = get_card(task.dataset).for_config(task.config)
    rows = load_rows(task.dataset, task.config, task.split)
    texts = [render.as_text(card, r) for r in rows]
    # A model with a shorter context than the task's windows gets windows of its own context.
    length = min(task.max_length, getattr(model.config, "max_position_embeddings", None) or task.max_length)
    windows = perplexity_windows(tokenizer, texts, length)
    n_total = len(windows)
    idxs = list(range(n_total))
    if limit is not None and limit < n_total:
        idxs = sorted(int(i) for i in np.random.default_rng(seed).permutation(n_total)[:limit])
    requests = [(windows[i][:1], windows[i][1:]) for i in idxs]
    per_batch = max(1, min(batch_size, PERPLEXITY_TOKENS_PER_BATCH // length))
    ll = loglikelihoods(model, requests, tokenizer.pad_token_id, batch_size=per_batch, bf16=bf16,
                        desc=task.name)
    nll = [-x for x in ll]
    tokens = [len(c) for _, c in requests]
    metrics = perplexity_report(nll, tokens, seed=seed)
    metrics["settings"] = {"max_length": length, "windows": "non-overlapping",
                           "documents": sum(1 for t in texts if t.strip())}
    predictions = [{"idx": i, "gold": None, "pred": None, "scores": {"nll": v, "tokens": t}}
                   for i, v, t in zip(idxs, nll, tokens, strict=True)]
    return TaskResult(task.name, len(idxs), n_total, 0, metrics, predictions)
