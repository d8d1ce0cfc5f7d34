"""Mirroring to MLflow (file store) and W&B (offline): a tiny study logs its training loss and
its eval metrics to both, with no server and no network."""

from __future__ import annotations

import pytest
from rich.console import Console
from study_fixtures import fresh_cache

from taxon.errors import TaxonError
from taxon.study import tracking
from taxon.study.load import load_study
from taxon.study.run import run_study
from taxon.study.store import Store

STUDY = """
name: tiny-tracking
model: tiny
eval: {tasks: [fpb], limit: 4, batch_size: 4}
experiments:
  - name: sft
    stages: [{objective: sft, data: [{dataset: fpb}], steps: 2, batch_size: 2, max_length: 96}]
"""

VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE",
        "WANDB_PROJECT", "WANDB_DIR")


def test_mlflow_and_wandb_offline_get_loss_and_eval_metrics(tmp_path, monkeypatch, data_dir):
    for var in VARS:  # setup() fills them; undo removes them again
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    report_to = ("mlflow", "wandb")
    tracking.check(report_to)
    tracking.setup(report_to, "tiny-tracking", tmp_path / "results")
    run_study(load_study(path), Store(tmp_path / "r.sqlite"), Console(quiet=True),
              report_to=report_to)

    from mlflow.tracking import MlflowClient

    assert (tmp_path / "results" / "mlruns").is_dir()
    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny-tracking")
    runs = client.search_runs([exp.experiment_id])
    train = [r for r in runs if "loss" in r.data.metrics]
    evals = [r for r in runs if r.data.tags.get("taxon.kind") == "eval"]
    assert len(train) == 1 and len(client.get_metric_history(train[0].info.run_id, "loss")) == 2
    assert len(evals) == 1 and 0 <= evals[0].data.metrics["fpb/macro_f1"] <= 1

    runs_dir = sorted((tmp_path / "results" / "wandb").glob("offline-run-*"))
    assert len(runs_dir) == 2  # the stage's training and its evaluation
    histories = [wandb_history(next(d.glob("run-*.wandb"))) for d in runs_dir]
    losses = [float(h["train/loss"]) for hist in histories for h in hist if "train/loss" in h]
    assert len(losses) == 2 and all(x > 0 for x in losses)
    (f1,) = [float(h["fpb/macro_f1"]) for hist in histories for h in hist if "fpb/macro_f1" in h]
    assert f1 == pytest.approx(evals[0].data.metrics["fpb/macro_f1"])


def wandb_history(path) -> list[dict]:
    """The history rows of an offline W&B run file: protobuf records in LevelDB's log framing
    (32 KiB blocks; each chunk: crc32, length, type = full/first/middle/last) after a 7-byte
    header. wandb 0.31 ships no Python reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, parts, rows = path.read_bytes(), 7, b"", []
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding at a block's end
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(TaxonError, match="--report-to neptune: unknown; use one of mlflow, wandb"):
        tracking.check(("neptune",))
