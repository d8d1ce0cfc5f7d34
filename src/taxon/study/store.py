"""The results store: one SQLite file (WAL) with stages, experiments, results and per-example
predictions. Each write is one transaction, so a killed run leaves whole rows or none.

A prediction's `gold` and `pred` are JSON: label indices for multiple choice, answer strings for
generation, null for perplexity windows; `scores` is JSON too (choice log-likelihoods; the raw
generation and per-item metric values; a window's NLL and token count). Stores created before
generation declared gold/pred INTEGER; JSON text reads back the same from those columns (SQLite
keeps '"18"' as text and turns '1' into 1), so old stores keep working without a migration."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    id TEXT PRIMARY KEY, parent TEXT NOT NULL, spec TEXT NOT NULL, path TEXT NOT NULL,
    figures TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    study TEXT NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL, model_key TEXT NOT NULL,
    stages TEXT NOT NULL, spec TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (study, name));
CREATE TABLE IF NOT EXISTS results (
    model_key TEXT NOT NULL, eval_key TEXT NOT NULL, task TEXT NOT NULL, shots INTEGER NOT NULL,
    n INTEGER NOT NULL, n_total INTEGER NOT NULL, metrics TEXT NOT NULL, seconds REAL NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (model_key, eval_key));
CREATE TABLE IF NOT EXISTS predictions (
    model_key TEXT NOT NULL, eval_key TEXT NOT NULL, idx INTEGER NOT NULL, gold TEXT NOT NULL,
    pred TEXT NOT NULL, scores TEXT NOT NULL, PRIMARY KEY (model_key, eval_key, idx));
"""


def _from_json(value):
    """A gold/pred cell: JSON text, or a number SQLite converted in an INTEGER column."""
    return value if value is None or isinstance(value, int | float) else json.loads(value)


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add_stage(self, stage_id: str, parent: str, spec: dict, path: str, figures: dict) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO stages VALUES (?,?,?,?,?,?)",
                (stage_id, parent, json.dumps(spec), path, json.dumps(figures), time.time()),
            )

    def stage(self, stage_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM stages WHERE id=?", (stage_id,)).fetchone()
        return None if row is None else {**dict(row), "figures": json.loads(row["figures"])}

    def add_experiment(self, study: str, name: str, model: str, model_key: str,
                       stages: list[str], spec: dict) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO experiments VALUES (?,?,?,?,?,?,?)",
                (study, name, model, model_key, json.dumps(stages), json.dumps(spec), time.time()),
            )

    def experiments(self, study: str | None = None) -> list[dict]:
        q = "SELECT * FROM experiments" + (" WHERE study=?" if study else "") + " ORDER BY created"
        return [dict(r) for r in self.db.execute(q, (study,) if study else ())]

    def has_result(self, model_key: str, eval_key: str) -> bool:
        q = "SELECT 1 FROM results WHERE model_key=? AND eval_key=?"
        return self.db.execute(q, (model_key, eval_key)).fetchone() is not None

    def add_result(self, model_key: str, eval_key: str, result) -> None:
        """A task's metrics and all its per-example predictions, in one transaction."""
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                (model_key, eval_key, result.task, result.shots, result.n, result.n_total,
                 json.dumps(result.metrics), result.seconds, time.time()),
            )
            self.db.execute("DELETE FROM predictions WHERE model_key=? AND eval_key=?",
                            (model_key, eval_key))
            self.db.executemany(
                "INSERT INTO predictions VALUES (?,?,?,?,?,?)",
                [(model_key, eval_key, p["idx"], json.dumps(p["gold"]), json.dumps(p["pred"]),
                  json.dumps(p["scores"]))
                 for p in result.predictions],
            )

    def results(self, model_key: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM results WHERE model_key=? ORDER BY created",
                               (model_key,))
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]

    def predictions(self, model_key: str, eval_key: str) -> list[dict]:
        q = "SELECT idx, gold, pred, scores FROM predictions WHERE model_key=? AND eval_key=?"
        return [{"idx": r["idx"], "gold": _from_json(r["gold"]), "pred": _from_json(r["pred"]),
                 "scores": json.loads(r["scores"])}
                for r in self.db.execute(q + " ORDER BY idx", (model_key, eval_key))]
