"""MMLU and MMLU-Pro on `tiny`: the standard 5-shot prompt, demonstrations shared by a subject's
questions, per-subset and macro accuracy traceable to the stored predictions, and scores equal
to a plain forward pass over the real prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from taxon.config import parse
from taxon.data.mixture import encode_pair
from taxon.errors import TaxonError
from taxon.evals import items, subsets
from taxon.evals.evaluate import _contexts, evaluate_task
from taxon.evals.tasks import TaskSpec, get_task

SUBJECTS = ("anatomy", "virology")


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plain_loglikelihood(model, ctx, cont) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


def test_all_configs_are_the_57_subjects():
    subjects = subsets.task_configs(get_task("mmlu"))
    assert len(subjects) == 57 and "all" not in subjects and subjects[0] == "abstract_algebra"


def test_five_shot_prompt_is_the_standard_format(tiny_tokenizer, data_dir):
    task = get_task("mmlu").model_copy(update={"configs": SUBJECTS})
    rows, n_total, layout = subsets.items(task, 3, seed=0)
    assert [x["name"] for x in layout] == list(SUBJECTS) and len(rows) == 6
    assert n_total == sum(x["size"] for x in layout)
    contexts, chat = _contexts(tiny_tokenizer, task, items.expand(task, rows), 5, seed=0)
    assert chat is False
    dev = read_jsonl(data_dir / "cais/mmlu/anatomy/dev.jsonl")
    test = read_jsonl(data_dir / "cais/mmlu/anatomy/test.jsonl")
    row = rows[0]
    assert test[row["_idx"]]["question"] == row["question"]
    demos = "".join(
        d["question"].strip() + "\n" + "".join(f"{'ABCD'[k]}. {c}\n" for k, c in enumerate(d["choices"]))
        + f"Answer: {'ABCD'[d['answer']]}\n\n" for d in dev
    )
    question = row["question"].strip() + "\n" + "".join(
        f"{'ABCD'[k]}. {c}\n" for k, c in enumerate(row["choices"])) + "Answer:"
    expected = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                + demos + question)
    assert contexts[0] == expected
    # Every question of a subject begins with the same header and five demonstrations.
    assert all(c.startswith(expected[: -len(question)]) for c in contexts[:3])
    assert not contexts[3].startswith(expected[: -len(question)])


def test_mmlu_scores_and_per_subject_accuracy(tiny_model):
    model, tok = tiny_model
    task = get_task("mmlu").model_copy(update={"configs": SUBJECTS})
    r = evaluate_task(model, tok, task, limit=4, seed=0, batch_size=3)
    assert r.n == 8 and r.shots == 5
    layout = r.metrics["settings"]["subsets"]
    idxs = [p["idx"] for p in r.predictions]
    assert len(set(idxs)) == 8
    # Each prediction's index falls in its subject's range; per-subject accuracy is recomputed.
    by_subject = {}
    for p in r.predictions:
        name = next(x["name"] for x in layout if x["first"] <= p["idx"] < x["first"] + x["size"])
        by_subject.setdefault(name, []).append(p["pred"] == p["gold"])
        assert p["pred"] == int(np.argmax(p["scores"]))
    for name, hits in by_subject.items():
        assert r.metrics["subsets"][name] == {"n": 4, "accuracy": float(np.mean(hits))}
    macro = np.mean([np.mean(h) for h in by_subject.values()])
    assert r.metrics["macro_accuracy"]["value"] == pytest.approx(macro)
    assert r.metrics["accuracy"]["value"] == pytest.approx(np.mean(sum(by_subject.values(), [])))
    # The stored scores are exact log-likelihoods of the real 5-shot prompts.
    rows, _, _ = subsets.items(task, 4, seed=0)
    contexts, _ = _contexts(tok, task, items.expand(task, rows), 5, seed=0)
    for j in (0, 5):
        for label in (0, 3):
            ctx, cont = encode_pair(tok, contexts[j], " " + "ABCD"[label])
            assert abs(r.predictions[j]["scores"][label] - plain_loglikelihood(model, ctx, cont)) < 1e-4


def test_mmlu_pro_by_category_with_fewer_options(merged_data_dir, monkeypatch, tiny_model):
    monkeypatch.setenv("TAXON_DATA_DIR", str(merged_data_dir))
    model, tok = tiny_model
    r = evaluate_task(model, tok, get_task("mmlu_pro"), seed=0, batch_size=4)
    test = read_jsonl(merged_data_dir / "TIGER-Lab/MMLU-Pro/default/test.jsonl")
    assert r.n == len(test) == 3
    assert set(r.metrics["subsets"]) == {row["category"] for row in test}
    for p in r.predictions:
        n_options = len(test[p["idx"]]["options"])
        assert len(p["scores"]) == 10
        assert all(s is not None for s in p["scores"][:n_options])
        assert all(s is None for s in p["scores"][n_options:])  # a 6-option row never answers G-J
        assert p["pred"] < n_options
    json.dumps(r.metrics)  # storable


def test_subset_fields_are_checked_and_leave_old_task_identities_alone():
    for t in ("fpb", "tfns", "gsm8k"):
        canonical = json.loads(get_task(t).canonical())
        assert not {"configs", "group_by", "header", "fewshot_sampler", "choices"} & set(canonical)
    with pytest.raises(TaxonError, match="macro_accuracy needs subsets"):
        parse(TaskSpec, {"name": "x", "dataset": "fpb", "metrics": ["accuracy", "macro_accuracy"],
                         "primary": "accuracy"}, "task x")
