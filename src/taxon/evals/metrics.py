"""Metrics researchers report, with bootstrap confidence intervals over test items.

Classification: point values from scikit-learn. Generation: SQuAD-style exact match and token
F1, ROUGE-L (the `rouge-score` package), corpus BLEU-1..4 (`sacrebleu`) and numeric accuracy
within a relative tolerance. Perplexity: mean token loss and its exponential. Intervals: scipy's
percentile bootstrap over resampled items (windows, for perplexity), 1,000 resamples; corpus-level
scores (BLEU, loss) are recomputed from the resampled items' summed statistics.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    matthews_corrcoef,
    precision_recall_fscore_support,
)


def expected_calibration_error(y_true, probs, n_bins: int = 10) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| x share."""
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def _mcc(y_true, y_pred) -> float:
    with warnings.catch_warnings():  # a resample with one class is legal: MCC is 0 there
        warnings.simplefilter("ignore", UserWarning)
        return float(matthews_corrcoef(y_true, y_pred)) if len(y_true) else 0.0


def scalar_metrics(n_classes: int) -> dict[str, Callable]:
    # The F1s come from one bincount confusion matrix: the bootstrap calls them thousands of times,
    # where scikit-learn's input checks dominate (tests/test_metrics.py: equal to f1_score).
    return {
        "accuracy": lambda t, p, pr: accuracy_score(t, p),
        "macro_f1": lambda t, p, pr: float(f1_by_class(t, p, n_classes)[0].mean()),
        "weighted_f1": lambda t, p, pr: weighted_f1(t, p, n_classes),
        "ece": lambda t, p, pr: expected_calibration_error(t, pr),
        # GLUE's own metrics: Matthews correlation (CoLA) and F1 of label 1 (MRPC, QQP)
        "mcc": lambda t, p, pr: _mcc(t, p),
        "binary_f1": lambda t, p, pr: float(f1_by_class(t, p, max(n_classes, 2))[0][1]),
    }


def f1_by_class(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class's F1 (2·tp / (support + predicted); 0 where both are 0, scikit-learn's
    zero_division=0) and its support. A prediction of -1 (an API reply that named no label,
    UNPARSED) is wrong for its item and predicts no class."""
    y_pred = np.asarray(y_pred)
    width = n_classes + 1  # the last column: unparsed
    cm = np.bincount(np.asarray(y_true) * width + np.where(y_pred < 0, n_classes, y_pred),
                     minlength=n_classes * width).reshape(n_classes, width)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm[:, :n_classes].sum(axis=0)
    denom = support + predicted
    return np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0), support


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Support-weighted F1 (scikit-learn's average="weighted")."""
    f1, support = f1_by_class(y_true, y_pred, n_classes)
    return float((f1 * support).sum() / support.sum()) if support.sum() else 0.0


def avg_f1(y_true, y_pred, groups, n_classes: int) -> float:
    """Mean over groups (questions) of the support-weighted F1 within each group: FinBen/PIXIU's
    "Avg F1" of the gold-news headline task."""
    return float(np.mean([weighted_f1(y_true[groups == g], y_pred[groups == g], n_classes)
                          for g in np.unique(groups)]))


UNPARSED = -1  # the prediction of an item whose reply (an API model's) named no label


def classification_report(y_true, y_pred, probs, label_names, names, seed=0, n_resamples=1000,
                          groups=None):
    """{metric: {value, low, high}} for each scalar metric in `names`, plus the confusion matrix
    and per-class precision/recall/F1. `groups`: each item's question, for `avg_f1`.

    A prediction may be UNPARSED (-1): it counts as wrong in every metric (accuracy, each class's
    recall, hence the F1s), is in no class's precision and no column of the confusion matrix, and
    `unparsed` gives its count and share (present whenever there is one)."""
    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs)
    fns = scalar_metrics(len(label_names))
    out: dict = {}
    g = None if groups is None else np.asarray(groups)
    k = len(label_names)
    for name in names:
        if name == "avg_f1":  # each resampled item keeps its group
            def stat(idx):
                return avg_f1(y_true[idx], y_pred[idx], g[idx], k)
        else:
            def stat(idx, fn=fns[name]):
                return fn(y_true[idx], y_pred[idx], probs[idx])
        value = float(stat(np.arange(len(y_true))))
        low, high = bootstrap_ci(stat, len(y_true), seed, n_resamples)
        out[name] = {"value": value, "low": low, "high": high}
    labels = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out["per_class"] = {
        label_names[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                         "support": int(s[i])}
        for i in labels
    }
    out["confusion"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    unparsed = int((y_pred == UNPARSED).sum())
    if unparsed:
        out["unparsed"] = {"count": unparsed, "rate": unparsed / len(y_pred)}
    if g is not None:
        out["per_group"] = {str(q): {"weighted_f1": weighted_f1(y_true[g == q], y_pred[g == q], k),
                                     "n": int((g == q).sum())} for q in dict.fromkeys(g.tolist())}
    return out


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, seed: int, n_resamples: int = 1000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over resampled item indices."""
    if n < 2:
        v = float(stat(np.arange(n)))
        return v, v
    res = bootstrap(
        (np.arange(n),), lambda idx: stat(idx.astype(int)), vectorized=False,
        n_resamples=n_resamples, confidence_level=level, method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# --- generation -------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")  # minus only as a sign, not "16-3"


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def token_f1(gold: str, pred: str) -> float:
    """SQuAD token F1 over normalised tokens; when either side is empty, 1 if both are, else 0."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def parse_number(text: str) -> float | None:
    """The number a string states: the whole string if it is one (commas, `$`, `%` dropped),
    else the last number in it; None if there is none."""
    t = text.strip().replace(",", "").replace("$", "").rstrip("%.").strip()
    try:
        value = float(t)
    except ValueError:
        found = NUMBER.findall(text)
        if not found:
            return None
        value = float(found[-1].replace(",", ""))
    return value if math.isfinite(value) else None


def numeric_match(gold: str, pred: str, rel_tol: float = 1e-2) -> float:
    """1 when both parse as numbers and |pred - gold| <= rel_tol * |gold| (rel_tol 0: equal)."""
    g, p = parse_number(gold), parse_number(pred)
    if g is None or p is None:
        return 0.0
    return float(abs(p - g) <= rel_tol * abs(g))


def execution_match(gold: str, pred: str, rel_tol: float = 1e-2) -> float:
    """ConvFinQA-style execution accuracy: when the gold is a number, 1 if the answer's number is
    within rel_tol of it, or of 100 x it (a ratio answered as a percentage, "14.1%" for 0.141);
    a gold that is not a number (yes/no) must match after normalisation."""
    g = parse_number(gold)
    if g is None:
        return exact_match(gold, pred)
    p = parse_number(pred)
    if p is None:
        return 0.0
    return float(any(abs(p - x) <= rel_tol * abs(x) for x in (g, 100 * g)))


def rouge_l(golds: Sequence[str], preds: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per item (rouge-score, Porter stemming on)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(g, p)["rougeL"].fmeasure for g, p in zip(golds, preds, strict=True)]


BLEU_ORDER = 4


def bleu_statistics(golds: Sequence[str], preds: Sequence[str]) -> np.ndarray:
    """Per item: [hyp_len, ref_len, matches_1..4, totals_1..4] as sacrebleu counts them (13a
    tokenisation). Corpus BLEU is computed from their sums, so resampling items is cheap."""
    from sacrebleu.metrics import BLEU

    return np.array(BLEU(max_ngram_order=BLEU_ORDER)._extract_corpus_statistics(
        list(preds), [list(golds)]), dtype=np.int64)


def bleu_from_statistics(stats: np.ndarray, order: int) -> float:
    """Corpus BLEU-`order` (sacrebleu's default exponential smoothing) on a 0-1 scale from the
    summed per-item statistics."""
    from sacrebleu.metrics import BLEU

    total = stats.sum(axis=0) if stats.ndim == 2 else stats
    matches = total[2 : 2 + BLEU_ORDER][:order].tolist()
    counts = total[2 + BLEU_ORDER :][:order].tolist()
    score = BLEU.compute_bleu(matches, counts, int(total[0]), int(total[1]), smooth_method="exp",
                              max_ngram_order=order)
    return score.score / 100


def generation_scores(golds: Sequence[str], preds: Sequence[str], names: Sequence[str],
                      rel_tol: float = 1e-2) -> dict[str, list[float]]:
    """Per-item values of the item-level metrics among `names` (BLEU is corpus-level: none)."""
    out: dict[str, list[float]] = {}
    for name in names:
        if name == "exact_match":
            out[name] = [exact_match(g, p) for g, p in zip(golds, preds, strict=True)]
        elif name == "token_f1":
            out[name] = [token_f1(g, p) for g, p in zip(golds, preds, strict=True)]
        elif name == "rouge_l":
            out[name] = rouge_l(golds, preds)
        elif name == "numeric_accuracy":
            out[name] = [numeric_match(g, p, rel_tol) for g, p in zip(golds, preds, strict=True)]
        elif name == "execution_accuracy":
            out[name] = [execution_match(g, p, rel_tol) for g, p in zip(golds, preds, strict=True)]
        elif name == "semantic_similarity":
            from taxon.evals.semantic import similarities

            out[name] = similarities(golds, preds)
        elif not re.fullmatch(r"bleu_[1-4]", name):
            raise ValueError(f"unknown generation metric '{name}'")
    return out


def generation_report(golds: Sequence[str], preds: Sequence[str], names: Sequence[str],
                      rel_tol: float = 1e-2, seed: int = 0, n_resamples: int = 1000,
                      items: dict[str, list[float]] | None = None) -> dict:
    """{metric: {value, low, high}} for each name in `names` (bleu_1..bleu_4 spelled out).
    Item-level metrics are means over items; BLEU is corpus-level, its interval from resampled
    items. `items`: per-item values already computed by `generation_scores`."""
    items = items if items is not None else generation_scores(golds, preds, names, rel_tol)
    stats = bleu_statistics(golds, preds) if any(n.startswith("bleu_") for n in names) else None
    out: dict = {}
    for name in names:
        if name in items:
            values = np.asarray(items[name], dtype=float)
            value = float(values.mean())
            low, high = bootstrap_ci(lambda idx, v=values: float(v[idx].mean()), len(values), seed,
                                     n_resamples)
        else:
            order = int(name.rsplit("_", 1)[1])
            assert stats is not None
            value = bleu_from_statistics(stats, order)
            low, high = bootstrap_ci(lambda idx, k=order: bleu_from_statistics(stats[idx], k),
                                     len(stats), seed, n_resamples)
        out[name] = {"value": value, "low": low, "high": high}
    return out


# --- perplexity -------------------------------------------------------------------------------


def perplexity_report(nll: Sequence[float], tokens: Sequence[int], seed: int = 0,
                      n_resamples: int = 1000) -> dict:
    """loss = total NLL / total predicted tokens (nats per token), perplexity = exp(loss); both
    with a percentile interval over resampled windows (exp is monotone: the perplexity interval
    is exp of the loss interval)."""
    nll_a, tok_a = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    loss = float(nll_a.sum() / tok_a.sum())
    low, high = bootstrap_ci(lambda idx: float(nll_a[idx].sum() / tok_a[idx].sum()), len(nll_a),
                             seed, n_resamples)
    return {
        "loss": {"value": loss, "low": low, "high": high},
        "perplexity": {"value": math.exp(loss), "low": math.exp(low), "high": math.exp(high)},
        "tokens": int(tok_a.sum()),
    }
