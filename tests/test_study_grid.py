"""Named recipes and study grids: expansion, names, shared stages, data fraction, and `taxon study
plan` on the examples (cost figures, one-line errors)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from cli_runner import run_taxon

from taxon.config import DataRef, StageSpec
from taxon.errors import TaxonError
from taxon.study import cost
from taxon.study.grid import DataNames
from taxon.study.load import load_study
from taxon.study.plan import plan, unique_stages
from taxon.study.recipes import all_recipes, expand

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def taxon(*args, env=None):
    return run_taxon(*args, env=env)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_every_named_recipe_expands():
    """The eight strategies exist; each expands into stages that validate as StageSpecs (the mixed
    one into text and pair sources with 0.3/0.7 shares)."""
    names = set(all_recipes())
    assert names == {"baseline", "general_pretraining", "domain_pretraining", "direct_finetuning",
                     "sequential", "multi_task", "curriculum", "mixed_objective"}
    resolve = DataNames({"mix": [{"dataset": "tfns", "rate": 0.6}, {"dataset": "fpb", "rate": 0.4}]},
                        "test")
    values = {"task": "fpb", "tasks": "mix", "general": "wikitext", "domain": "fiqa-qa",
              "phases": ["fpb", "tfns"], "phase_steps": [30, 70]}
    stages = {}
    for name, recipe in all_recipes().items():
        stages[name] = expand(name, {k: v for k, v in values.items() if k in recipe.params}, resolve)
    assert stages["baseline"] == []
    assert [s["objective"] for s in stages["sequential"]] == ["pretrain", "pretrain", "sft"]
    assert [s["steps"] for s in stages["curriculum"]] == [30, 70]
    assert [d["rate"] for d in stages["multi_task"][0]["data"]] == [0.6, 0.4]
    mixed = stages["mixed_objective"][0]
    assert mixed["objective"] == "mixed"
    assert [(d["dataset"], d["as"], d["rate"]) for d in mixed["data"]] == [
        ("LLukas22/fiqa", "text", 0.3), ("takala/financial_phrasebank", "pair", 0.7)]
    for chain in stages.values():
        for s in chain:
            StageSpec.model_validate(s)


def test_replay_takes_its_share_and_lora_r0_is_full():
    resolve = DataNames({"fin": [{"dataset": "fpb", "rate": 0.5}, {"dataset": "tfns", "rate": 0.5}]},
                        "test")
    (stage,) = expand("domain_pretraining", {"domain": "fin", "replay": 0.2}, resolve)
    spec = StageSpec.model_validate(stage)
    assert spec.rates() == pytest.approx([0.4, 0.4, 0.2])
    assert spec.replay.dataset == "Salesforce/wikitext" and spec.lora is None


GRID = """
name: g
model: qwen2-0.5b
data:
  fpb: {dataset: takala/financial_phrasebank, config: sentences_50agree}
  wiki: {dataset: wikitext, config: wikitext-103-raw-v1}
grid:
  - recipe: [baseline, direct_finetuning, general_pretraining, sequential]
    model: [qwen2-0.5b, gpt2]
    task: [fpb, tfns]
    general: wiki
    domain: fiqa-qa
    seed: [0, 1]
  - recipe: direct_finetuning
    name: lora
    task: fpb
    lora_r: [1, 16]
    lora_alpha_ratio: [0.5, 2]
experiments:
  - name: explicit
"""


def test_grid_expands_with_readable_unique_names(tmp_path):
    study = load_study(write(tmp_path, GRID))
    names = [e.name for e in study.experiments]
    assert len(names) == len(set(names))
    # baseline: 2 models x 2 tasks (no seeds: nothing trained); direct and sequential: x2 seeds;
    # general: 2 models x 2 seeds (it has no task); lora block: 2 x 2.
    assert len(names) == 1 + 4 + 8 + 4 + 8 + 4
    assert "direct_finetuning[gpt2,task=fpb,seed=1]" in names
    assert "baseline[qwen2-0.5b,task=tfns]" in names
    assert "lora[lora_r=1,lora_alpha_ratio=0.5]" in names
    by_name = {e.name: e for e in study.experiments}
    gpt2 = by_name["direct_finetuning[gpt2,task=fpb,seed=1]"].stages[0]
    assert gpt2.lora.target_modules is None and gpt2.seed == 1  # the plan fills them in
    assert gpt2.data[0].dataset == "takala/financial_phrasebank"
    assert by_name["direct_finetuning[gpt2,task=tfns,seed=1]"].stages[0].data[0].dataset == \
        "zeroshot/twitter-financial-news-sentiment"  # aliases become the card id
    assert by_name["lora[lora_r=1,lora_alpha_ratio=0.5]"].stages[0].lora.alpha == 0.5
    assert by_name["lora[lora_r=16,lora_alpha_ratio=2]"].stages[0].lora.alpha == 32
    assert by_name["sequential[gpt2,task=fpb,seed=0]"].axes["model"] == "gpt2"


def test_plan_takes_lora_targets_from_the_architecture_unless_given(tmp_path):
    experiments = {e.name: e for e in plan(load_study(write(tmp_path, GRID)))}
    gpt2 = experiments["direct_finetuning[gpt2,task=fpb,seed=1]"].stages[0].spec
    qwen = experiments["direct_finetuning[qwen2-0.5b,task=fpb,seed=1]"].stages[0].spec
    assert gpt2.lora.target_modules == ("attn.c_attn", "attn.c_proj")
    assert qwen.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    # A list is an axis: one value that is itself a list of targets
    given = GRID.replace("    lora_r: [1, 16]\n", "    lora_r: [1, 16]\n    lora_targets: [[q_proj]]\n")
    explicit = load_study(write(tmp_path, given))
    (chosen,) = [e for e in plan(explicit) if e.name == "lora[lora_r=1,lora_alpha_ratio=0.5]"]
    assert chosen.stages[0].spec.lora.target_modules == ("q_proj",)  # a given value wins


def test_sequential_reuses_the_general_pretraining_checkpoint(tmp_path):
    experiments = {e.name: e for e in plan(load_study(write(tmp_path, GRID)))}
    general = experiments["general_pretraining[qwen2-0.5b,seed=0]"].stages[0].id
    seq = experiments["sequential[qwen2-0.5b,task=fpb,seed=0]"].stages
    assert seq[0].id == general
    assert seq[1].id == experiments["sequential[qwen2-0.5b,task=tfns,seed=0]"].stages[1].id


def test_quickstart_keeps_its_stage_ids():
    """Pinned: a change that moves every cached checkpoint must be deliberate. (They moved when
    stages came to hash their model's identity, taxon.identity, instead of its alias; and when the
    demo went to three seeds with a shorter SFT, to fit its 15 minutes.)"""
    ids = [[s.id for s in e.stages] for e in plan(load_study(EXAMPLES / "quickstart.yaml"))]
    assert ids == [[], ["b49eaf0941c94659"], ["6466bf3d993ec3b4"], ["f60eff72e5deecba"],
                   ["0e276c6fc03d77bf", "a315a2bf93c7a3d1"], ["e5bfed5e25217669", "d24b66e7b0b8ca5e"],
                   ["24d205bea0d0725e", "4e6e08173e69245b"]]


def test_seed_plan_has_the_72_experiments_and_saves_over_40_percent():
    study = load_study(EXAMPLES / "seed_qwen2_72.yaml")
    assert len(study.experiments) == 72
    assert len({e.name for e in study.experiments}) == 72
    prefixes = [e.name.split("[")[0] for e in study.experiments]
    assert {p: prefixes.count(p) for p in set(prefixes)} == {
        "baseline": 10, "general_pretraining": 9, "domain_pretraining": 12, "cross_domain": 6,
        "direct_finetuning": 10, "multi_task": 10, "sequential": 15}
    direct = [e for e in study.experiments if e.recipe == "direct_finetuning"]
    assert {(e.stages[0].lora.r, e.stages[0].lora.alpha) for e in direct} == {(4, 8)}
    c = cost.study_cost(plan(study))
    assert c.steps == sum(s.spec.steps for s in unique_stages(plan(study)))
    assert c.ratio <= 0.6, c


def test_thesis_taxonomy_expands():
    study = load_study(EXAMPLES / "thesis_taxonomy.yaml")
    models = {e.model for e in study.experiments}
    assert models == {"qwen2-0.5b", "gpt2-medium", "gemma-2-2b", "smollm2-135m"}
    assert len({e.recipe for e in study.experiments}) == 8
    # main grid: 4 baselines + 7 trained strategies x 4 models x 5 seeds; ablations x 4 models x
    # 5 seeds: 5 fractions, 7 ranks x 3 alpha ratios, 8 step counts
    assert len(study.experiments) == 4 + 7 * 20 + (5 + 21 + 8) * 20


def test_fraction_is_a_seeded_nested_subset(data_dir, tiny_tokenizer):
    from taxon.data import mixture

    assert "fraction" not in DataRef(dataset="fpb").canonical()  # old stage ids stay valid

    def pool(fraction, seed=0):
        spec = StageSpec(objective="sft", steps=2, batch_size=2, max_length=128, seed=seed,
                         data=[DataRef(dataset="fpb", fraction=fraction)])
        examples, _ = mixture._examples(spec.data[0], "sft", tiny_tokenizer, False, seed, 128)
        return examples, mixture.build(spec, tiny_tokenizer, False)[1]

    full, _ = pool(1.0)
    tenth, summary = pool(0.1)
    half, _ = pool(0.5)
    assert len(tenth) == pytest.approx(0.1 * len(full), abs=2)
    assert next(iter(summary.values()))["pool"] == len(tenth)
    key = [tuple(e["input_ids"]) for e in half]
    assert all(tuple(e["input_ids"]) in key for e in tenth)  # nested
    other, _ = pool(0.1, seed=1)
    assert [e["input_ids"] for e in other] != [e["input_ids"] for e in tenth]


def test_measured_throughput_follows_stage_chains(tmp_path):
    """Stage metadata as train_stage writes it: a chain's rate counts for its base model."""
    stages = tmp_path / "stages"

    def meta(sid, base, tokens, seconds):
        (stages / sid).mkdir(parents=True)
        (stages / sid / cost.STAGE_META).write_text(json.dumps({
            "spec": {}, "base": base, "lora": True,
            "figures": {"tokens": tokens, "train_seconds": seconds, "total_params": 100_000_000}}))

    meta("a", "smollm2-135m", 1000, 10.0)
    meta("b", str(stages / "a"), 3000, 10.0)
    measured = cost.measured_throughput(stages)
    assert list(measured) == ["smollm2-135m"]
    assert measured["smollm2-135m"].tokens_per_s == 200
    rate, where = cost.local_rate("qwen2-0.5b", measured)
    assert rate == pytest.approx(200 * 100_000_000 / 494032768) and "scaled" in where
    assert cost.gpu_seconds("h100", 10**9, 10**9, 0.5) == pytest.approx(6e18 / (989e12 * 0.5))


def test_taxon_models_stage_meta_name_matches():
    from taxon.models import STAGE_META

    assert cost.STAGE_META == STAGE_META


@pytest.mark.parametrize("example", ["seed_qwen2_72", "domain_replay",
                                     "thesis_taxonomy"])
def test_study_plan_cli_on_examples(example, tmp_path):
    t0 = time.time()
    r = taxon("study", "plan", str(EXAMPLES / f"{example}.yaml"), "--gpu", "a100",
              env={"TAXON_CACHE_DIR": str(tmp_path), "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    study = load_study(EXAMPLES / f"{example}.yaml")
    c = cost.study_cost(plan(study))
    assert f"{c.experiments} experiments" in out
    assert f"training steps: {c.steps:,} with reuse, {c.naive_steps:,} naive" in out
    assert "stage graph" in out and "each duration is its own run" in out
    assert "no trained stage in the cache" in out  # an empty cache: says how to calibrate
    assert "NVIDIA A100" in out and "30% MFU" in out
    # A hang guard only, loose enough for a loaded 2-core CI machine; speed is the benchmark's.
    assert time.time() - t0 < 300


@pytest.mark.parametrize(("block", "message"), [
    ("{recipe: direct_finetuning, task: fpb, stepz: [1, 2]}", "unknown axis 'stepz'"),
    ("{recipe: direct_finetuning, task: fpb, steps: []}", "axis 'steps' is an empty list"),
    ("{recipe: direct_tuning, task: fpb}", "unknown recipe 'direct_tuning'"),
    ("{recipe: direct_finetuning}", "needs a value for 'task'"),
    ("{recipe: direct_finetuning, task: fbp}", "'fbp' is neither a name under `data:`"),
    ("{recipe: curriculum, phases: [[fpb, tfns]], phase_steps: [[10]]}", "lists of one length"),
])
def test_bad_grid_is_one_line_exit_2(tmp_path, block, message):
    path = write(tmp_path, f"name: bad\nmodel: tiny\ngrid:\n  - {block}\n")
    r = taxon("study", "plan", str(path))
    assert r.returncode == 2, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], r.stderr


def test_name_clashes_get_told_apart_or_refused(tmp_path):
    twice = {"name": "c", "model": "tiny", "grid": [
        {"recipe": "direct_finetuning", "task": "fpb", "steps": 10},
        {"recipe": "direct_finetuning", "task": "fpb", "steps": 20}]}
    study = load_study(write(tmp_path, yaml.safe_dump(twice)))
    assert [e.name for e in study.experiments] == ["direct_finetuning[steps=10]",
                                                   "direct_finetuning[steps=20]"]
    twice["grid"][1]["steps"] = 10
    with pytest.raises(TaxonError, match="both 'direct_finetuning' with the same values"):
        load_study(write(tmp_path, yaml.safe_dump(twice)))
