"""Composite adapters (peft's weighted-adapter merges), adapters switched over one loaded base in
`taxon eval` and `taxon serve`, composites in a study, and their retention in the report.

Members are real LoRA SFT stages of `tiny`, trained for a few steps on the mirror's FPB and TFNS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from api_servers import start
from cli_runner import run_taxon
from rich.console import Console

from taxon.config import ComposeSpec, DataRef, ExperimentSpec, LoraSpec, StageSpec, StudySpec
from taxon.errors import TaxonError
from taxon.evals.evaluate import TaskResult
from taxon.models import STAGE_META, load_model, resolve_targets
from taxon.study.store import Store

LIMIT = "6"
SFT = {"objective": "sft", "steps": 2, "batch_size": 2, "lr": 5e-2, "warmup_ratio": 0.0,
       "max_length": 96}


def _train(root: Path, name: str, dataset: str, lora: LoraSpec, seed: int = 0) -> Path:
    from taxon.train import train_stage

    spec = resolve_targets(StageSpec(**SFT, data=(DataRef(dataset=dataset),), lora=lora, seed=seed), "tiny")
    out = root / name
    train_stage(spec, "tiny", out, desc=f"test-compose-{name}", stage_id=f"stage-{name}")
    return out


@pytest.fixture(scope="module")
def members(tmp_path_factory, data_dir) -> dict[str, Path]:
    """LoRA adapters over `tiny`: fpb and tfns (r=4, alpha 8, so scaling 2) and fpb with alpha = r
    (scaling 1)."""
    root = tmp_path_factory.mktemp("members")
    return {"fpb": _train(root, "fpb", "fpb", LoraSpec(r=4, dropout=0.0)),
            "tfns": _train(root, "tfns", "tfns", LoraSpec(r=4, dropout=0.0), seed=1),
            "fpb-unit": _train(root, "fpb-unit", "fpb", LoraSpec(r=4, alpha=4, dropout=0.0))}


def _deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Each adapted module's effective delta B·A·scaling, as peft applies it."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    meta = json.loads((folder / STAGE_META).read_text())
    base, _ = load_model(meta["base"], device="cpu")
    model = PeftModel.from_pretrained(base, str(folder))
    return {name: module.get_delta_weight("default").detach().clone()
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _write(members_: list[Path], out: Path, **spec) -> dict:
    from taxon.compose import write_composite

    return write_composite(members_, ComposeSpec(members=[str(m) for m in members_], **spec), out)


# --- merging --------------------------------------------------------------------------------------


def test_one_adapter_at_weight_one_reproduces_it(members, tmp_path):
    """alpha = r: peft folds sqrt(weight x scaling) = 1 into A and B, so every delta is bitwise
    the member's; the default alpha = 2r folds sqrt(2) into each, equal up to fp32 rounding."""
    for key, exact in (("fpb-unit", True), ("fpb", False)):
        meta = _write([members[key]], tmp_path / key, weights=[1.0])
        assert meta["lora_config"]["r"] == 4
        theirs, ours = _deltas(members[key]), _deltas(tmp_path / key)
        assert theirs.keys() == ours.keys() and len(theirs) == 8  # 2 layers x q, k, v, o
        for name, delta in theirs.items():
            if exact:
                assert torch.equal(ours[name], delta), name
            else:
                torch.testing.assert_close(ours[name], delta, rtol=2e-6, atol=1e-7)
        merged_theirs = load_model(str(members[key]), device="cpu")[0].state_dict()
        merged_ours = load_model(str(tmp_path / key), device="cpu")[0].state_dict()
        for name, w in merged_theirs.items():
            if exact:
                assert torch.equal(merged_ours[name], w), name
            else:
                torch.testing.assert_close(merged_ours[name], w, rtol=2e-6, atol=1e-7)


def test_cat_is_the_weighted_sum_of_the_members(members, tmp_path):
    meta = _write([members["fpb"], members["tfns"]], tmp_path / "cat", method="cat", weights=[0.7, 0.3])
    assert meta["lora_config"]["r"] == 8  # ranks concatenated
    a, b, c = _deltas(members["fpb"]), _deltas(members["tfns"]), _deltas(tmp_path / "cat")
    for name in a:
        torch.testing.assert_close(c[name], 0.7 * a[name] + 0.3 * b[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare_linear", "dare_ties", "ties_svd"])
def test_every_method_writes_a_loadable_composite(members, tmp_path, method):
    density = {"density": 0.5} if method not in ("linear", "svd") else {}
    meta = _write([members["fpb"], members["tfns"]], tmp_path / method, method=method, **density)
    assert json.loads((tmp_path / method / STAGE_META).read_text())["compose"]["method"] == method
    assert meta["base"] == "tiny" and meta["lora"] is True
    model, _ = load_model(str(tmp_path / method), device="cpu")
    base, _ = load_model("tiny", device="cpu")
    changed = [n for n, w in model.state_dict().items() if not torch.equal(w, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)


def test_dare_masks_come_from_the_seed(members, tmp_path):
    pair = [members["fpb"], members["tfns"]]
    one = _write(pair, tmp_path / "s0", method="dare_linear", density=0.5, seed=0)
    again = _write(pair, tmp_path / "s0b", method="dare_linear", density=0.5, seed=0)
    other = _write(pair, tmp_path / "s1", method="dare_linear", density=0.5, seed=1)
    assert one["id"] == again["id"] != other["id"]
    d0, d0b, d1 = _deltas(tmp_path / "s0"), _deltas(tmp_path / "s0b"), _deltas(tmp_path / "s1")
    assert all(torch.equal(d0[n], d0b[n]) for n in d0)
    assert any(not torch.equal(d0[n], d1[n]) for n in d0)


def test_cli_exports_a_full_model_transformers_loads_without_peft(members, tmp_path):
    from transformers import AutoModelForCausalLM

    args = ("adapters", "merge", members["fpb"], members["tfns"], "--method", "ties", "--density",
            "0.5", "--weights", "0.6,0.4")
    adapter = run_taxon(*args, "--out", tmp_path / "adapter")
    full = run_taxon(*args, "--out", tmp_path / "full", "--full")
    assert adapter.returncode == 0 and full.returncode == 0, adapter.stderr + full.stderr
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    merged = load_model(str(tmp_path / "adapter"), device="cpu")[0].state_dict()
    for name, w in merged.items():
        torch.testing.assert_close(plain[name], w, rtol=0, atol=0)


@pytest.mark.parametrize("extra, words", [
    (("--method", "ties"), "needs a density"),
    (("--method", "linear", "--density", "0.5"), "does not prune"),
    (("--weights", "0.5"), "one weight per member"),
    (("--weights", "a,b"), "separated by commas"),
])
def test_cli_bad_merges_are_one_line(members, tmp_path, extra, words):
    r = run_taxon("adapters", "merge", members["fpb"], members["tfns"], *extra, "--out", tmp_path / "x")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_a_folder_that_is_no_adapter_is_refused(members, tmp_path):
    from taxon.models import prepare

    r = run_taxon("adapters", "merge", members["fpb"], prepare("tiny"), "--out", tmp_path / "x")
    assert r.returncode == 2 and "not a taxon checkpoint" in r.stderr, r.stderr


# --- switching adapters over one base -------------------------------------------------------------


def _preds(path: Path) -> dict[str, list[dict]]:
    s = Store(path)
    return {e["model_key"]: s.predictions(e["model_key"], s.experiment_results(e)[0]["eval_key"])
            for e in s.experiments()}


def test_eval_switches_adapters_over_one_base(members, tmp_path):
    from taxon.study import work

    composite = tmp_path / "composite"
    _write([members["fpb"], members["tfns"]], composite, method="linear")
    models = [members["fpb"], members["tfns"], composite]
    before = len(work.loads)
    together = run_taxon("eval", *[a for m in models for a in ("--model", m)], "--tasks", "fpb",
                         "--limit", LIMIT, "--store", tmp_path / "together.sqlite")
    assert together.returncode == 0, together.stderr
    assert work.loads[before:] == ["tiny"]  # the base, once, for all three adapters
    assert "3 models evaluated; 1 loaded from disk" in together.stdout
    for i, m in enumerate(models):  # each alone: merged into its own copy of the base
        alone = run_taxon("eval", "--model", m, "--tasks", "fpb", "--limit", LIMIT,
                          "--store", tmp_path / f"alone{i}.sqlite")
        assert alone.returncode == 0, alone.stderr
    joint = _preds(tmp_path / "together.sqlite")
    assert len(joint) == 3
    for i in range(3):
        ((key, preds),) = _preds(tmp_path / f"alone{i}.sqlite").items()
        assert [p["pred"] for p in joint[key]] == [p["pred"] for p in preds]
        diff = max(abs(a - b) for p, q in zip(joint[key], preds, strict=True)
                   for a, b in zip(p["scores"], q["scores"], strict=True))
        assert diff < 1e-4, diff


@pytest.fixture
def adapter_server(members, tmp_path):
    from taxon.serve import build_app, load

    composite = tmp_path / "composite"
    _write([members["fpb"], members["tfns"]], composite, method="cat")
    served = load([str(members["fpb"]), str(members["tfns"]), str(composite)], ["fpb", "tfns", "both"])
    running = start(build_app(served))
    yield served, running, {"fpb": members["fpb"], "tfns": members["tfns"], "both": composite}
    running.stop()


PROMPTS = ["Operating profit rose to EUR 13.1 mn from EUR 8.7 mn. Sentiment: positive",
           "The company said sales fell sharply in the third quarter. Sentiment: negative"]


def test_serve_picks_the_adapter_by_model_name(adapter_server):
    """Each served name's echoed log-likelihood of a continuation equals the local scorer's on that
    adapter merged into its own model, in any order of requests (the server switches back)."""
    import httpx

    from taxon.evals.scoring import loglikelihoods

    served, running, local = adapter_server
    assert served["fpb"].adapters is served["tfns"].adapters is served["both"].adapters  # one base
    listed = httpx.get(running.base_url + "/models").json()["data"]
    assert [m["id"] for m in listed] == ["fpb", "tfns", "both"]
    remote: dict[str, list[float]] = {}
    for name in ("fpb", "tfns", "both", "fpb"):
        r = httpx.post(running.base_url + "/completions", timeout=60, json={
            "model": name, "prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
        remote[name] = [sum(c["logprobs"]["token_logprobs"][-3:]) for c in r["choices"]]
        assert r["model"] == name
    for name, folder in local.items():
        model, tokenizer = load_model(str(folder), device="cpu")
        requests = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            requests.append((ids[:-3], ids[-3:]))
        ours = loglikelihoods(model, requests, tokenizer.pad_token_id)
        assert remote[name] == pytest.approx(ours, abs=1e-4), name
    assert remote["fpb"] != pytest.approx(remote["tfns"], abs=1e-3)  # the adapters differ


# --- composites in a study ------------------------------------------------------------------------

STUDY = """
name: tiny-compose
model: tiny
eval: {tasks: [fpb, tfns], limit: 6, batch_size: 4}
x-sft: &sft {objective: sft, steps: 2, batch_size: 2, max_length: 96, lr: 0.05, warmup_ratio: 0.0,
             lora: {r: 4, dropout: 0.0}}
experiments:
  - name: fpb-lora
    stages: [{<<: *sft, data: [{dataset: fpb}]}]
  - name: tfns-lora
    stages: [{<<: *sft, data: [{dataset: tfns}]}]
  - name: multitask
    stages: [{<<: *sft, data: [{dataset: fpb}, {dataset: tfns}]}]
  - name: merged
    compose: {members: [fpb-lora, tfns-lora], method: ties, density: 0.5, baseline: multitask}
"""


def test_a_study_merges_evaluates_and_reports_retention(tmp_path, data_dir):
    from taxon.report.build import build
    from taxon.study.load import load_study
    from taxon.study.plan import plan
    from taxon.study.run import run_study

    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    study = load_study(path)
    planned = {e.name: e for e in plan(study)}
    comp = planned["merged"].compose
    assert comp is not None and [m.id for m in comp.members] == [
        planned["fpb-lora"].stages[-1].id, planned["tfns-lora"].stages[-1].id]
    assert planned["merged"].model_key == comp.id
    store = Store(tmp_path / "s.sqlite")
    run_study(study, store, Console(quiet=True))
    meta = json.loads((comp.path / STAGE_META).read_text())
    assert meta["id"] == comp.id and meta["compose"]["member_ids"] == [m.id for m in comp.members]
    results = store.experiment_results(next(e for e in store.experiments() if e["name"] == "merged"))
    assert sorted(r["task"] for r in results) == ["fpb", "tfns"]
    report = build(store, "tiny-compose")
    kept = report.retention
    pairs = list(zip(kept["member"], kept["task"], strict=True))
    assert pairs == [("fpb-lora", "fpb"), ("tfns-lora", "tfns")]
    assert set(kept["baseline"]) == {"multitask"}
    for row in kept.itertuples():
        assert row.retention == pytest.approx(row.composite_score / row.member_score)
        assert row.ret_low <= row.retention <= row.ret_high
        assert row.baseline_retention == pytest.approx(row.baseline_score / row.member_score)
    from taxon.report.write import markdown

    assert "Retention: composite adapters" in markdown(report)


def test_the_composite_identity_is_its_members_and_merge(tmp_path):
    from taxon.study.plan import plan

    def key(**compose):
        spec = {"members": ["a", "b"], "method": "ties", "density": 0.5, **compose}
        study = StudySpec(name="s", model="tiny", experiments=(
            ExperimentSpec(name="a", stages=(StageSpec(**SFT, data=(DataRef(dataset="fpb"),)),)),
            ExperimentSpec(name="b", stages=(StageSpec(**SFT, data=(DataRef(dataset="tfns"),)),)),
            ExperimentSpec(name="m", compose=ComposeSpec(**spec))))
        return plan(study)[-1].model_key

    same = key()
    assert key(baseline="a") == same  # the report's baseline is not part of what was merged
    assert key(weights=[0.5, 0.5]) == same  # the default weights, written out
    assert len({same, key(density=0.7), key(seed=1), key(method="dare_ties"), key(weights=[0.7, 0.3]),
                key(members=["b", "a"])}) == 6


def _study(*experiments, model="tiny") -> StudySpec:
    stage = {**SFT, "lora": {"r": 4}}
    base = [ExperimentSpec(name="a", stages=(StageSpec(**stage, data=(DataRef(dataset="fpb"),)),)),
            ExperimentSpec(name="full", stages=(StageSpec(**{**stage, "lora": None},
                                                          data=(DataRef(dataset="fpb"),)),)),
            ExperimentSpec(name="r8", stages=(StageSpec(**{**stage, "lora": {"r": 8}},
                                                        data=(DataRef(dataset="tfns"),)),)),
            ExperimentSpec(name="gpt2", model="tiny-gpt2",
                           stages=(StageSpec(**stage, data=(DataRef(dataset="tfns"),)),))]
    return StudySpec(name="bad", model=model, experiments=(*base, *experiments))


@pytest.mark.parametrize("compose, words", [
    ({"members": ["a", "nope"]}, "compose member 'nope' is not an experiment"),
    ({"members": ["a", "full"]}, "ends in full fine-tuning"),
    ({"members": ["a", "gpt2"]}, "different bases"),
    ({"members": ["a", "r8"], "method": "ties", "density": 0.5}, "needs members of one LoRA rank"),
    ({"members": ["a", "r8"], "baseline": "nobody", "method": "cat"}, "compose baseline 'nobody'"),
])
def test_bad_composites_stop_the_study_before_training(compose, words, data_dir):
    from taxon.study.validate import checked_plan

    study = _study(ExperimentSpec(name="m", compose=ComposeSpec(**compose)))
    with pytest.raises(TaxonError) as e:
        checked_plan(study, for_run=True)
    assert words in str(e.value) and "experiment 'm'" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_a_composite_with_stages_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    stages = "stages: [{<<: *sft, data: [{dataset: fpb}]}]\n    compose: {"
    path.write_text(STUDY.replace("compose: {", stages))
    r = run_taxon("study", "plan", path)
    assert r.returncode == 2 and "both stages and compose" in r.stderr, r.stderr


def test_seeds_replicate_a_composite_with_its_members(tmp_path):
    from taxon.study.load import load_study

    path = tmp_path / "s.yaml"
    path.write_text(STUDY.replace("name: tiny-compose", "name: tiny-compose\nseeds: [0, 1]"))
    study = load_study(path)
    merged = [e for e in study.experiments if e.compose is not None]
    assert [e.name for e in merged] == ["merged[seed=0]", "merged[seed=1]"]
    assert merged[1].compose.members == ("fpb-lora[seed=1]", "tfns-lora[seed=1]")
    assert merged[1].compose.seed == 1 and merged[1].compose.baseline == "multitask"



def test_the_plan_shows_each_composite_under_its_members(tmp_path):
    """Names like `merged[seed=0]` print as written (not read as rich markup), and the graph hangs
    each composite under its first member's stage, naming every member's stage id."""
    from taxon.study.load import load_study
    from taxon.study.plan import plan
    from taxon.study.plan_report import compose_label, print_plan

    path = tmp_path / "s.yaml"
    path.write_text(STUDY.replace("name: tiny-compose", "name: tiny-compose\nseeds: [0, 1]"))
    study = load_study(path)
    planned = plan(study)
    console = Console(record=True, width=250)
    print_plan(study, planned, console)
    out = console.export_text()
    for e in planned:
        assert e.name in out
    for e in (e for e in planned if e.compose is not None):
        ids = ", ".join(m.id[:8] for m in e.compose.members)
        assert compose_label(e) == "ties 2 adapters, density 0.5"
        assert f"{e.compose.id[:8]} {compose_label(e)} of {ids} (merged, nothing trains)" in out
        assert f"compose: {compose_label(e)}" in out

# --- retention, on stored predictions with a known truth -----------------------------------------


def test_retention_is_the_composite_share_of_the_member_score(tmp_path):
    """Composite right on 60% of the member's correct items, multi-task on 90%: retentions of about
    0.6 and 0.9, with intervals around them."""
    from taxon.report.arms import Scores
    from taxon.report.retention import retention_table

    rng = np.random.default_rng(0)
    n = 400
    gold = rng.integers(0, 3, n)
    member = np.where(rng.random(n) < 0.8, gold, (gold + 1) % 3)
    store = Store(tmp_path / "r.sqlite")

    def add(name, pred, spec):
        key = f"model-{name}"
        acc = float((pred == gold).mean())
        result = TaskResult("fpb", n, 970, 0, {"accuracy": {"value": acc, "low": 0, "high": 1},
                                               "per_class": {"a": {}, "b": {}, "c": {}}},
                            [{"idx": i, "gold": int(g), "pred": int(p), "scores": [0.0] * 3}
                             for i, (g, p) in enumerate(zip(gold, pred, strict=True))])
        store.add_result(key, "ek-" + key, result)
        store.add_experiment("st", name, "tiny", key, [], {"name": name, **spec}, ["ek-" + key])

    def keep(share):
        lose = (member == gold) & (rng.random(n) > share)
        return np.where(lose, (gold + 2) % 3, member)

    add("fpb-lora", member, {"stages": [{"data": [{"dataset": "fpb"}]}]})
    add("multitask", keep(0.9), {"stages": [{"data": [{"dataset": "fpb"}, {"dataset": "tfns"}]}]})
    add("merged", keep(0.6), {"compose": {"members": ["fpb-lora"], "method": "linear",
                                          "baseline": "multitask"}})
    scores = Scores(store, "st")
    (row,) = retention_table(scores, ["fpb"]).itertuples()
    # accuracy is the metric recomputed on items; fpb's primary is macro_f1, so compare that ratio
    assert row.metric == "macro_f1" and row.member == "fpb-lora" and row.baseline == "multitask"
    assert row.retention == pytest.approx(row.composite_score / row.member_score)
    assert 0.45 < row.retention < 0.75 and 0.8 < row.baseline_retention < 1.0
    assert row.ret_low < row.retention < row.ret_high and row.ret_high < row.base_low
