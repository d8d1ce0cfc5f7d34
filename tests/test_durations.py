"""Durations from one run: with a constant schedule and a warmup in steps, the planner serves
experiments that differ only in `steps` by the longest run, which keeps its checkpoints at the
shorter durations as stages of their own; `study run` evaluates them without training them.

The checkpoint a run keeps at step N is compared tensor by tensor with that checkpoint's stage
trained alone (N steps of the M-step run's data stream and schedule, stopped at N): they must be
EXACTLY equal (torch.equal), not merely close. Both trainings run the same operations in the same
order on the same batches, from the same seeds, in fp32 on the CPU (same process, same thread
count), so there is no source of rounding difference: any difference is a bug (another data
order, another learning rate, another dropout draw)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import run_taxon
from rich.console import Console
from safetensors.torch import load_file
from transformers import TrainerCallback

from taxon.config import DataRef, LoraSpec, StageSpec
from taxon.errors import TaxonError
from taxon.identity import model_identity
from taxon.models import STAGE_META, load_model, resolve_targets
from taxon.schedule import checkpoint, warmup_steps, whole_run
from taxon.study.cost import duration_floor, new_steps, schedule_rules, study_cost
from taxon.study.load import load_study
from taxon.study.plan import plan, stage_id, unique_stages
from taxon.study.run import run_study
from taxon.study.store import Store
from taxon.train import train_stage

COMMON = dict(steps=6, batch_size=2, lr=5e-3, schedule="constant_with_warmup", warmup_steps=2,
              precision="fp32", seed=1)
MODES = {
    # LoRA dropout stays on (0.05): the checkpoint also needs the run's dropout draws.
    "lora-sft": resolve_targets(StageSpec(objective="sft", data=(DataRef(dataset="fpb"),), max_length=128,
                                          lora=LoraSpec(r=4, alpha=8), **COMMON), "tiny"),
    "full-pretrain": StageSpec(
        objective="pretrain", max_length=64, lora=None,
        data=(DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation"),), **COMMON),
    # Cosine: a run's checkpoint is still exactly its `run_steps` stage (the schedule is the whole
    # run's), though not a shorter cosine run; the planner never substitutes one for the other.
    "lora-sft-cosine": resolve_targets(StageSpec(
        objective="sft", data=(DataRef(dataset="fpb"),), max_length=128, lora=LoraSpec(r=4, alpha=8),
        **{**COMMON, "schedule": "cosine", "warmup_steps": None, "warmup_ratio": 0.3}), "tiny"),
}


class LrTrace(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "learning_rate" in logs:
            self.lrs.append(logs["learning_rate"])


def weights(folder: Path, spec: StageSpec) -> dict[str, torch.Tensor]:
    return load_file(folder / ("adapter_model.safetensors" if spec.lora else "model.safetensors"))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_checkpoint_equals_its_stage_trained_alone(mode, tmp_path, data_dir):
    spec = MODES[mode].model_copy(update={"checkpoints": (3,)})
    ckpt = checkpoint(spec, 3)
    assert (ckpt.steps, ckpt.run_steps, ckpt.checkpoints) == (3, 6, ())
    assert whole_run(ckpt).canonical() == spec.canonical()
    ckpt_id = stage_id(model_identity("tiny"), ckpt)
    run_trace, alone_trace = LrTrace(), LrTrace()
    train_stage(spec, "tiny", tmp_path / "run", desc="run", callbacks=[run_trace],
                keep={3: (ckpt_id, str(tmp_path / "kept"))})
    figures = train_stage(ckpt, "tiny", tmp_path / "alone", desc="alone", callbacks=[alone_trace])

    # The checkpoint alone trains 3 steps with the run's first 3 learning rates.
    assert len(run_trace.lrs) == 6 and alone_trace.lrs == run_trace.lrs[:3]
    kept, alone = weights(tmp_path / "kept", spec), weights(tmp_path / "alone", spec)
    final = weights(tmp_path / "run", spec)
    assert sorted(kept) == sorted(alone) and kept
    for name in kept:
        assert torch.equal(kept[name], alone[name]), name
    assert any(not torch.equal(kept[n], final[n]) for n in kept)  # the run went on after step 3
    assert figures["tokens"] > 0

    # The kept folder is a stage like any other: its metadata, its identity, loadable.
    import json

    meta = json.loads((tmp_path / "kept" / STAGE_META).read_text())
    assert meta["id"] == ckpt_id and meta["spec"] == ckpt.model_dump(mode="json")
    assert meta["figures"]["step"] == 3 and meta["figures"]["final_loss"] is not None
    assert 0 < meta["figures"]["tokens"] < json.loads((tmp_path / "run" / STAGE_META).read_text())[
        "figures"]["tokens"]
    model, _ = load_model(str(tmp_path / "kept"))
    assert model is not None


def test_warmup_in_steps_is_the_same_for_every_length():
    short = MODES["full-pretrain"].model_copy(update={"steps": 4})
    assert warmup_steps(short) == warmup_steps(MODES["full-pretrain"]) == 2
    # A ratio left beside warmup_steps is unused and does not split the stage's identity.
    a = StageSpec.model_validate({**MODES["full-pretrain"].model_dump(), "warmup_ratio": 0.5})
    assert a.canonical() == MODES["full-pretrain"].canonical()


STUDY = """
name: durations
model: tiny
seed: 2
eval: {tasks: [fpb], limit: 8, batch_size: 4}
x-sft: &sft
  objective: sft
  data: [{dataset: takala/financial_phrasebank}]
  batch_size: 2
  max_length: 96
  lr: 1.0e-3
  schedule: constant_with_warmup
  warmup_steps: 1
experiments:
  - {name: sft-2, stages: [{<<: *sft, steps: 2}]}
  - {name: sft-3, stages: [{<<: *sft, steps: 3}]}
  - {name: sft-5, stages: [{<<: *sft, steps: 5}]}
  - {name: sft-3-then-tfns, stages: [{<<: *sft, steps: 3}, {<<: *sft, data: [{dataset: tfns}], steps: 1}]}
  # Not length-free: each duration is its own run.
  - {name: cos-2, stages: [{<<: *sft, schedule: cosine, warmup_steps: null, steps: 2}]}
  - {name: cos-3, stages: [{<<: *sft, schedule: cosine, warmup_steps: null, steps: 3}]}
  - {name: ratio-2, stages: [{<<: *sft, warmup_steps: null, warmup_ratio: 0.5, steps: 2}]}
  - {name: ratio-3, stages: [{<<: *sft, warmup_steps: null, warmup_ratio: 0.5, steps: 3}]}
"""


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    return path


def test_plan_serves_shorter_durations_by_checkpoints(study_file):
    experiments = {e.name: e for e in plan(load_study(study_file))}
    run = experiments["sft-5"].stages[0]
    assert (run.kind, run.spec.steps, run.spec.checkpoints) == ("run", 5, (2, 3))
    for name, n in (("sft-2", 2), ("sft-3", 3)):
        (s,) = experiments[name].stages
        assert (s.kind, s.spec.steps, s.spec.run_steps) == ("checkpoint", n, 5)
        assert s.note == f"checkpoint at {n} of the 5-step run"
        assert s.parent == run.parent
        assert stage_id(s.parent, whole_run(s.spec)) == run.id
    # A later stage continues from the checkpoint, which is the same stage as sft-3's.
    first, second = experiments["sft-3-then-tfns"].stages
    assert first.id == experiments["sft-3"].stages[0].id and second.parent == first.id
    assert second.kind == "run"
    # Cosine, and a warmup given as a ratio, depend on the run's length: own runs.
    for name in ("cos-2", "cos-3", "ratio-2", "ratio-3"):
        (s,) = experiments[name].stages
        assert s.kind == "run" and s.spec.run_steps is None and s.spec.checkpoints == ()

    planned = list(experiments.values())
    c = study_cost(planned)
    assert c.naive_steps == 2 + 3 + 5 + 4 + 2 + 3 + 2 + 3
    assert c.steps == 5 + 1 + 2 + 3 + 2 + 3  # checkpoints train nothing
    assert c.checkpoints == 2
    # The floor counts each set of durations once at its longest, whatever the schedule: the
    # 5-step run stands for the cosine and warmup-ratio ones too; the tfns stage after sft-3 adds 1.
    assert duration_floor(planned) == 5 + 1
    assert dict(zip(experiments, new_steps(planned), strict=True))["sft-2"] == 0
    rules = " ".join(schedule_rules(unique_stages(planned)))
    assert "checkpoints of the longest" in rules and "2 sets of stages differ only" in rules


def test_study_plan_lists_checkpoint_evaluations(study_file):
    out = run_taxon("study", "plan", study_file)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # the table's title may wrap
    assert "checkpoint evaluations: 2 of 8 experiments evaluate a checkpoint" in text
    assert "checkpoint at 2 of the 5-step run" in out.stdout
    assert "(2 of them checkpoints kept by runs)" in text
    listed = out.stdout.split("checkpoint evaluations")[1].split("stage graph")[0]
    assert "sft-2" in listed and "sft-3" in listed
    assert "sft-5" not in listed and "then-tfns" not in listed  # its model is trained after


def test_checkpoint_every_and_bad_checkpoints(tmp_path):
    spec = StageSpec.model_validate({**MODES["full-pretrain"].model_dump(), "steps": 10,
                                     "checkpoint_every": 3, "checkpoints": [5]})
    assert spec.checkpoints == (3, 5, 6, 9)
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmodel: tiny\nexperiments:\n  - name: a\n    stages:\n"
                    "      - {objective: sft, data: [{dataset: fpb}], steps: 4, checkpoints: [2, 4]}\n")
    with pytest.raises(TaxonError, match=r"checkpoints \[4\] must lie between 1 and steps - 1"):
        load_study(path)
    out = run_taxon("study", "plan", path)
    assert out.returncode == 2 and "checkpoints [4]" in out.stderr


def test_study_run_evaluates_checkpoints_without_training_them(tmp_path, monkeypatch, data_dir):
    from study_fixtures import fresh_cache

    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    text = STUDY.split("  # Not length-free")[0]
    path = tmp_path / "study.yaml"
    path.write_text(text)
    study = load_study(path)
    experiments = {e.name: e for e in plan(study)}
    store = Store(tmp_path / "results.sqlite")
    run_study(study, store, Console(quiet=True))

    def trained() -> list[str]:
        return [r[0] for r in store.db.execute("SELECT key FROM events WHERE kind = 'train'")]

    run, ckpt2 = experiments["sft-5"].stages[0], experiments["sft-2"].stages[0]
    ckpt3, tfns = experiments["sft-3-then-tfns"].stages
    assert sorted(trained()) == sorted([run.id, tfns.id])  # the run wrote the checkpoints
    for s in (ckpt2, ckpt3):
        assert (s.path / STAGE_META).is_file()
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4
    assert len({e.model_key for e in experiments.values()}) == 4

    # A rerun trains and evaluates nothing.
    mtimes = {s.id: s.path.stat().st_mtime for s in (run, ckpt2, ckpt3, tfns)}
    run_study(study, store, Console(quiet=True))
    assert {s.id: s.path.stat().st_mtime for s in (run, ckpt2, ckpt3, tfns)} == mtimes
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4
    assert sorted(trained()) == sorted([run.id, tfns.id])

    # A checkpoint folder gone (or a run cached before it kept checkpoints): that checkpoint
    # trains alone, to the same weights.
    before = weights(ckpt2.path, ckpt2.spec)
    import shutil

    shutil.rmtree(ckpt2.path)
    console = Console(record=True, width=200)
    run_study(study, Store(tmp_path / "other.sqlite"), console)
    assert "its run did not keep this checkpoint" in console.export_text()
    after = weights(ckpt2.path, ckpt2.spec)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert run.path.stat().st_mtime == mtimes[run.id]


def test_checkpoints_of_a_last_stage_are_evaluated(tmp_path):
    path = tmp_path / "kept.yaml"
    path.write_text("""
name: kept
model: tiny
seeds: [0, 1]
experiments:
  - name: cos
    stages:
      - {objective: sft, data: [{dataset: fpb}], steps: 8, schedule: cosine, checkpoint_every: 3}
""")
    study = load_study(path)
    names = [e.name for e in study.experiments]
    assert names == ["cos[seed=0]", "cos[steps=3,seed=0]", "cos[steps=6,seed=0]",
                     "cos[seed=1]", "cos[steps=3,seed=1]", "cos[steps=6,seed=1]"]
    assert study.experiments[1].axes == {"seed": 0, "steps": 3}
    experiments = {e.name: e for e in plan(study)}
    run = experiments["cos[seed=1]"].stages[0]
    assert (run.kind, run.spec.checkpoints) == ("run", (3, 6))
    kept = experiments["cos[steps=6,seed=1]"].stages[0]
    assert (kept.kind, kept.spec.steps, kept.spec.run_steps, kept.spec.seed) == ("checkpoint", 6, 8, 1)
    assert study_cost(list(experiments.values())).steps == 16  # one 8-step run per seed
