"""The generation and perplexity tasks on `tiny`: perplexity equals a direct computation from
logits, each new task runs end to end and its predictions are stored, the runner and the table
handle every output type, and an older store (gold/pred INTEGER) still reads and writes."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from taxon.config import EvalSpec
from taxon.data.cards import get_card
from taxon.data.sources import load_rows
from taxon.evals.evaluate import evaluate_task, gold_answer, perplexity_windows
from taxon.evals.tasks import get_task
from taxon.identity import model_identity
from taxon.report.tables import results_table
from taxon.study.plan import eval_key
from taxon.study.run import run_single
from taxon.study.store import Store

NEW_TASKS = ["gsm8k", "finqa10k", "eval_general", "eval_domain"]


def direct_nll(model, window: list[int]) -> float:
    """Summed NLL of window[1:] given the tokens before each, from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window])).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:]),
                                                   reduction="sum"))


def test_windows_are_documents_joined_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    texts = ["Profit rose.", "", "  ", "Sales fell by 5 %."]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Profit rose.", "Sales fell by 5 %.")]
    flat = ids[0] + [tok.eos_token_id] + ids[1] + [tok.eos_token_id]
    for size in (3, 4, 5):
        windows = perplexity_windows(tok, texts, size)
        # Nothing overlaps; only a last window of one token (which nothing predicts) is dropped.
        kept = flat if len(flat) % size != 1 else flat[:-1]
        assert [t for w in windows for t in w] == kept, size
        assert all(len(w) == size for w in windows[:-1]) and 2 <= len(windows[-1]) <= size
    assert perplexity_windows(tok, texts, 1000) == [flat]


def test_perplexity_equals_direct_computation(tiny_model):
    model, tok = tiny_model
    task = get_task("eval_domain").model_copy(update={"max_length": 48})
    r = evaluate_task(model, tok, task, limit=5, seed=1, batch_size=16)
    card = get_card(task.dataset)
    texts = [card.templates.text.replace("{{ sentence }}", row["sentence"])
             for row in load_rows(task.dataset, task.config, task.split)]
    windows = perplexity_windows(tok, texts, 48)
    assert r.n == 5 and r.n_total == len(windows) > 5
    total_nll, total_tokens = 0.0, 0
    for p in r.predictions:
        w = windows[p["idx"]]
        assert p["scores"]["tokens"] == len(w) - 1
        assert p["scores"]["nll"] == pytest.approx(direct_nll(model, w), rel=1e-5)
        total_nll += p["scores"]["nll"]
        total_tokens += len(w) - 1
    loss = total_nll / total_tokens
    assert r.metrics["loss"]["value"] == pytest.approx(loss)
    assert r.metrics["perplexity"]["value"] == pytest.approx(math.exp(loss))
    assert r.metrics["tokens"] == total_tokens
    # A random model over a ~49k vocabulary: loss near ln(vocab).
    assert abs(loss - math.log(len(tok))) < 1.5


def test_gold_answers(tiny_tokenizer):
    gsm = get_task("gsm8k")
    row = {"question": "q", "answer": "2 + 2 = <<2+2=4>>4\nSo 1,004 in all.\n#### 1,004"}
    assert gold_answer(gsm, get_card("gsm8k"), row) == "1004"
    fin = get_task("finqa10k")
    row = {"question": "q", "answer": "NVIDIA invented the GPU in 1999.", "context": "c",
           "ticker": "NVDA", "filing": "2023_10K"}
    assert gold_answer(fin, get_card(fin.dataset), row) == "NVIDIA invented the GPU in 1999."


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("store") / "results.sqlite")
    yield s
    s.close()


@pytest.mark.parametrize("name", NEW_TASKS)
def test_new_task_end_to_end(tiny_model, store, name):
    model, tok = tiny_model
    task = get_task(name)
    spec = EvalSpec(tasks=(name,), limit=3, batch_size=4)
    r = evaluate_task(model, tok, task, limit=3, seed=0, batch_size=4)
    assert r.n == 3 and r.n_total > 3 and len(r.predictions) == 3
    for metric in task.all_metrics:
        m = r.metrics[metric]
        assert m["low"] <= m["value"] <= m["high"], (metric, m)
    key = eval_key(task, spec)
    store.add_result("model:tiny", key, r)
    stored = store.predictions("model:tiny", key)
    assert [p["idx"] for p in stored] == sorted(p["idx"] for p in r.predictions)
    if task.output == "generate":
        assert r.shots == task.shots
        for p in stored:
            assert isinstance(p["gold"], str) and p["gold"] and isinstance(p["pred"], str)
            assert isinstance(p["scores"]["output"], str)
            assert not any(s in p["scores"]["output"] for s in task.stop)
        if name == "gsm8k":  # 5 demonstrations do not fit tiny's 1,024 positions with 256 new tokens
            assert r.metrics["settings"]["truncated_prompts"] == 3
            assert all(p["gold"].lstrip("-").replace(".", "").isdigit() for p in stored)
    else:
        assert all(p["gold"] is None and p["scores"]["tokens"] > 0 for p in stored)
        assert r.metrics["perplexity"]["value"] > 1


def test_runner_and_table_show_each_tasks_metrics(tiny_model, tmp_path, monkeypatch):
    import taxon.study.work as work

    monkeypatch.setattr(work, "load_model", lambda location: tiny_model)
    monkeypatch.setattr(work, "_loaded", None)
    spec = EvalSpec(tasks=("fpb", "finqa10k", "eval_domain"), limit=3, batch_size=4)
    exp, s = run_single("eval", "tiny", "tiny", (), spec, tmp_path / "results.sqlite", Console(quiet=True))
    assert exp.model_key == model_identity("tiny") and exp.model_key.startswith("config:")
    assert len(s.results(exp.model_key)) == 3
    table = results_table(s, "eval")
    for heading in ("**Multiple choice**", "**Generation**", "**Perplexity**"):
        assert heading in table
    headers = [line for line in table.splitlines() if line.startswith("| experiment")]
    assert len(headers) == 3
    assert "macro_f1" in headers[0] and "bleu_4" not in headers[0]
    assert all(m in headers[1] for m in ("exact_match", "token_f1", "rouge_l", "bleu_1", "bleu_4"))
    assert "perplexity" in headers[2] and "tokens" in headers[2] and "accuracy" not in headers[2]
    assert all("% of GPT-4" in h for h in headers)
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2].strip() for r in rows] == ["fpb", "finqa10k", "eval_domain"]
    assert "3 of 970" in rows[0] and "GPT-4 weighted_f1 0.780" in rows[0]


def test_old_store_schema_keeps_working(tmp_path):
    """A store made before generation (gold/pred INTEGER) reads old rows and takes new ones."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE predictions (
            model_key TEXT NOT NULL, eval_key TEXT NOT NULL, idx INTEGER NOT NULL,
            gold INTEGER NOT NULL, pred INTEGER NOT NULL, scores TEXT NOT NULL,
            PRIMARY KEY (model_key, eval_key, idx));
        INSERT INTO predictions VALUES ('m', 'old', 0, 2, 1, '[-1.0, -2.0, -0.5]');
    """)
    db.commit()
    db.close()
    s = Store(path)
    assert s.predictions("m", "old") == [{"idx": 0, "gold": 2, "pred": 1, "scores": [-1.0, -2.0, -0.5]}]

    class R:
        task, shots, n, n_total, seconds, metrics = "gsm8k", 5, 3, 3, 0.0, {}
        predictions = [{"idx": 0, "gold": "18", "pred": "18.0", "scores": {"output": "18.0"}},
                       {"idx": 1, "gold": 1, "pred": 0, "scores": [0.0]},
                       {"idx": 2, "gold": None, "pred": None, "scores": {"nll": 1.5, "tokens": 3}}]

    s.add_result("m", "new", R)
    got = s.predictions("m", "new")
    assert [(p["gold"], p["pred"]) for p in got] == [("18", "18.0"), (1, 0), (None, None)]
    assert got[0]["scores"] == {"output": "18.0"}
    fresh = Store(tmp_path / "new.sqlite")
    fresh.add_result("m", "new", R)
    assert fresh.predictions("m", "new") == got
    assert json.loads(fresh.db.execute("SELECT gold FROM predictions WHERE idx=0").fetchone()[0]) == "18"


def test_perplexity_windows_fit_the_models_context(tiny_model):
    model, tok = tiny_model
    task = get_task("eval_domain").model_copy(update={"max_length": 4096})
    r = evaluate_task(model, tok, task, limit=1)
    assert r.metrics["settings"]["max_length"] == model.config.max_position_embeddings == 1024
    assert r.predictions[0]["scores"]["tokens"] == 1023


OPEN_AT = """import sys, time
from taxon.study.store import Store
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
Store(sys.argv[1]).close()
"""


def test_many_processes_open_a_new_store_at_once(tmp_path):
    """Runs that start together on one new store all open it: creating the tables and adding the
    later columns happen under one write lock, so no two add the same column."""
    for attempt in range(4):
        path, start = tmp_path / f"shared{attempt}.sqlite", time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(path), str(start)],
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, errors
        db = sqlite3.connect(path)
        assert {"eval_keys", "run_id"} <= {r[1] for r in db.execute("PRAGMA table_info(experiments)")}
        db.close()
