"""A study killed (SIGKILL) at random points and resumed, and two concurrent runs on one store,
end with the same store contents as one uninterrupted run; no stage is trained twice."""

from __future__ import annotations

import random
import signal
import time

import pytest
from rich.console import Console
from study_fixtures import STUDY, cli, fresh_cache, snapshot, trainings

from taxon.study.load import load_study
from taxon.study.plan import plan
from taxon.study.run import clear_incomplete, run_study
from taxon.study.store import Store


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted run, in this process: (study file, store snapshot)."""
    root = tmp_path_factory.mktemp("reference")
    cache = fresh_cache(root / "cache")
    path = root / "study.yaml"
    path.write_text(STUDY)
    mp = pytest.MonkeyPatch()
    mp.setenv("TAXON_CACHE_DIR", str(cache))
    try:
        store = Store(root / "ref.sqlite")
        run_study(load_study(path), store, Console(quiet=True), json_dir=root / "json")
        store.close()
    finally:
        mp.undo()
    snap = snapshot(root / "ref.sqlite", cache)
    assert len(snap["stages"]) == 2 and len(snap["experiments"]) == 3
    assert len(snap["results"]) == 3 and len(snap["predictions"]) == 3 * 8
    return path, snap, root


def test_reference_run_records_resources_environment_and_json(reference):
    import json

    _, snap, root = reference
    store = Store(root / "ref.sqlite")
    (run,) = store.runs()
    env = run["environment"]
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["python"]
    assert env["device"]["type"] in ("cpu", "cuda") and run["finished"] is not None
    assert len(trainings(root / "ref.sqlite")) == 2
    for r in snap["stage_resources"]:
        assert r["tokens"] > 0 and 0 < r["trainable_params"] < r["total_params"]
    for r in store.db.execute("SELECT * FROM eval_resources"):
        assert r["tokens"] > 0 and r["wall_seconds"] > 0 and r["total_params"] > 0
    files = sorted(p.name for p in (root / "json").iterdir())
    assert files == ["base.json", "sft-then-sft.json", "sft.json"]
    record = json.loads((root / "json" / "sft-then-sft.json").read_text())
    assert set(record) == {"experiment_id", "timestamp", "model", "training", "evaluation",
                           "resources", "notes"}
    assert len(record["training"]["stages"]) == 2
    assert record["evaluation"]["fpb"]["n"] == 8
    assert record["resources"]["training"]["tokens"] == sum(
        s["tokens"] for s in record["resources"]["training"]["stages"])


def _progress(store) -> int:
    """Jobs whose outcome is stored: stages plus results."""
    import sqlite3

    if not store.is_file():
        return 0
    db = sqlite3.connect(store)
    try:
        return sum(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("stages", "results"))
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    finally:
        db.close()


def test_killed_at_random_points_then_resumed(reference, tmp_path, monkeypatch):
    path, expected, _ = reference
    cache = fresh_cache(tmp_path / "cache")
    monkeypatch.setenv("TAXON_CACHE_DIR", str(cache))
    store = tmp_path / "killed.sqlite"
    rng = random.Random(20261122)
    kills = 0
    for i in range(3):
        proc = cli(["study", "run", str(path), "--store", str(store)], cache, tmp_path)
        # Kill number i comes a random moment after the i-th of the study's 5 jobs is stored, so
        # the kills spread over the study whatever the machine's speed, and each run progresses.
        while proc.poll() is None and _progress(store) <= i:
            time.sleep(0.05)
        deadline = time.time() + rng.uniform(0, 4)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the study finished before it could be killed; the delays are too long"
    # A half-written checkpoint of the second stage, as a killed writer leaves one, must be redone.
    second = plan(load_study(path))[2].stages[1]
    if not (second.path / "taxon_stage.json").is_file():
        (second.path.with_name(second.id + ".tmp424242")).mkdir(parents=True)
        second.path.mkdir(parents=True, exist_ok=True)
        (second.path / "config.json").write_text("{}")
    proc = cli(["study", "run", str(path), "--store", str(store)], cache, tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert snapshot(store, cache) == expected
    assert not list(second.path.parent.glob("*.tmp*"))
    assert sorted(set(trainings(store))) == sorted(s["id"] for s in expected["stages"])


def test_two_concurrent_runs_train_each_stage_once(reference, tmp_path):
    path, expected, _ = reference
    cache = fresh_cache(tmp_path / "cache")
    store = tmp_path / "shared.sqlite"
    procs = [cli(["study", "run", str(path), "--store", str(store)], cache, tmp_path)
             for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    assert sorted(trainings(store)) == sorted(s["id"] for s in expected["stages"])
    assert snapshot(store, cache) == expected


def test_clear_incomplete_removes_temp_and_unfinished_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXON_CACHE_DIR", str(tmp_path))
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    stage = plan(load_study(path))[1].stages[0]
    (stage.path.with_name(stage.id + ".tmp1")).mkdir(parents=True)
    stage.path.mkdir()
    assert {p.name for p in clear_incomplete(stage)} == {stage.id, stage.id + ".tmp1"}
    assert not stage.path.parent.exists() or not list(stage.path.parent.iterdir())
    stage.path.mkdir()
    (stage.path / "taxon_stage.json").write_text("{}")
    assert clear_incomplete(stage) == [] and stage.path.is_dir()  # a complete one stays


def test_local_workers_run_the_graph_in_parallel(reference, tmp_path, monkeypatch):
    from taxon.study import executors

    path, expected, _ = reference
    cache = fresh_cache(tmp_path / "cache")
    monkeypatch.setenv("TAXON_CACHE_DIR", str(cache))
    store = Store(tmp_path / "workers.sqlite")
    run_study(load_study(path), store, Console(quiet=True), executor=executors.make("local", 2))
    assert store.runs()[0]["executor"] == "local"
    store.close()
    assert sorted(trainings(tmp_path / "workers.sqlite")) == sorted(s["id"] for s in expected["stages"])
    assert snapshot(tmp_path / "workers.sqlite", cache) == expected


def test_ray_executor_on_a_local_cluster(reference, tmp_path, monkeypatch):
    from taxon.study import executors

    path, expected, _ = reference
    cache = fresh_cache(tmp_path / "cache")
    monkeypatch.setenv("TAXON_CACHE_DIR", str(cache))
    import shutil
    import tempfile

    # Ray's socket paths must fit in 107 bytes: pytest's tmp_path is too deep.
    ray_tmp = tempfile.mkdtemp(prefix="taxon-ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    store = Store(tmp_path / "ray.sqlite")
    ex = executors.make("ray", 2)
    assert ex.ray.cluster_resources()["CPU"] == 2 and ex.gpus == 0
    run_study(load_study(path), store, Console(quiet=True), executor=ex)
    assert not ex.ray.is_initialized()  # the run shuts its cluster down
    shutil.rmtree(ray_tmp, ignore_errors=True)
    store.close()
    assert sorted(trainings(tmp_path / "ray.sqlite")) == sorted(s["id"] for s in expected["stages"])
    assert snapshot(tmp_path / "ray.sqlite", cache) == expected


def test_executor_options_are_checked():
    from taxon.errors import TaxonError
    from taxon.study import executors

    with pytest.raises(TaxonError, match="--address is for --executor ray"):
        executors.make("local", 1, "127.0.0.1:6379")
    with pytest.raises(TaxonError, match="unknown executor 'slurm'"):
        executors.make("slurm")
    with pytest.raises(TaxonError, match="--workers 0"):
        executors.make("local", 0)
