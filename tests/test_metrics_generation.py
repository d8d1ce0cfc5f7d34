"""Generation and perplexity metrics against the libraries (rouge-score, sacrebleu) and hand
computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from taxon.evals.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    exact_match,
    generation_report,
    normalize_answer,
    numeric_match,
    parse_number,
    perplexity_report,
    rouge_l,
    token_f1,
)

GOLDS = [
    "NVIDIA initially focused on PC graphics.",
    "Revenue increased by 12% to $4.2 billion in fiscal 2023.",
    "The company uses derivatives to hedge foreign currency risk.",
    "Apple's net sales were $394.3 billion.",
    "The Board of Directors.",
    "Operating expenses decreased due to lower headcount.",
]
PREDS = [
    "NVIDIA first focused on PC graphics",
    "Revenue rose 12% to $4.2 billion in fiscal 2023.",
    "The company hedges currency risk with derivatives.",
    "apple's net sales were $394.3 billion",
    "the board of directors",
    "",
]


def test_normalisation_like_squad():
    assert normalize_answer("The  Board, of Directors!") == "board of directors"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words


def test_exact_match_by_hand():
    assert exact_match("The Board of Directors.", "board of directors") == 1.0
    assert exact_match("board of directors", "board of director") == 0.0
    assert [exact_match(g, p) for g, p in zip(GOLDS, PREDS, strict=True)] == [0, 0, 0, 1, 1, 0]


def test_token_f1_by_hand():
    # gold tokens: nvidia initially focused on pc graphics (6); pred: nvidia first focused on pc
    # graphics (6); 5 in common -> P = R = 5/6.
    assert token_f1(GOLDS[0], PREDS[0]) == pytest.approx(5 / 6)
    # Repeated tokens count as often as both sides have them (SQuAD's Counter intersection).
    assert token_f1("a b b c", "b b b") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("x", "y") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("a thing", "") == 0.0
    assert token_f1("The", "the") == 1.0  # both normalise to nothing


def test_rouge_l_equals_rouge_score_and_hand_lcs():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(g, p)["rougeL"].fmeasure for g, p in zip(GOLDS, PREDS, strict=True)]
    assert rouge_l(GOLDS, PREDS) == pytest.approx(expected)
    # By hand: "the cat sat on the mat" vs "the cat lay on a mat": LCS the cat on mat = 4 of 6 each.
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on a mat"])[0] == pytest.approx(4 / 6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bleu_equals_sacrebleu_corpus_score(order):
    expected = BLEU(max_ngram_order=order).corpus_score(PREDS, [GOLDS]).score / 100
    stats = bleu_statistics(GOLDS, PREDS)
    assert stats.shape == (len(GOLDS), 10)
    assert bleu_from_statistics(stats, order) == pytest.approx(expected, abs=1e-12)
    if order == 4:
        assert expected == pytest.approx(sacrebleu.corpus_bleu(PREDS, [GOLDS]).score / 100)
    # A sub-corpus from summed rows equals sacrebleu on that sub-corpus (what the bootstrap does).
    idx = np.array([0, 0, 2, 5])
    sub = BLEU(max_ngram_order=order).corpus_score([PREDS[i] for i in idx], [[GOLDS[i] for i in idx]])
    assert bleu_from_statistics(stats[idx], order) == pytest.approx(sub.score / 100, abs=1e-12)


def test_bleu_1_by_hand():
    # One pair, 13a tokens: hyp "the cat sat" (3), ref "the cat sat down" (4). Unigram precision
    # 3/3; brevity penalty exp(1 - 4/3).
    stats = bleu_statistics(["the cat sat down"], ["the cat sat"])
    assert bleu_from_statistics(stats, 1) == pytest.approx(math.exp(1 - 4 / 3))


def test_numbers_and_tolerance():
    assert parse_number("1,234.5") == 1234.5 and parse_number("$18") == 18.0
    assert parse_number("12.5%") == 12.5 and parse_number("about 7 or 8 units") == 8.0
    assert parse_number("none") is None and parse_number("") is None
    assert numeric_match("100", "100.0", rel_tol=0) == 1.0
    assert numeric_match("100", "99", rel_tol=0) == 0.0
    assert numeric_match("100", "99", rel_tol=1e-2) == 1.0  # |1| <= 0.01 * 100
    assert numeric_match("100", "98.9", rel_tol=1e-2) == 0.0
    assert numeric_match("-2.5", "-2.52", rel_tol=1e-2) == 1.0
    assert numeric_match("0", "0.0", rel_tol=1e-2) == 1.0 and numeric_match("0", "0.001") == 0.0
    assert numeric_match("18", "", rel_tol=1e-2) == 0.0


def test_generation_report_values_and_intervals():
    names = ["exact_match", "token_f1", "rouge_l", "bleu_1", "bleu_2", "bleu_3", "bleu_4"]
    golds, preds = GOLDS * 10, PREDS * 10
    rep = generation_report(golds, preds, names, seed=0, n_resamples=200)
    assert set(rep) == set(names)
    assert rep["exact_match"]["value"] == pytest.approx(2 / 6)
    assert rep["token_f1"]["value"] == pytest.approx(np.mean([token_f1(g, p) for g, p in
                                                              zip(GOLDS, PREDS, strict=True)]))
    assert rep["bleu_4"]["value"] == pytest.approx(sacrebleu.corpus_bleu(preds, [golds]).score / 100)
    assert rep["bleu_1"]["value"] > rep["bleu_2"]["value"] > rep["bleu_4"]["value"] > 0
    for name in names:
        m = rep[name]
        assert m["low"] <= m["value"] <= m["high"] and m["low"] < m["high"], (name, m)
    again = generation_report(golds, preds, names, seed=0, n_resamples=200)
    assert again == rep  # seeded


def test_numeric_accuracy_report_uses_tolerance():
    rep = generation_report(["100", "50", "7"], ["99.5", "55", "7"], ["numeric_accuracy"], rel_tol=1e-2,
                            n_resamples=50)
    assert rep["numeric_accuracy"]["value"] == pytest.approx(2 / 3)
    strict = generation_report(["100", "50", "7"], ["99.5", "55", "7"], ["numeric_accuracy"], rel_tol=0,
                               n_resamples=50)
    assert strict["numeric_accuracy"]["value"] == pytest.approx(1 / 3)


def test_perplexity_report_by_hand():
    nll, tokens = [10.0, 30.0, 2.0], [5, 10, 1]
    rep = perplexity_report(nll, tokens, n_resamples=200)
    assert rep["loss"]["value"] == pytest.approx(42 / 16)  # tokens weigh, not windows
    assert rep["perplexity"]["value"] == pytest.approx(math.exp(42 / 16))
    assert rep["perplexity"]["low"] == pytest.approx(math.exp(rep["loss"]["low"]))
    assert rep["perplexity"]["high"] == pytest.approx(math.exp(rep["loss"]["high"]))
    assert rep["loss"]["low"] <= rep["loss"]["value"] <= rep["loss"]["high"]
    assert rep["tokens"] == 16
