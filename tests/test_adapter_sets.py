"""Adapter sets on `tiny`: one adapter per dataset from a fresh base with identical settings, each
dataset capped with a seeded held-out share for the eval loss; validation prompts whose checks
fail on wrong answers; the report's transfer matrix with the base row and the own task marked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from rich.console import Console
from study_fixtures import fresh_cache
from transformers import TrainerCallback

from taxon.config import DataRef, StageSpec
from taxon.data.mixture import select_rows
from taxon.errors import TaxonError
from taxon.evals import validation
from taxon.study.load import load_study

STUDY = """
name: tiny-sets
model: tiny
seed: 3
eval: {tasks: [fpb, sst2], limit: 6, batch_size: 4}
adapter_sets:
  - name: adapter
    examples: 40
    holdout: 0.1
    datasets:
      fpb: {dataset: takala/financial_phrasebank, config: sentences_50agree, task: fpb}
      sst2: {dataset: glue, config: sst2, task: sst2}
    stage: {steps: 2, batch_size: 2, max_length: 128, lr: 1.0e-3, lora: {r: 4, alpha: 8}}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch, data_dir) -> Path:
    """A fresh stage cache with the session's models linked in (not rebuilt)."""
    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    return tmp_path / "cache"


def _study(tmp_path: Path, text: str = STUDY):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return load_study(path)


def test_set_expands_to_identical_adapters_named_by_dataset(tmp_path):
    study = _study(tmp_path)
    names = [e.name for e in study.experiments]
    assert names == ["adapter[base]", "adapter[fpb]", "adapter[sst2]", "adapter[multi-task]"]
    fpb, sst2, multi = (study.experiments[i].stages[0] for i in (1, 2, 3))
    # identical settings except the data
    assert fpb.model_copy(update={"data": ()}) == sst2.model_copy(update={"data": ()})
    assert fpb.objective == "sft" and fpb.lora.r == 4 and fpb.seed == 3
    assert (fpb.data[0].cap, fpb.data[0].holdout) == (40, 0.1)
    assert [r.rate for r in multi.data] == [0.5, 0.5]
    assert study.experiments[1].axes["task"] == "fpb" and study.experiments[0].axes["dataset"] == "base"
    assert study.adapter_sets[0].datasets["sst2"].task == "sst2"


def test_seeds_give_one_adapter_per_seed(tmp_path):
    study = _study(tmp_path, STUDY.replace("seed: 3", "seeds: [1, 2]"))
    names = [e.name for e in study.experiments]
    assert "adapter[fpb,seed=1]" in names and "adapter[fpb,seed=2]" in names
    assert names.count("adapter[base]") == 1  # nothing trains, nothing to repeat


@pytest.mark.parametrize("change, words", [
    (("fpb: {", "base: {"), "must be letters"),
    (("stage: {", "stage: {objective: pretrain, "), "objective"),
    (("tasks: [fpb, sst2]", "tasks: [fpb]"), "sst2"),
    (("lora: {r: 4, alpha: 8}", "lora: null"), "LoRA"),
    (("examples: 40", "examples: 3"), "examples"),
])
def test_bad_sets_are_one_clear_line(tmp_path, change, words):
    with pytest.raises(TaxonError) as e:
        _study(tmp_path, STUDY.replace(*change))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cap_and_holdout_are_a_seeded_disjoint_split():
    rows = Dataset.from_list([{"i": i} for i in range(500)])
    ref = DataRef(dataset="x", cap=100, holdout=0.1)
    train = [r["i"] for r in select_rows(rows, ref, seed=0)]
    held = [r["i"] for r in select_rows(rows, ref, seed=0, part="holdout")]
    assert (len(train), len(held)) == (90, 10) and not set(train) & set(held)
    assert held == [r["i"] for r in select_rows(rows, ref, seed=0, part="holdout")]  # seeded
    assert held != [r["i"] for r in select_rows(rows, ref, seed=1, part="holdout")]
    assert set(train + held) != set(range(100))  # a seeded sample, not the first rows
    # the held-out rows are never in a larger cap's training part of the same seed either
    more = {r["i"] for r in select_rows(rows, DataRef(dataset="x", cap=200, holdout=0.05), seed=0)}
    assert not set(held) & more
    # unset, nothing changes: old stages keep their identity and rows
    plain = DataRef(dataset="x")
    assert "cap" not in plain.canonical() and len(select_rows(rows, plain, seed=0)) == 500


class _BaseWeights(TrainerCallback):
    """The frozen (non-LoRA) weights of the model as training starts."""

    def __init__(self):
        self.seen = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.seen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
                     for n, p in model.named_parameters() if "lora_" not in n}


def test_each_adapter_starts_from_a_fresh_base(tmp_path, cache):
    from taxon.models import load_model, resolve_targets
    from taxon.train import train_stage

    reference = {n: p.detach().clone() for n, p in load_model("tiny", device="cpu")[0].named_parameters()}
    lora = {"r": 4, "alpha": 8}
    figures, seen = [], []
    for ds in ("takala/financial_phrasebank", "glue"):
        stage = resolve_targets(StageSpec(objective="sft", steps=2, batch_size=2, max_length=128, lr=1e-2,
                                          data=(DataRef(dataset=ds, cap=30, holdout=0.2),),
                                          lora=lora), "tiny")
        watch = _BaseWeights()
        figures.append(train_stage(stage, "tiny", tmp_path / ds.replace("/", "_"), callbacks=(watch,)))
        seen.append(watch.seen)
    # The second adapter trained after the first in this process, yet its base is the original.
    for weights in seen:
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[n], reference[n]) for n in reference)
    first = tmp_path / "takala_financial_phrasebank"
    assert figures[0]["eval_loss"] > 0 and figures[0]["eval_examples"] == 6
    assert figures[0]["weights_bytes"] == (first / "adapter_model.safetensors").stat().st_size
    assert figures[0]["trainable_params"] < figures[0]["total_params"] / 10


# --- validation prompts: each check passes the right answer and fails a wrong one --------------


def _one(kind: str) -> tuple[validation.ValidationSet, validation.Prompt]:
    by_kind = {"label": "takala/financial_phrasebank", "number": "openai/gsm8k",
               "parses": "salinas-alvarado/sec-filings-ner", "code_asserts": "openai/openai_humaneval"}
    vset = validation.for_dataset(by_kind[kind])
    return vset, next(p for p in vset.prompts if p.check == kind)


@pytest.mark.parametrize("kind, right, wrong", [
    ("label", " positive", " negative"),
    ("number", "3 x 4 = 12\n#### 12", "3 + 4 = 7\n#### 7"),
    ("parses", "Acme Bank, ORG\nJohn Smith, PER", "Acme Bank is an ORG"),
    ("code_asserts", "    return a + b\n", "    return a - b\n"),
])
def test_checks_fail_wrong_answers(kind, right, wrong):
    vset, p = _one(kind)
    assert validation.check(vset, p, right)[0] is True
    passed, why = validation.check(vset, p, wrong)
    assert passed is False and why


def test_check_details():
    vset, p = _one("label")
    assert validation.check(vset, p, "I am not sure") == (False, "no label of ['negative', 'neutral', "
                                                         "'positive'] in the answer")
    ner, q = _one("parses")
    assert validation.check(ner, q, "Acme Bank, ORG") == (False, "parses, but lacks John Smith")
    assert validation.check(ner, q, "Acme Bank, ORG\nJohn Smith, PER\nand more")[0] is False
    assert validation.parse_entities(" none") == []
    number, n = _one("number")
    assert validation.check(number, n, "I cannot say")[0] is False
    code, c = _one("code_asserts")
    assert validation.check(code, c, "    while True: pass\n")[1].startswith("timeout")


def test_bad_validation_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "v.yaml"
    bad.write_text("dataset: fpb\nprompts:\n  - {row: {sentence: x}, check: label, expect: great}\n")
    with pytest.raises(TaxonError, match="label 'great' is not one of"):
        validation.load_set(bad)
    bad.write_text("dataset: fpb\nprompts:\n  - {row: {sentence: x}, check: number}\n")
    with pytest.raises(TaxonError, match="needs `expect`"):
        validation.load_set(bad)


# --- a whole set: train, evaluate, validate, store, report -------------------------------------


def test_set_runs_stores_and_reports(tmp_path, cache):
    from taxon.report.build import build
    from taxon.report.write import markdown
    from taxon.study.run import run_study
    from taxon.study.store import Store

    study = _study(tmp_path)
    store = Store(tmp_path / "results.sqlite")
    run_study(study, store, Console(quiet=True), json_dir=tmp_path / "out" / "json")

    rows = {r["dataset"]: r for r in store.adapters("tiny-sets")}
    assert set(rows) == {"fpb", "sst2", "multi-task"}
    for key, r in rows.items():
        folder = Path(r["folder"])
        assert folder == (tmp_path / "out" / "adapters" / "adapter" / key).resolve()
        assert (folder / "adapter_config.json").is_file()
        assert r["weights_bytes"] == (folder / "adapter_model.safetensors").stat().st_size
        assert r["eval_loss"] > 0 and r["train_seconds"] > 0 and r["trainable_params"] > 0
    assert rows["fpb"]["eval_examples"] == 4 and rows["multi-task"]["eval_examples"] == 8

    # every model of the set (base, two adapters, multi-task) on both datasets' prompts
    checked = store.db.execute("SELECT COUNT(DISTINCT model_key), COUNT(*) FROM validations").fetchone()
    n_prompts = len(validation.for_dataset("fpb").prompts) + len(validation.for_dataset("glue").prompts)
    assert tuple(checked) == (4, 4 * n_prompts)
    events = len(store.events("validate"))
    run_study(study, store, Console(quiet=True))  # rerun: nothing trained, nothing validated again
    assert len(store.events("validate")) == events and len(store.events("train")) == 3

    report = build(store, "tiny-sets")
    (view,) = report.adapter_sets
    assert view.matrix["trained"][0] == "base (untrained)" and view.matrix["tasks"] == ["fpb", "sst2"]
    assert view.matrix["diagonal"] == [None, "fpb", "sst2", None]
    table = view.transfer.set_index("experiment")
    assert table.loc["adapter[fpb]"].iloc[1].startswith("◆")
    assert not table.loc["adapter[fpb]"].iloc[2].startswith("◆")
    assert table.loc["adapter[sst2]"].iloc[2].startswith("◆")
    stored = json.loads(store.db.execute("SELECT metrics FROM results LIMIT 1").fetchone()[0])
    assert "accuracy" in stored
    assert "transfer-set-adapter" in report.figures
    md = markdown(report)
    assert "Adapter set adapter: transfer matrix" in md and "validation prompts passed" in md
    assert view.validation.columns.tolist() == ["model", "fpb", "sst2"]
