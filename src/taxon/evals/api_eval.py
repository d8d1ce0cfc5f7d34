"""Eval tasks on a model behind an OpenAI-compatible API (`api:<endpoint>/<model>`): the same items,
prompts, demonstrations, extractors and metrics as a local model, and a result stored the same way.

How each output type is scored (the method is recorded with the result):

- `generate`: chat (demonstrations as user/assistant turns) or completions (the plain prompt), per
  the endpoint's `generate_via`; temperature 0, the task's stop strings (the first four go to the
  server, all of them cut the text here) and `max_new_tokens`.
- `multiple_choice`, by `--api-method` (default: the endpoint's `choice_method`):
  - `loglikelihood-echo`: each choice appended to the plain prompt and sent to completions with
    `echo` and `logprobs`; a choice's score is the sum of the log-probabilities of the tokens from
    the end of the context on, exactly what the local scorer computes. Refused with one line when
    the server does not echo prompt log-probabilities (checked once).
  - `constrained-choice`: a chat question whose last line lists the answers ("Answer with one of:
    negative, neutral, positive."); the reply is parsed (`parse_choice`).
  - `top-logprobs`: the same question, and the first answer token's `top_logprobs` (20): each label
    gets the probability of the tokens that begin it and no other label; when none does, the reply
    is parsed as above.
  A reply that names no label is UNPARSED: prediction -1, its text kept in the prediction's scores
  (`{"unparsed": text}`), counted in `metrics["unparsed"]` and in the settings; never quietly taken
  as some label. Accuracy and the F1s count it as wrong.

The contract with the store and the report. A result's `metrics["settings"]` holds, besides what
local results hold:

- `api`: {`endpoint`, `model`, `fingerprint` (the identity's), `method` (`loglikelihood-echo`,
  `constrained-choice`, `top-logprobs` or `generate`), `unparsed` (count), `prompt_tokens`,
  `completion_tokens`, `cost_usd` (of every reply the result used, at the endpoint's prices),
  `requests` and `cache_hits` (this run), `spent_usd` (this run), `served` (the model names and
  system fingerprints the replies reported), `base_url`};
- `prompt_example`: the first item's prompt as sent (the plain text, or for chat the messages
  rendered as "[role]\\ntext" blocks), and `prompt_messages` (chat: the messages themselves).

The experiment's `model` column is the name as typed (`api:openai/gpt-4o`), its model key the
identity (`api:openai/gpt-4o@<fingerprint>`).
"""

from __future__ import annotations

import re
import time

import numpy as np

from taxon.config import EvalSpec
from taxon.data import render
from taxon.data.cards import get_card
from taxon.endpoints import api_model
from taxon.errors import TaxonError
from taxon.evals import items, subsets
from taxon.evals.api import Client
from taxon.evals.evaluate import TaskResult, _items, generation_result, prompts
from taxon.evals.generation import Generation, cut_at_stop
from taxon.evals.metrics import UNPARSED, classification_report
from taxon.evals.tasks import TaskSpec
from taxon.identity import api_method

MAX_STOP = 4  # OpenAI accepts at most four stop sequences
TOP_LOGPROBS = 20
CHOICE_TOKENS = 16  # reply length for a constrained answer


class _Plain:
    """Stands in for a tokenizer: an API model's prompts are plain text (no chat template applied
    here, no BOS written; a chat endpoint applies its own template)."""

    chat_template = None
    bos_token_id = None
    bos_token = None
    eos_token = ""


PLAIN = _Plain()


def instruction(labels: list[str]) -> str:
    return f"\n\nAnswer with one of: {', '.join(labels)}. Reply with the answer only."


def messages(prompt: str, demos: list[tuple[str, str]], suffix: str = "") -> list[dict]:
    out = []
    for p, c in demos:
        out += [{"role": "user", "content": p + suffix}, {"role": "assistant", "content": c.strip()}]
    return out + [{"role": "user", "content": prompt + suffix}]


def show(msgs: list[dict]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in msgs)


_STRIP = re.compile(r"[*_`\"'“”‘’()\[\]{}<>#]")
_LEAD = re.compile(r"^(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|label|sentiment|classification|"
                   r"category|option|choice)(?:\s+is)?\s*[:\-=]?\s*")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", _STRIP.sub(" ", text)).strip().lower()


def parse_choice(reply: str | None, labels: list[str]) -> int | None:
    """The label a free-text reply names, or None. In order: the whole reply is a label (quotes,
    markdown and a trailing full stop aside; "Answer:" and the like dropped); the reply begins with
    a label (the longest that fits); exactly one label (of two or more characters) occurs as a
    whole word, not counting one inside a longer label's occurrence ("not equivalent" is not also
    "equivalent")."""
    if not reply:
        return None
    text = _LEAD.sub("", _norm(reply))
    names = [_norm(label) for label in labels]
    bare = text.rstrip(".!,;: ")
    for i, name in enumerate(names):
        if name and bare == name:
            return i
    for i in sorted(range(len(names)), key=lambda i: -len(names[i])):
        if names[i] and re.match(re.escape(names[i]) + r"(?!\w)", text):
            return i
    spans = {i: [m.span() for m in re.finditer(r"(?<!\w)" + re.escape(n) + r"(?!\w)", text)]
             for i, n in enumerate(names) if len(n) > 1}
    hits = set()
    for i, found in spans.items():
        others = [s for j, ss in spans.items() if j != i and len(names[j]) > len(names[i]) for s in ss]
        if any(not any(a <= s and e <= b for a, b in others) for s, e in found):
            hits.add(i)
    return hits.pop() if len(hits) == 1 else None


def first_token_scores(reply: dict, labels: list[str]) -> list[float | None] | None:
    """Per label, the log of the summed probability of the first answer token's top candidates
    that begin that label and no other; None when the reply has no top_logprobs."""
    content = (((reply.get("choices") or [{}])[0].get("logprobs")) or {}).get("content")
    if not content:
        return None
    names = [_norm(label) for label in labels]
    mass: list[list[float]] = [[] for _ in labels]
    for cand in content[0].get("top_logprobs") or []:
        token = _norm(str(cand.get("token", "")))
        if not token:
            continue
        fits = [i for i, n in enumerate(names) if n.startswith(token)]
        if len(fits) == 1:
            mass[fits[0]].append(float(cand["logprob"]))
    return [float(np.logaddexp.reduce(m)) if m else None for m in mass]


def _text(reply: dict, chat: bool) -> str | None:
    choice = (reply.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") if chat else choice.get("text")


def _multiple_choice(client: Client, task: TaskSpec, method: str, *, shots, limit, seed):
    names = items.choices(task, get_card(task.dataset).for_config(task.config))
    its, n_total, layout = _items(task, limit, seed)
    asked = prompts(task, its, shots, seed)
    per_item = []
    for it, (prompt, demos) in zip(its, asked, strict=True):
        card = subsets.item_card(task, it.row)
        n = len(names)
        if task.choices_column:
            n = min(n, len(it.row[task.choices_column]))
        choices = [items.choice_text(task, card, it.vars, label) for label in range(n)]
        per_item.append((prompt, demos, choices, items.gold_index(task, card, it.vars)))
    if method == "loglikelihood-echo":
        client.check_echo()

    def score(entry):
        prompt, demos, choices, _ = entry
        if method == "loglikelihood-echo":
            context = render.format_prompt(PLAIN, prompt, False, demos)
            texts = [render.format_completion(PLAIN, c, False, end=False) for c in choices]
            echoed = client.echo_logprobs([context + t for t in texts])
            lls, merged = [], 0
            for text, (_, values, offsets) in zip(texts, echoed, strict=True):
                start, end = len(context), len(context) + len(text)
                picked = [v for v, o in zip(values, offsets, strict=False) if start <= o < end]
                merged += start not in offsets  # a token spans the context's end
                if not picked or any(v is None for v in picked):
                    client.check_echo()  # says why in one line
                lls.append(float(sum(picked)))
            return {"scores": lls, "merged": merged}, context
        labels = [c.strip() for c in choices]
        msgs = messages(prompt, demos, instruction(labels))
        body = {"messages": msgs, "max_tokens": CHOICE_TOKENS, "temperature": 0}
        if method == "top-logprobs":
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        reply = client.post("/chat/completions", body)
        text = _text(reply, chat=True)
        out = {"reply": text}
        if method == "top-logprobs":
            lps = first_token_scores(reply, labels)
            if lps is None:
                raise TaxonError(f"{client.api.name} gave no top_logprobs with its reply; use "
                                 "--api-method constrained-choice")
            out["logprobs"] = lps
        return out, msgs

    # The first item alone: its prompt is the example, and a problem shows before many requests.
    results = [score(per_item[0])] if per_item else []
    example = results[0][1] if results else None
    results += client.map(score, per_item[1:])
    golds = [e[3] for e in per_item]
    preds, probs, predictions, merged, fallback = [], [], [], 0, 0
    for it, entry, (out, _) in zip(its, per_item, results, strict=True):
        k = len(entry[2])
        row = np.zeros(len(names))
        if method == "loglikelihood-echo":
            ll = np.array(out["scores"])
            merged += out["merged"]
            p = np.exp(ll - ll.max())
            row[:k] = p / p.sum()
            pred, scores = int(ll.argmax()), out["scores"]
        else:
            labels = [c.strip() for c in entry[2]]
            pred = None
            lps = out.get("logprobs")
            if lps is not None and any(v is not None for v in lps):
                ll = np.array([-np.inf if v is None else v for v in lps])
                pred = int(ll.argmax())
                p = np.exp(ll - ll.max())
                row[:k] = p / p.sum()
            else:
                pred = parse_choice(out["reply"], labels)
                fallback += lps is not None
                if pred is not None:
                    row[pred] = 1.0
            if pred is None:
                row[:k] = 1.0 / k
            scores = ({"unparsed": out["reply"]} if pred is None else
                      {"reply": out["reply"], **({"logprobs": lps} if lps is not None else {})})
            pred = UNPARSED if pred is None else pred
        preds.append(pred)
        probs.append(row)
        predictions.append({"idx": it.idx, "gold": int(entry[3]), "pred": int(pred), "scores": scores})
    groups = [it.group for it in its] if task.questions else None
    pooled = [m for m in task.metrics if m != "macro_accuracy"]
    metrics = classification_report(golds, preds, probs, list(names), pooled, seed=seed, groups=groups)
    unparsed = sum(p == UNPARSED for p in preds)
    metrics["unparsed"] = {"count": unparsed, "rate": unparsed / len(preds) if preds else 0.0}
    chat = method != "loglikelihood-echo"
    metrics["settings"] = {"chat": chat, "truncated_prompts": 0,
                           "prompt_example": show(example) if chat else example,
                           **({"prompt_messages": example} if chat else {}),
                           **({"boundary_tokens_merged": merged} if not chat else {}),
                           **({"top_logprobs_fallback_parsed": fallback} if method == "top-logprobs"
                              else {})}
    if layout is not None:
        per, macro = subsets.report([it.row.get(subsets.SUBSET) for it in its],
                                    np.array(preds) == np.array(golds), seed)
        metrics["subsets"] = per
        if "macro_accuracy" in task.metrics:
            metrics["macro_accuracy"] = macro
        metrics["settings"]["subsets"] = layout
    return TaskResult(task.name, len(golds), n_total, shots, metrics, predictions), unparsed


def _generate(client: Client, task: TaskSpec, *, shots, limit, seed):
    its, n_total, _ = _items(task, limit, seed)
    asked = prompts(task, its, shots, seed)
    chat = client.api.spec.generate_via == "chat"
    stop = list(task.stop)[:MAX_STOP]

    def ask(entry):
        prompt, demos = entry
        body = {"max_tokens": task.max_new_tokens, "temperature": 0, **({"stop": stop} if stop else {})}
        if chat:
            reply = client.post("/chat/completions", {"messages": messages(prompt, demos), **body})
        else:
            text = render.format_prompt(PLAIN, prompt, False, demos)
            reply = client.post("/completions", {"prompt": text, **body})
        usage = reply.get("usage") or {}
        raw = _text(reply, chat)
        return Generation(cut_at_stop(raw or "", task.stop), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), False), raw is None

    gens_empty = client.map(ask, asked)
    gens = [g for g, _ in gens_empty]
    result = generation_result(task, its, n_total, shots, seed, gens, chat)
    prompt, demos = asked[0] if asked else ("", [])
    result.metrics["settings"]["prompt_example"] = (show(messages(prompt, demos)) if chat else
                                                    render.format_prompt(PLAIN, prompt, False, demos))
    if chat:
        result.metrics["settings"]["prompt_messages"] = messages(prompt, demos)
    unparsed = sum(empty for _, empty in gens_empty)
    return result, unparsed


def evaluate_api(name: str, task: TaskSpec, spec: EvalSpec) -> tuple[TaskResult, dict]:
    """Evaluate the API model `name` (`api:<endpoint>/<model>`) on `task`; (TaskResult, resources)."""
    t0 = time.time()
    api = api_model(name)
    method = api_method(task, spec, name)
    client = Client(api)
    try:
        shots = task.shots if spec.shots is None else spec.shots
        if task.output == "generate":
            r, unparsed = _generate(client, task, shots=shots, limit=spec.limit, seed=spec.seed)
        else:
            r, unparsed = _multiple_choice(client, task, method, shots=shots, limit=spec.limit,
                                           seed=spec.seed)
    finally:
        client.close()
    usage = client.summary()
    r.metrics["settings"] = {
        "seed": spec.seed, **r.metrics.get("settings", {}),
        "api": {"endpoint": api.endpoint, "model": api.model, "fingerprint": client.fp,
                "method": method, "unparsed": unparsed, "base_url": api.url,
                "served": sorted(client.seen), **usage},
    }
    r.seconds = time.time() - t0
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    r.metrics["efficiency"] = {
        **r.metrics.get("efficiency", {}), "tokens": tokens, "seconds": r.seconds,
        "tokens_per_s": tokens / r.seconds if r.seconds else None,
        "items_per_s": r.n / r.seconds if r.seconds else None,
        "peak_memory_mb": None, "peak_memory_kind": "api", "total_params": None, "trainable_params": None,
    }
    resources = {"wall_seconds": r.seconds, "tokens": tokens, "peak_memory_mb": None,
                 "total_params": None, "trainable_params": None}
    return r, resources
