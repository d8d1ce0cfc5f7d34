"""Shared by the study resume/concurrency/executor tests: a small study on `tiny`, a fresh stage
cache per run, and a snapshot of a store's contents without timestamps, durations or run ids."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

STUDY = """
name: tiny-resume
model: tiny
seed: 5
eval: {tasks: [fpb], limit: 8, batch_size: 4}
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
    stages: [*sft, {objective: sft, data: [{dataset: tfns}], steps: 2, batch_size: 2, max_length: 96}]
"""

# Figures that measure time or memory rather than what was computed.
VOLATILE = {"tokens_per_s", "items_per_s", "train_seconds", "train_cpu_seconds", "wall_seconds",
            "peak_memory_mb", "seconds", "created", "run_id"}


def fresh_cache(root: Path) -> Path:
    """An empty stage cache with every model of the session's cache linked in. Models are built or
    converted once per session, not per test: a declared model's folder is named by its config's
    digest (not its alias), and a converted smollm2 weighs 0.5 GB; converting it per test once
    filled CI's disk."""
    from taxon.models import prepare
    from taxon.settings import cache_dir

    prepare("tiny")  # built with smollm2's tokenizer, so smollm2 is converted too
    (root / "models").mkdir(parents=True, exist_ok=True)
    for model in (cache_dir() / "models").iterdir():
        if ".tmp" not in model.name:  # another worker's build in progress
            (root / "models" / model.name).symlink_to(model.resolve())
    return root


def cli(args: list[str], cache: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "TAXON_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-m", "taxon.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _drop_volatile(v):
    """Timings and memory at any depth (e.g. a result's metrics.efficiency)."""
    if isinstance(v, dict):
        return {a: _drop_volatile(b) for a, b in v.items() if a not in VOLATILE}
    return v


def _clean(row: dict, cache: Path) -> dict:
    out = {}
    for k, v in row.items():
        if k in VOLATILE:
            continue
        if isinstance(v, str) and v.startswith(("{", "[")):
            v = json.loads(v)
            v = _drop_volatile(v)
        if isinstance(v, str):
            v = v.replace(str(cache), "<cache>")
        out[k] = v
    return out


def snapshot(store_path: Path, cache: Path) -> dict:
    """Every table's rows (order-free) but `runs` and `events`, minus volatile columns."""
    db = sqlite3.connect(store_path)
    db.row_factory = sqlite3.Row
    out = {}
    for table in ("stages", "experiments", "results", "predictions", "stage_resources",
                  "eval_resources"):
        rows = [_clean(dict(r), cache) for r in db.execute(f"SELECT * FROM {table}")]
        out[table] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    db.close()
    return out


def trainings(store_path: Path) -> list[str]:
    db = sqlite3.connect(store_path)
    keys = [k for (k,) in db.execute("SELECT key FROM events WHERE kind='train'")]
    db.close()
    return keys
