"""A small study on `tiny`: shared stages train once, a rerun trains and evaluates nothing new,
and every stored number can be traced to per-example predictions."""

from __future__ import annotations

import numpy as np
import yaml
from rich.console import Console
from sklearn.metrics import f1_score
from study_fixtures import fresh_cache

from taxon.report.tables import results_table
from taxon.study.load import load_study
from taxon.study.plan import eval_key, plan
from taxon.study.run import run_study
from taxon.study.store import Store

STUDY = """
name: tiny-study
model: tiny
seed: 3
eval: {tasks: [fpb, sst2], limit: 12, batch_size: 4}
x-sft: &sft
  objective: sft
  data: [{dataset: takala/financial_phrasebank}]
  steps: 2
  batch_size: 2
  max_length: 96
experiments:
  - name: base
  - name: sft
    stages: [*sft]
  - name: sft-then-sft
    stages: [*sft, {objective: sft, data: [{dataset: tfns}], steps: 1, batch_size: 2}]
"""


def test_study_shares_stages_and_resumes(tmp_path, monkeypatch, data_dir):
    from taxon.models import resolve

    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    # The fresh cache finds the session's models: nothing is rebuilt or converted (0.5 GB) here.
    assert resolve("tiny").source == resolve("smollm2-135m").source == "cache"

    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    study = load_study(path)
    assert study.experiments[1].stages[0].seed == 3  # the study's seed flows into stages
    experiments = plan(study)
    assert experiments[1].stages[0].id == experiments[2].stages[0].id  # shared first stage
    assert len({s.id for e in experiments for s in e.stages}) == 2

    store = Store(tmp_path / "results.sqlite")
    run_study(study, store, Console(quiet=True))
    stages = store.db.execute("SELECT id FROM stages").fetchall()
    assert len(stages) == 2
    first_mtime = experiments[1].stages[0].path.stat().st_mtime
    n_results = store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert n_results == 3 * 2

    run_study(study, store, Console(quiet=True))  # second run: nothing new
    assert experiments[1].stages[0].path.stat().st_mtime == first_mtime
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == n_results

    # Traceability: the stored macro-F1 is recomputed from the stored predictions.
    from taxon.evals.tasks import get_task

    task = get_task("fpb")
    key = experiments[1].model_key
    preds = store.predictions(key, eval_key(task, study.eval))
    assert len(preds) == 12
    stored = next(r for r in store.results(key) if r["task"] == "fpb")["metrics"]
    recomputed = f1_score([p["gold"] for p in preds], [p["pred"] for p in preds],
                          labels=[0, 1, 2], average="macro", zero_division=0)
    assert np.isclose(stored["macro_f1"]["value"], recomputed)
    assert all(p["pred"] == int(np.argmax(p["scores"])) for p in preds)

    table = results_table(store, "tiny-study")
    assert table.count("| sft-then-sft |") == 2
    assert "12 of 970" in table and "GPT-4 weighted_f1 0.780" in table


def test_bad_study_file_is_one_clear_error(tmp_path):
    import pytest

    from taxon.errors import TaxonError

    bad = yaml.safe_load(STUDY)
    bad["experiments"][1]["stages"] = [{"objective": "sft", "data": [
        {"dataset": "fpb", "rate": 0.7}, {"dataset": "tfns", "rate": 0.7}]}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(TaxonError, match=r"bad.yaml: field 'experiments.1.stages.0': .*sum to 1.4"):
        load_study(path)
