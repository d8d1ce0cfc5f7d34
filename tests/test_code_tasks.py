"""The code tasks: HumanEval (`code`) and BigCodeBench (`bigcodebench`, from its fixture) run
through the generation path and the sandbox; reference solutions pass, wrong ones fail, and on
`tiny` every answer runs and fails."""

from __future__ import annotations

import pytest

from taxon.config import parse
from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.sources import load_rows
from taxon.evals import execution
from taxon.evals.evaluate import evaluate_task
from taxon.evals.generation import extract
from taxon.evals.tasks import TaskSpec, get_task
from taxon.study.store import Store


def _rows(task, n):
    return list(load_rows(task.dataset, task.config, task.split))[:n]


def _references(task, rows):
    card = get_card(task.dataset).for_config(task.config)
    return card, [extract(task.extractor, render.as_pair(card, r)[1]) for r in rows]


def test_function_body_keeps_the_body_only():
    text = "    x = 1\n\n    return x\n\n\ndef other():\n    pass\n"
    assert extract("function_body", text) == "    x = 1\n\n    return x\n"
    assert extract("function_body", "    return 1\nprint(f())\n") == "    return 1\n"
    assert extract("function_body", "") == "\n"


def test_pass_at_1_needs_a_program():
    with pytest.raises(Exception, match="program"):
        parse(TaskSpec, {"name": "x", "dataset": "humaneval", "output": "generate",
                         "metrics": ["pass_at_1"], "primary": "pass_at_1"}, "x.yaml")


def test_other_tasks_keep_their_identity():
    assert "program" not in get_task("gsm8k").canonical()
    assert "program" in get_task("code").canonical()


def test_humaneval_references_pass_and_wrong_bodies_fail():
    task = get_task("code")
    rows = _rows(task, 4)
    card, refs = _references(task, rows)
    assert [o.status for o in execution.execute(task, card, rows, refs)] == ["passed"] * 4
    wrong = execution.execute(task, card, rows, ["    return None\n"] * 4)
    assert all(o.status == "failed" for o in wrong), wrong


@pytest.fixture
def with_fixtures(merged_data_dir, monkeypatch):
    monkeypatch.setenv("TAXON_DATA_DIR", str(merged_data_dir))


def test_bigcodebench_runs_its_unittests(with_fixtures):
    task = get_task("bigcodebench")
    rows = _rows(task, 3)
    card, refs = _references(task, rows)
    assert [o.status for o in execution.execute(task, card, rows, refs)] == ["passed"] * 3
    undefined = execution.execute(task, card, rows[:1], ["    return (\n"])
    assert undefined[0].status == "failed" and "SyntaxError" in undefined[0].reason


@pytest.mark.parametrize("name", ["code", "bigcodebench"])
def test_code_task_on_tiny_runs_every_answer_in_the_sandbox(tiny_model, tmp_path, with_fixtures,
                                                            name):
    model, tok = tiny_model
    task = get_task(name).model_copy(update={"max_new_tokens": 48})
    limit = 3 if name == "code" else 2
    r = evaluate_task(model, tok, task, limit=limit, seed=0, batch_size=4)
    assert r.n == limit and len(r.predictions) == limit
    statuses = [p["scores"]["status"] for p in r.predictions]
    if name == "code":  # tiny is random: nothing it writes passes HumanEval's tests
        assert r.metrics["pass_at_1"]["value"] == 0.0
        assert all(s in ("failed", "error", "timeout") for s in statuses)
    assert all(p["scores"]["reason"] for p, s in zip(r.predictions, statuses, strict=True)
               if s != "passed")
    assert r.metrics["pass_at_1"]["value"] == sum(s == "passed" for s in statuses) / limit
    assert r.metrics["settings"]["sandbox"]["audit_hook"] is True
    for p in r.predictions:
        assert not any(s in p["scores"]["output"] for s in task.stop)
    store = Store(tmp_path / "results.sqlite")
    store.add_result("model:tiny", f"{name}-key", r)
    assert len(store.predictions("model:tiny", f"{name}-key")) == limit
    store.close()
