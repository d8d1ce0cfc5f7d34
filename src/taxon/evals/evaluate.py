"""Run one eval task on a loaded model: build prompts, score or generate, keep every prediction,
compute metrics with intervals. One function per output type, all behind `evaluate_task`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from taxon import resources
from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.mixture import encode_pair
from taxon.data.sources import load_rows
from taxon.evals import execution, items, ner, subsets
from taxon.evals.generation import Generation, extract, generate, prompt_budget
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
    metrics: dict  # {name: {value, low, high}}, settings, efficiency, and per output type:
    # per_class, confusion, per_group (multiple_choice); per_type (ner); tokens (perplexity)
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _demos(task, pool, card, rng, k: int, exclude: str, question: dict | None) -> list[tuple[str, str]]:
    """k demonstrations from the few-shot split (never the test split), each asked the same
    question as the item: drawn with the seed, or the split's first rows in order (`first_n`,
    as lm-evaluation-harness does for MMLU)."""
    picks = []
    order = rng.permutation(len(pool)) if task.fewshot_sampler == "random" else range(len(pool))
    for i in order:
        p, c = items.demo_pair(task, card, items.variables(pool[int(i)], question))
        if p != exclude:
            picks.append((p, c))
        if len(picks) == k:
            break
    return picks


def evaluate_task(
    model, tokenizer, task: TaskSpec, *, shots: int | None = None, limit: int | None = None,
    seed: int = 0, batch_size: int = 16, bf16: bool = False, trainable_params: int | None = None,
) -> TaskResult:
    """Evaluate `task`; `limit`: a seeded subsample of the test rows (of the windows, for
    perplexity). Every prediction is kept with its index in the split. `trainable_params`: what
    training updated, when the caller knows (see `resources.parameters`)."""
    t0 = time.time()
    device = next(model.parameters()).device
    memory = resources.reset_peak_memory(device)
    shots = task.shots if shots is None else shots
    run = {"multiple_choice": _multiple_choice, "generate": _generate, "perplexity": _perplexity}
    r = run[task.output](model, tokenizer, task, shots=shots, limit=limit, seed=seed,
                         batch_size=batch_size, bf16=bf16)
    r.metrics["settings"] = {"precision": "bf16" if bf16 else "fp32", "seed": seed,
                             **r.metrics.get("settings", {})}
    r.seconds = time.time() - t0
    tokens = r.metrics.get("efficiency", {}).get("tokens", 0)
    r.metrics["efficiency"] = {
        **r.metrics.get("efficiency", {}), "seconds": r.seconds,
        "tokens_per_s": tokens / r.seconds if r.seconds else None,
        "items_per_s": r.n / r.seconds if r.seconds else None,
        "peak_memory_mb": resources.peak_memory_mb(device), "peak_memory_kind": memory,
        **resources.parameters(model, trainable_params),
    }
    return r


def _items(task: TaskSpec, limit: int | None, seed: int):
    """The test items: the split's rows (each with its index `_idx`; those failing the task's
    `where` left out), subsampled with the seed, each row asked every question; how many items
    the whole split gives; and the subsets' layout (None for a task without subsets)."""
    k = len(task.questions or (None,))
    if subsets.has_subsets(task):
        rows, n_total, layout = subsets.items(task, limit, seed)
        return items.expand(task, rows), n_total * k, layout
    card = get_card(task.dataset).for_config(task.config)
    rows = load_rows(task.dataset, task.config, task.split)
    rows = rows.add_column("_idx", list(range(len(rows))))
    if task.where:
        rows = rows.filter(lambda r: render.holds(card, task.where, r))
    n_rows = len(rows)
    if limit is not None and limit < n_rows:
        rows = rows.shuffle(seed=seed).select(range(limit))
    return items.expand(task, rows), n_rows * k, None


def prompts(task: TaskSpec, its: list[items.Item], shots: int, seed: int) -> list[tuple[str, list]]:
    """Each item's prompt and its demonstrations (from its own subset, drawn with the seed), before
    any formatting: (prompt, [(demo prompt, demo completion), ...])."""
    rng = np.random.default_rng(seed)
    questions = {q["name"]: q for q in task.questions or ()}
    out, pools = [], {}
    for it in its:
        card = subsets.item_card(task, it.row)
        prompt, _ = items.demo_pair(task, card, it.vars)
        demos = []
        if shots:
            pool = subsets.fewshot_pool(task, it.row, pools)
            demos = _demos(task, pool, card, rng, shots, prompt, questions.get(it.group))
        if task.header:  # e.g. MMLU's "The following are ... about {subject}." once, before all
            header = render.render(card, task.header, it.vars)
            if demos:
                demos[0] = (header + demos[0][0], demos[0][1])
            else:
                prompt = header + prompt
        out.append((prompt, demos))
    return out


def _contexts(tokenizer, task: TaskSpec, its: list[items.Item], shots: int, seed: int):
    """Each item's prompt, demonstrations (from its own subset) and chat formatting applied; and
    whether chat was used."""
    chat = render.uses_chat(tokenizer, task.chat)
    return [render.format_prompt(tokenizer, prompt, chat, demos)
            for prompt, demos in prompts(task, its, shots, seed)], chat


def multiple_choice_items(tokenizer, task: TaskSpec, *, shots: int, limit: int | None, seed: int):
    """The items as the scorer sees them: each one's index, context, choice texts (each as the
    model would continue the context), gold label, subset and question group; with the split
    size, the subsets' layout (None without subsets) and whether the chat template was used."""
    its, n_total, layout = _items(task, limit, seed)
    contexts, chat = _contexts(tokenizer, task, its, shots, seed)
    out = []
    for it, context in zip(its, contexts, strict=True):
        card = subsets.item_card(task, it.row)
        n = len(items.choices(task, card))
        if task.choices_column:  # a row with fewer options than labels (MMLU-Pro) scores only its own
            n = min(n, len(it.row[task.choices_column]))
        choices = [render.format_completion(tokenizer, items.choice_text(task, card, it.vars, label),
                                            chat, end=False) for label in range(n)]
        out.append({"idx": it.idx, "context": context, "choices": choices,
                    "gold": items.gold_index(task, card, it.vars), "subset": it.row.get(subsets.SUBSET),
                    "group": it.group})
    return out, n_total, layout, chat


def _multiple_choice(model, tokenizer, task: TaskSpec, *, shots, limit, seed, batch_size,
                     bf16) -> TaskResult:
    names = items.choices(task, get_card(task.dataset).for_config(task.config))
    its, n_total, layout, chat = multiple_choice_items(tokenizer, task, shots=shots, limit=limit, seed=seed)
    requests, slots, truncated, tokens = [], [], 0, 0
    for j, item in enumerate(its):
        pairs = [encode_pair(tokenizer, item["context"], choice) for choice in item["choices"]]
        # A context longer than the model's window loses its oldest tokens, as in generation.
        budget = prompt_budget(model, max(len(c) for _, c in pairs))
        if budget is not None and len(pairs[0][0]) > budget:
            pairs, truncated = [(ctx[-budget:], c) for ctx, c in pairs], truncated + 1
        tokens += len(pairs[0][0]) + sum(len(c) for _, c in pairs)
        requests += pairs
        slots += [(j, label) for label in range(len(pairs))]
    scores = loglikelihoods(
        model, requests, tokenizer.pad_token_id, batch_size=batch_size, bf16=bf16, desc=task.name
    )
    ll = np.full((len(its), len(names)), -np.inf)  # -inf: a choice the item does not have
    for (j, label), score in zip(slots, scores, strict=True):
        ll[j, label] = score
    golds = [item["gold"] for item in its]
    probs = np.exp(ll - ll.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    preds = ll.argmax(axis=1)
    groups = [item["group"] for item in its] if task.questions else None
    pooled = [m for m in task.metrics if m != "macro_accuracy"]
    metrics = classification_report(golds, preds, probs, list(names), pooled, seed=seed, groups=groups)
    metrics["settings"] = {"chat": chat, "truncated_prompts": truncated}
    # tokens: each item's context once plus every choice's continuation
    metrics["efficiency"] = {"tokens": tokens}
    if layout is not None:
        per, macro = subsets.report([item["subset"] for item in its], preds == np.array(golds), seed)
        metrics["subsets"] = per
        if "macro_accuracy" in task.metrics:
            metrics["macro_accuracy"] = macro
        metrics["settings"]["subsets"] = layout
    predictions = [
        {"idx": item["idx"], "gold": int(g), "pred": int(p),
         "scores": [float(x) if np.isfinite(x) else None for x in s]}
        for item, g, p, s in zip(its, golds, preds, ll, strict=True)
    ]
    return TaskResult(task.name, len(golds), n_total, shots, metrics, predictions)


def gold_answer(task: TaskSpec, card, vars: dict) -> str:
    """The reference answer: the task's `target` template, else the extractor applied to the
    reference completion (e.g. GSM8K: the number after '####' of the worked answer)."""
    if task.target is not None:
        return render.render(card, task.target, vars).strip()
    _, completion = items.pair(task, card, vars)
    return extract(task.extractor, completion)


def generation_items(tokenizer, task: TaskSpec, *, shots: int, limit: int | None, seed: int):
    """The items of a generation task and each one's prompt as the model is given it; with the
    split size and whether the chat template was used."""
    its, n_total, _ = _items(task, limit, seed)
    contexts, chat = _contexts(tokenizer, task, its, shots, seed)
    return its, n_total, contexts, chat


def _generate(model, tokenizer, task: TaskSpec, *, shots, limit, seed, batch_size,
              bf16) -> TaskResult:
    its, n_total, contexts, chat = generation_items(tokenizer, task, shots=shots, limit=limit, seed=seed)
    gens = generate(model, tokenizer, contexts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                    batch_size=batch_size, bf16=bf16, desc=task.name)
    return generation_result(task, its, n_total, shots, seed, gens, chat)


def generation_result(task: TaskSpec, its: list[items.Item], n_total: int, shots: int, seed: int,
                      gens: list[Generation], chat: bool) -> TaskResult:
    """A generation task's result from each item's generated text: answers extracted, metrics with
    intervals (pass@1 runs the programs), every prediction with its raw output."""
    card = get_card(task.dataset).for_config(task.config)
    golds = [gold_answer(task, card, it.vars) for it in its]
    preds = [extract(task.extractor, g.text) for g in gens]
    names = [n for n in task.all_metrics if n != "entity_f1"]
    scores = generation_scores(golds, preds, [n for n in names if n != "pass_at_1"], task.rel_tol)
    outcomes = execution.execute(task, card, [it.row for it in its], preds) if "pass_at_1" in names else None
    if outcomes is not None:
        scores["pass_at_1"] = [float(o.passed) for o in outcomes]
    metrics = generation_report(golds, preds, names, task.rel_tol, seed=seed, items=scores)
    if task.ner is not None:  # entity F1 over the sentence's words, gold from its tags
        spec = task.ner
        gold_tags = [ner.gold_tags(it.row[spec.tags], spec.types) for it in its]
        pred_tags = [ner.tag_entities(it.row[spec.tokens], ner.parse_entities(p, spec.types))
                     for it, p in zip(its, preds, strict=True)]
        metrics.update(ner.entity_report(gold_tags, pred_tags, seed=seed))
        counts = [ner.entity_counts(g, p) for g, p in zip(gold_tags, pred_tags, strict=True)]
        scores["entities"] = [dict(zip(("correct", "predicted", "gold"), c, strict=True)) for c in counts]
    metrics["efficiency"] = {"tokens": sum(g.prompt_tokens + g.new_tokens for g in gens),
                             "new_tokens": sum(g.new_tokens for g in gens)}
    metrics["settings"] = {
        "chat": chat, "extractor": task.extractor, "stop": list(task.stop),
        "max_new_tokens": task.max_new_tokens, "rel_tol": task.rel_tol,
        "truncated_prompts": sum(g.truncated for g in gens),
        "hit_max_new_tokens": sum(g.new_tokens >= task.max_new_tokens for g in gens),
        **(execution.settings(task) if outcomes is not None else {}),
    }
    predictions = [
        {"idx": it.idx, "gold": gold, "pred": pred,
         "scores": {"output": g.text, **{k: v[j] for k, v in scores.items()},
                    **({"status": outcomes[j].status, "reason": outcomes[j].reason} if outcomes else {})}}
        for j, (it, gold, pred, g) in enumerate(zip(its, golds, preds, gens, strict=True))
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
    metrics["efficiency"] = {"tokens": sum(len(c) + 1 for _, c in requests)}
    metrics["settings"] = {"max_length": length, "windows": "non-overlapping",
                           "documents": sum(1 for t in texts if t.strip())}
    predictions = [{"idx": i, "gold": None, "pred": None, "scores": {"nll": v, "tokens": t}}
                   for i, v, t in zip(idxs, nll, tokens, strict=True)]
    return TaskResult(task.name, len(idxs), n_total, 0, metrics, predictions)
