"""`study run --launcher`: a stage trained by two DDP processes (torchrun, gloo on CPU) is written
once, by the main process, and sees the same examples as a one-process run (the spec's batch is
the global batch)."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from study_fixtures import fresh_cache

from taxon.study.load import load_study
from taxon.study.plan import plan
from taxon.study.run import run_study
from taxon.study.store import Store

STUDY = """
name: tiny-ddp
model: tiny
eval: {tasks: [fpb], limit: 4, batch_size: 4}
experiments:
  - name: sft
    stages: [{objective: sft, data: [{dataset: fpb}], steps: 2, batch_size: 2, max_length: 96}]
"""


def test_stage_under_torchrun_with_two_processes(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    store = Store(tmp_path / "r.sqlite")
    launcher = f"{sys.executable} -m torch.distributed.run --nproc-per-node 2"
    run_study(load_study(path), store, Console(quiet=True), launcher=launcher)
    (stage,) = plan(load_study(path))[0].stages
    figures = json.loads((stage.path / "taxon_stage.json").read_text())["figures"]
    # Both ranks' tokens are counted (the Trainer gathers them); together they are exactly the
    # mixture's 2 steps x 2 examples, as in a one-process run.
    assert figures["tokens"] == figures["mixture"]["fpb:default:train"]["tokens"]
    assert figures["mixture"]["fpb:default:train"]["examples"] == 4
    assert not list(stage.path.parent.glob("*.tmp*"))
    assert [e["key"] for e in store.events("train")] == [stage.id]
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1
