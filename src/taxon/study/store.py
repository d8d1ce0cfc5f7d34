"""The results store: one SQLite file (WAL) with stages, experiments, results and per-example
predictions. Each write is one transaction, so a killed run leaves whole rows or none.

A prediction's `gold` and `pred` are JSON: label indices for multiple choice, answer strings for
generation, null for perplexity windows; `scores` is JSON too (choice log-likelihoods; the raw
generation and per-item metric values; a window's NLL and token count). Stores created before
generation declared gold/pred INTEGER; JSON text reads back the same from those columns (SQLite
keeps '"18"' as text and turns '1' into 1), so old stores keep working without a migration.

Later tables (runs with their environment, resources per stage and per evaluation, the event log)
are only ever added (CREATE TABLE IF NOT EXISTS), so a store written by an older taxon opens and
gains them. `events` is append-only: one row per stage trained or reused and per task evaluated,
so it shows what each run did (and that nothing was trained twice)."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from taxon.errors import TaxonError

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
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, study TEXT NOT NULL, started REAL NOT NULL, finished REAL,
    executor TEXT NOT NULL, environment TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stage_resources (
    stage_id TEXT PRIMARY KEY, run_id TEXT, wall_seconds REAL, train_seconds REAL, tokens INTEGER,
    tokens_per_s REAL, peak_memory_mb REAL, total_params INTEGER, trainable_params INTEGER,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS eval_resources (
    model_key TEXT NOT NULL, eval_key TEXT NOT NULL, run_id TEXT, wall_seconds REAL,
    tokens INTEGER, peak_memory_mb REAL, total_params INTEGER, trainable_params INTEGER,
    created REAL NOT NULL, PRIMARY KEY (model_key, eval_key));
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS watch (
    stage_id TEXT, step INTEGER, domain_loss REAL, general_loss REAL,
    domain_vs_start REAL, general_vs_start REAL, domain_vs_base REAL, general_vs_base REAL,
    verdict TEXT, PRIMARY KEY (stage_id, step));
CREATE TABLE IF NOT EXISTS adapters (
    study TEXT NOT NULL, adapter_set TEXT NOT NULL, dataset TEXT NOT NULL, experiment TEXT NOT NULL,
    stage_id TEXT NOT NULL, folder TEXT, train_loss REAL, eval_loss REAL, train_seconds REAL,
    weights_bytes INTEGER, trainable_params INTEGER, train_examples INTEGER, eval_examples INTEGER,
    created REAL NOT NULL, PRIMARY KEY (study, experiment));
CREATE TABLE IF NOT EXISTS validations (
    model_key TEXT NOT NULL, set_key TEXT NOT NULL, dataset TEXT NOT NULL, idx INTEGER NOT NULL,
    prompt TEXT NOT NULL, answer TEXT NOT NULL, kind TEXT NOT NULL, expect TEXT, passed INTEGER NOT NULL,
    detail TEXT NOT NULL, run_id TEXT, created REAL NOT NULL, PRIMARY KEY (model_key, set_key, idx));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, kind TEXT NOT NULL, key TEXT NOT NULL,
    created REAL NOT NULL);
"""

STAGE_RESOURCES = ("wall_seconds", "train_seconds", "tokens", "tokens_per_s", "peak_memory_mb",
                   "total_params", "trainable_params")
EVAL_RESOURCES = ("wall_seconds", "tokens", "peak_memory_mb", "total_params", "trainable_params")
# Columns added to existing tables after the first release (ALTER TABLE on open): which eval keys
# an experiment's own run asked for, and that run, so a report shows exactly its own results.
ADDED_COLUMNS = {"experiments": (("eval_keys", "TEXT"), ("run_id", "TEXT"))}
LOCK_TIMEOUT_S = 60


def _problem(path: Path, e: sqlite3.Error) -> TaxonError:
    """A store that cannot be used, as one line naming the fix."""
    msg = str(e)
    if "locked" in msg or "busy" in msg:
        fix = (f"another process held it for over {LOCK_TIMEOUT_S} s; wait for it to finish or "
               "use another --store")
    elif "readonly" in msg or "read-only" in msg:
        fix = "it is read-only; make it writable or pass another --store"
    elif "not a database" in msg or "malformed" in msg:
        fix = "it is not a taxon results store; pass another --store (a new file is created)"
    else:
        fix = "pass another --store"
    return TaxonError(f"results store {path}: {msg}; {fix}")


def _from_json(value):
    """A gold/pred cell: JSON text, or a number SQLite converted in an INTEGER column."""
    return value if value is None or isinstance(value, int | float) else json.loads(value)


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise TaxonError(f"results store {self.path} is a folder; pass a file path such as "
                             f"{self.path / 'results.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TaxonError(f"cannot create the folder of results store {self.path} ({e.strerror}); "
                             "pass another --store") from e
        try:
            self.db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S)
            self.db.row_factory = sqlite3.Row
            self._use_wal()
            self._create_and_migrate()
        except sqlite3.Error as e:
            raise _problem(self.path, e) from e

    def _use_wal(self) -> None:
        """Switch to WAL. Turning a new file into WAL needs it alone, and SQLite answers "locked"
        at once there rather than waiting, so runs that open one new store together retry."""
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _create_and_migrate(self) -> None:
        """Tables and later columns, under the write lock: runs that open one new store at the
        same moment would otherwise each see a column missing and each add it (the second fails
        with "duplicate column name")."""
        self.db.execute("BEGIN IMMEDIATE")  # DDL opens no implicit transaction: this one holds it all
        with self.db:  # commit, or roll back on any error
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            for table, columns in ADDED_COLUMNS.items():
                have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _write(self):
        """One transaction; a store problem (locked past the timeout, read-only) is one line."""
        try:
            with self.db:
                yield
        except sqlite3.OperationalError as e:
            raise _problem(self.path, e) from e

    def add_stage(self, stage_id: str, parent: str, spec: dict, path: str, figures: dict,
                  run_id: str | None = None, trained: bool = False) -> None:
        """The stage row, its resources (from the training figures) and a `train` or `reuse`
        event, in one transaction. A reused stage keeps the resources of the run that trained it."""
        now = time.time()
        with self._write():
            self.db.execute(
                "INSERT OR REPLACE INTO stages VALUES (?,?,?,?,?,?)",
                (stage_id, parent, json.dumps(spec), path, json.dumps(figures), now),
            )
            self.db.execute(
                f"INSERT OR {'REPLACE' if trained else 'IGNORE'} INTO stage_resources VALUES "
                "(?,?,?,?,?,?,?,?,?,?)",
                (stage_id, run_id if trained else None, *(figures.get(k) for k in STAGE_RESOURCES),
                 now),
            )
            self.db.execute("INSERT INTO events (run_id, kind, key, created) VALUES (?,?,?,?)",
                            (run_id, "train" if trained else "reuse", stage_id, now))
            self.db.executemany(
                "INSERT OR REPLACE INTO watch VALUES (?,?,?,?,?,?,?,?,?)",
                [(stage_id, r["step"], r["domain"], r["general"], r["domain_vs_start"],
                  r["general_vs_start"], r["domain_vs_base"], r["general_vs_base"], r["verdict"])
                 for r in (figures.get("watch") or {}).get("log", [])])

    def start_run(self, run_id: str, study: str, executor: str, environment: dict) -> None:
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?)",
                            (run_id, study, time.time(), None, executor, json.dumps(environment)))

    def finish_run(self, run_id: str) -> None:
        with self._write():
            self.db.execute("UPDATE runs SET finished=? WHERE id=?", (time.time(), run_id))

    def add_study(self, name: str, spec: dict) -> None:
        """The study file as last run (its research questions, for `taxon report`)."""
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO studies VALUES (?,?,?)",
                            (name, json.dumps(spec), time.time()))

    def study_spec(self, name: str) -> dict | None:
        row = self.db.execute("SELECT spec FROM studies WHERE name=?", (name,)).fetchone()
        return None if row is None else json.loads(row["spec"])

    def study_names(self) -> list[str]:
        q = "SELECT DISTINCT study FROM experiments ORDER BY created"
        return [r["study"] for r in self.db.execute(q)]

    def runs(self) -> list[dict]:
        return [{**dict(r), "environment": json.loads(r["environment"])}
                for r in self.db.execute("SELECT * FROM runs ORDER BY started")]

    def stage_resources(self, stage_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM stage_resources WHERE stage_id=?",
                              (stage_id,)).fetchone()
        return None if row is None else dict(row)

    def eval_resources(self, model_key: str) -> list[dict]:
        q = "SELECT * FROM eval_resources WHERE model_key=? ORDER BY created"
        return [dict(r) for r in self.db.execute(q, (model_key,))]

    def events(self, kind: str | None = None) -> list[dict]:
        q = "SELECT * FROM events" + (" WHERE kind=?" if kind else "") + " ORDER BY seq"
        return [dict(r) for r in self.db.execute(q, (kind,) if kind else ())]

    def watch_log(self, stage_id: str) -> list[dict]:
        """A watched stage's points (step 0 and every N): losses, changes against the stage's
        start and the base model (fractions when the watch is relative), verdict."""
        q = "SELECT * FROM watch WHERE stage_id=? ORDER BY step"
        return [dict(r) for r in self.db.execute(q, (stage_id,))]

    def stage(self, stage_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM stages WHERE id=?", (stage_id,)).fetchone()
        return None if row is None else {**dict(row), "figures": json.loads(row["figures"])}

    def add_experiment(self, study: str, name: str, model: str, model_key: str,
                       stages: list[str], spec: dict, eval_keys: list[str] | None = None,
                       run_id: str | None = None) -> None:
        """The experiment's row, written last: `eval_keys` are the evaluations its run asked for
        (its report shows those results and no others), `run_id` the run that recorded it."""
        with self._write():
            self.db.execute(
                "INSERT OR REPLACE INTO experiments (study, name, model, model_key, stages, spec, "
                "created, eval_keys, run_id) VALUES (?,?,?,?,?,?,?,?,?)",
                (study, name, model, model_key, json.dumps(stages), json.dumps(spec), time.time(),
                 None if eval_keys is None else json.dumps(sorted(eval_keys)), run_id),
            )

    def experiments(self, study: str | None = None) -> list[dict]:
        q = "SELECT * FROM experiments" + (" WHERE study=?" if study else "") + " ORDER BY created"
        return [dict(r) for r in self.db.execute(q, (study,) if study else ())]

    def experiment_results(self, exp: dict) -> list[dict]:
        """The results an experiment's own run recorded: its model, and only the evaluations
        (task, shots, limit, seed, precision) that run asked for."""
        rows = self.results(exp["model_key"])
        if exp.get("eval_keys") is None:  # a row written before experiments kept their eval keys
            return rows
        wanted = set(json.loads(exp["eval_keys"]))
        return [r for r in rows if r["eval_key"] in wanted]

    def run(self, run_id: str | None) -> dict | None:
        row = None if run_id is None else self.db.execute("SELECT * FROM runs WHERE id=?",
                                                          (run_id,)).fetchone()
        return None if row is None else {**dict(row), "environment": json.loads(row["environment"])}

    def result_run(self, model_key: str, eval_key: str) -> dict | None:
        """The run that evaluated this result (its environment: machine, packages)."""
        row = self.db.execute("SELECT run_id FROM eval_resources WHERE model_key=? AND eval_key=?",
                              (model_key, eval_key)).fetchone()
        return None if row is None else self.run(row["run_id"])

    def has_result(self, model_key: str, eval_key: str) -> bool:
        q = "SELECT 1 FROM results WHERE model_key=? AND eval_key=?"
        return self.db.execute(q, (model_key, eval_key)).fetchone() is not None

    def add_result(self, model_key: str, eval_key: str, result, resources: dict | None = None,
                   run_id: str | None = None) -> None:
        """A task's metrics, all its per-example predictions, its resources and an `evaluate`
        event, in one transaction."""
        resources = resources or {"wall_seconds": result.seconds}
        with self._write():
            self.db.execute(
                "INSERT OR REPLACE INTO eval_resources VALUES (?,?,?,?,?,?,?,?,?)",
                (model_key, eval_key, run_id, *(resources.get(k) for k in EVAL_RESOURCES),
                 time.time()),
            )
            self.db.execute("INSERT INTO events (run_id, kind, key, created) VALUES (?,?,?,?)",
                            (run_id, "evaluate", f"{model_key}/{eval_key}", time.time()))
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

    ADAPTER_COLUMNS = ("study", "adapter_set", "dataset", "experiment", "stage_id", "folder",
                       "train_loss", "eval_loss", "train_seconds", "weights_bytes",
                       "trainable_params", "train_examples", "eval_examples")

    def add_adapter(self, row: dict) -> None:
        """One adapter of an adapter set: its stage, peft folder and figures."""
        with self._write():
            self.db.execute(
                f"INSERT OR REPLACE INTO adapters ({', '.join(self.ADAPTER_COLUMNS)}, created) "
                f"VALUES ({', '.join('?' * (len(self.ADAPTER_COLUMNS) + 1))})",
                (*(row.get(k) for k in self.ADAPTER_COLUMNS), time.time()))

    def adapters(self, study: str | None = None) -> list[dict]:
        q = "SELECT * FROM adapters" + (" WHERE study=?" if study else "") + " ORDER BY created"
        return [dict(r) for r in self.db.execute(q, (study,) if study else ())]

    def has_validation(self, model_key: str, set_key: str) -> bool:
        q = "SELECT 1 FROM validations WHERE model_key=? AND set_key=?"
        return self.db.execute(q, (model_key, set_key)).fetchone() is not None

    def add_validation(self, model_key: str, set_key: str, dataset: str, rows: list[dict],
                       run_id: str | None = None) -> None:
        """A model's answers to one dataset's validation prompts and their checks, in one
        transaction, and a `validate` event."""
        now = time.time()
        with self._write():
            self.db.execute("DELETE FROM validations WHERE model_key=? AND set_key=?", (model_key, set_key))
            self.db.executemany(
                "INSERT INTO validations VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(model_key, set_key, dataset, r["idx"], r["prompt"], r["answer"], r["check"],
                  json.dumps(r["expect"]), int(r["passed"]), r["detail"], run_id, now) for r in rows])
            self.db.execute("INSERT INTO events (run_id, kind, key, created) VALUES (?,?,?,?)",
                            (run_id, "validate", f"{model_key}/{set_key}", now))

    def validations(self, model_key: str) -> list[dict]:
        q = "SELECT * FROM validations WHERE model_key=? ORDER BY dataset, idx"
        return [{**dict(r), "passed": bool(r["passed"]), "expect": json.loads(r["expect"])}
                for r in self.db.execute(q, (model_key,))]
