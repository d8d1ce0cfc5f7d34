"""Named-entity recognition scored as FinBen/PIXIU score it: the model lists entities as
"entity name, TYPE" lines; each listed name is tagged wherever its words occur in the sentence, and
the tag sequences are compared with the gold ones by entity-level F1 (seqeval, micro average over
entities: an entity counts when its type, first and last word all match).

Two differences from PIXIU's script, both stricter: a name matches whole words only (PIXIU matches
characters, so "Inc" also tags "Incorporated"), and a line whose type is not scored is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taxon.evals.metrics import bootstrap_ci


def gold_tags(tags: Sequence[str], types: Sequence[str]) -> list[str]:
    """IO or BIO tags as BIO over the scored types (others become O). Consecutive words of one
    type form one entity unless a B- tag starts a new one, as the card's `entities` filter reads them."""
    out, prev = [], None
    for tag in tags:
        prefix, _, kind = tag.partition("-") if "-" in tag else ("I", "", tag)
        if not tag or tag == "O" or kind not in types:
            out.append("O")
            prev = None
            continue
        out.append(("I-" if prev == kind and prefix != "B" else "B-") + kind)
        prev = kind
    return out


def parse_entities(text: str, types: Sequence[str]) -> list[tuple[str, str]]:
    """(name, TYPE) from lines "name, TYPE" (the type after the last comma); other lines ignored."""
    out = []
    for line in text.splitlines():
        name, sep, kind = line.strip().strip("-*'\" ").rpartition(",")
        kind = kind.strip().strip("'\".").upper()
        if sep and name.strip() and kind in types:
            out.append((name.strip(), kind))
    return out


def tag_entities(tokens: Sequence[str], entities: Sequence[tuple[str, str]]) -> list[str]:
    """BIO tags of `tokens` with each entity tagged at every occurrence of its words (a later
    entity overwrites an earlier one where they overlap)."""
    tags = ["O"] * len(tokens)
    for name, kind in entities:
        words = name.split()
        n = len(words)
        for i in range(len(tokens) - n + 1):
            if list(tokens[i : i + n]) == words:
                tags[i : i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
    return tags


def entity_counts(gold: Sequence[str], pred: Sequence[str]) -> tuple[int, int, int]:
    """(correct, predicted, gold) entities of one sentence, as seqeval finds them."""
    from seqeval.metrics.sequence_labeling import get_entities

    g, p = set(get_entities(list(gold))), set(get_entities(list(pred)))
    return len(g & p), len(p), len(g)


def micro_f1(counts: np.ndarray) -> float:
    """Entity F1 from (correct, predicted, gold) counts: one sentence's, or summed over rows."""
    tp, n_pred, n_gold = counts.sum(axis=0) if counts.ndim == 2 else counts
    return float(2 * tp / (n_pred + n_gold)) if n_pred + n_gold else 0.0


def entity_report(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str]], seed: int = 0,
                  n_resamples: int = 1000) -> dict:
    """entity_f1 {value, low, high} (seqeval's micro F1; the interval resamples sentences), its
    precision and recall, and F1 per entity type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    golds, preds = [list(g) for g in golds], [list(p) for p in preds]
    value = float(f1_score(golds, preds, zero_division=0)) if golds else 0.0
    counts = np.array([entity_counts(g, p) for g, p in zip(golds, preds, strict=True)], dtype=float)
    low, high = bootstrap_ci(lambda idx: micro_f1(counts[idx]), len(counts), seed, n_resamples)
    per_type = classification_report(golds, preds, output_dict=True, zero_division=0) if golds else {}
    return {
        "entity_f1": {"value": value, "low": low, "high": high},
        "entity_precision": float(precision_score(golds, preds, zero_division=0)) if golds else 0.0,
        "entity_recall": float(recall_score(golds, preds, zero_division=0)) if golds else 0.0,
        "per_type": {k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                     for k, v in per_type.items() if "avg" not in k},
    }
