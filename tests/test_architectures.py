"""One tiny random model per architecture the seeds name (Llama/SmolLM2, GPT-2, Qwen2, Gemma 2,
Gemma 3): LoRA targets come from the architecture on every path (a study and main.py), and LoRA
and full fine-tuning train and evaluate on each."""

from __future__ import annotations

import json

import pytest
import study_fixtures
from rich.console import Console

from taxon import seeds_cli
from taxon.config import StageSpec, StudySpec
from taxon.errors import TaxonError
from taxon.identity import model_identity
from taxon.models import STAGE_META, architecture, lora_targets, prepare, resolve_targets
from taxon.study.plan import plan
from taxon.study.run import run_study
from taxon.study.store import Store

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = {
    "tiny": ("llama", ATTENTION),
    "tiny-gpt2": ("gpt2", ("attn.c_attn", "attn.c_proj")),
    "tiny-qwen2": ("qwen2", ATTENTION),
    "tiny-gemma2": ("gemma2", ATTENTION),
    "tiny-gemma3": ("gemma3_text", ATTENTION),
}
SFT = {"objective": "sft", "data": [{"dataset": "takala/financial_phrasebank"}], "steps": 2,
       "batch_size": 2, "max_length": 64, "lr": 1e-3}


# ---- resolution, without loading weights ------------------------------------------------------

def test_every_alias_names_its_architecture():
    assert {a: architecture(a) for a in ("gpt2", "gpt2-medium", "qwen2-0.5b", "gemma-2-2b",
                                          "smollm2-135m", "gemma3-270m")} == {
        "gpt2": "gpt2", "gpt2-medium": "gpt2", "qwen2-0.5b": "qwen2", "gemma-2-2b": "gemma2",
        "smollm2-135m": "llama", "gemma3-270m": "gemma3_text"}
    for alias, (arch, targets) in TARGETS.items():
        assert architecture(alias) == arch and lora_targets(alias) == targets


def test_folders_checkpoints_and_unknown_architectures(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert lora_targets(str(folder)) == ("q_proj", "v_proj")  # not in our table: peft's
    lora_stage = tmp_path / "stage"  # a LoRA stage holds no config.json: its base decides
    lora_stage.mkdir()
    (lora_stage / STAGE_META).write_text(json.dumps({"base": "tiny-gpt2", "lora": True}))
    chained = tmp_path / "chained"
    chained.mkdir()
    (chained / STAGE_META).write_text(json.dumps({"base": str(lora_stage), "lora": True}))
    assert architecture(str(chained)) == "gpt2"
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(TaxonError, match="set the stage's `lora.target_modules`") as e:
        resolve_targets(StageSpec.model_validate(SFT), str(folder))
    assert str(folder) in str(e.value) and "\n" not in str(e.value)
    assert resolve_targets(StageSpec.model_validate({**SFT, "lora": None}), str(folder)).lora is None
    given = StageSpec.model_validate({**SFT, "lora": {"target_modules": ["c_attn"]}})
    assert resolve_targets(given, "tiny").lora.target_modules == ("c_attn",)  # a given value wins
    with pytest.raises(TaxonError, match="cannot load model 'nobody/nothing'"):
        architecture("nobody/nothing")  # offline, not cached: one line, no traceback
    with pytest.raises(TaxonError, match="unknown model"):
        architecture("no-such-alias")


def test_llama_stage_ids_do_not_change():
    """The resolved targets on a llama model are the old default, so the canonical spec (and the
    id, pinned as of taxon.identity's RECIPE_VERSION 2) stays."""
    quickstart_sft = {**SFT, "data": [{"dataset": "takala/financial_phrasebank",
                                       "config": "sentences_50agree"}],
                      "steps": 40, "batch_size": 16, "max_length": 128,
                      "schedule": "constant_with_warmup", "lora": {"r": 16, "alpha": 32}}
    study = StudySpec.model_validate({"name": "q", "model": "tiny",
                                      "experiments": [{"name": "a", "stages": [quickstart_sft]}]})
    (stage,) = plan(study)[0].stages
    assert stage.spec.canonical() == (
        '{"batch_size":16,"data":[{"config":"sentences_50agree","dataset":"takala/financial_phrasebank",'
        '"rate":null,"split":"train"}],"grad_accum":1,"lora":{"alpha":32,"dropout":0.05,"r":16,'
        '"target_modules":["q_proj","k_proj","v_proj","o_proj"]},"lr":0.001,"max_length":128,'
        '"objective":"sft","precision":"auto","replay":null,"schedule":"constant_with_warmup",'
        '"seed":0,"steps":40,"warmup_ratio":0.1}')
    # The id also hashes tiny's identity, which changed when tiny became a declared config.
    assert stage.id == "9f4a65b5a67d1593"


def test_training_refuses_unresolved_targets(tmp_path):
    from taxon.train import train_stage

    with pytest.raises(RuntimeError, match="resolve_targets"):
        train_stage(StageSpec.model_validate(SFT), "tiny", tmp_path / "x")


# ---- training and evaluation on each architecture ----------------------------------------------

@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory, data_dir):
    """A stage cache of this module's own (so stages train rather than load from an earlier run),
    with the tiny models of the shared cache linked in rather than rebuilt."""
    for m in TARGETS:
        prepare(m)
    cache = study_fixtures.fresh_cache(tmp_path_factory.mktemp("arch-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAXON_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module", params=list(TARGETS))
def trained(request, fresh_cache, tmp_path_factory):
    """Model `param` through a study (a LoRA SFT stage, then full SFT on its merged checkpoint,
    evaluated on 4 FPB items) and through main.py (LoRA, the seeds' default). One chain rather
    than two experiments: an evaluation costs about as much as a stage here."""
    model = request.param
    work = tmp_path_factory.mktemp(model)
    study = StudySpec.model_validate({
        "name": f"arch-{model}", "model": model,
        "eval": {"tasks": ["fpb"], "limit": 4, "batch_size": 4},
        "experiments": [{"name": "lora-then-full",
                         "stages": [{**SFT, "lora": {"r": 4, "alpha": 8}}, {**SFT, "lora": None}]}]})
    store = Store(work / "study.sqlite")
    experiments = {e.name: e for e in run_study(study, store, Console(quiet=True))}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        common = ["--model", model, "--dataset", "takala/financial_phrasebank", "--mode", "sft",
                  "--max_steps", "2", "--batch_size", "2", "--max_length", "64", "--eval_tasks",
                  "fpb", "--eval_limit", "4", "--eval_batch_size", "4"]
        rc = seeds_cli.main([*common, "--lora_r", "4"])
        rc_full = seeds_cli.main([*common, "--full_finetune", "--output_dir", "checkpoints/full"])
    return model, store, experiments, (rc, rc_full), work


def test_study_trains_lora_and_full_with_the_architectures_targets(trained):
    model, store, experiments, _, _ = trained
    lora, full = experiments["lora-then-full"].stages
    targets = TARGETS[model][1]
    assert lora.spec.lora.target_modules == targets
    adapter = json.loads((lora.path / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(targets)
    assert json.loads(store.stage(lora.id)["spec"])["lora"]["target_modules"] == list(targets)
    assert (full.path / "model.safetensors").is_file() and full.spec.lora is None
    (result,) = store.results(experiments["lora-then-full"].model_key)
    assert result["task"] == "fpb" and result["n"] == 4
    assert [e["name"] for e in store.experiments(f"arch-{model}")] == ["lora-then-full"]


def test_main_py_trains_and_evaluates_with_the_architectures_targets(trained):
    model, _, _, (rc, _), work = trained
    assert rc == 0
    out = work / "checkpoints" / f"{model}_financial_phrasebank_sft"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(TARGETS[model][1])
    meta = json.loads((out / STAGE_META).read_text())
    assert meta["spec"]["lora"]["target_modules"] == list(TARGETS[model][1])
    store = Store(work / "results" / "taxon.sqlite")
    (result,) = store.results(model_identity(str(out)))
    assert result["task"] == "fpb" and result["n"] == 4


def test_main_py_full_fine_tuning_on_each_architecture(trained):
    model, _, _, (_, rc_full), work = trained
    assert rc_full == 0
    out = work / "checkpoints" / "full"
    meta = json.loads((out / STAGE_META).read_text())
    assert meta["spec"]["lora"] is None and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == architecture(model)
    store = Store(work / "results" / "taxon.sqlite")
    (result,) = store.results(model_identity(str(out)))
    assert result["task"] == "fpb" and result["n"] == 4
