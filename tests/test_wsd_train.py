"""Training wsd stages on `tiny` (fp32): the learning rate follows warmup → constant → decay, and a
chain of segments (trunk 0→4, trunk 4→6, cooldown 6→8) ends with the weights of one uninterrupted
8-step run, for LoRA and for full fine-tuning. The segments are planned by `study.wsd` and trained
the way `study.run` trains a chain: each from its parent's checkpoint folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from taxon.config import DataRef, LoraSpec, StageSpec, WsdSegment
from taxon.errors import TaxonError
from taxon.models import STAGE_META, load_model, resolve_targets
from taxon.schedule import RESUME_FILES, resume_point
from taxon.study import wsd
from taxon.train import train_stage

COMMON = dict(steps=8, batch_size=2, lr=5e-3, warmup_ratio=0.3, schedule="wsd", decay_ratio=0.25,
              precision="fp32", seed=1)
MODES = {
    # LoRA dropout stays on (0.05), so the resumed segments also need the saved RNG states.
    "lora-sft": resolve_targets(StageSpec(objective="sft", data=(DataRef(dataset="fpb"),), max_length=128,
                                          lora=LoraSpec(r=4, alpha=8), **COMMON), "tiny"),
    "full-pretrain": StageSpec(
        objective="pretrain", max_length=64, lora=None,
        data=(DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation"),), **COMMON),
}
# Warmup 2 steps (0.3 × 8, and 0.3 × 5 for the 5-step run), plateau, then 2 cooldown steps with the
# 1-sqrt shape; the Trainer logs the rate each step used.
EXPECTED_LR = [5e-3 * f for f in (0.0, 0.5, 1, 1, 1, 1, 1, 1 - math.sqrt(0.5))]


class LrTrace(TrainerCallback):
    def __init__(self):
        self.steps, self.lrs = [], []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "learning_rate" in logs:
            self.steps.append(state.global_step)
            self.lrs.append(logs["learning_rate"])


@pytest.fixture(scope="module", params=sorted(MODES))
def runs(request, tmp_path_factory, data_dir):
    spec = MODES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    direct = LrTrace()
    train_stage(spec, "tiny", root / "direct", desc="wsd-direct", callbacks=[direct])
    # Durations 5 and 8 share the trunk 0→4; the 8-step run continues to 6 and cools down to 8.
    chain = wsd.chains(spec, [5, 8])[8]
    assert [(s.kind, s.spec.segment.start, s.spec.steps) for s in chain] == [
        ("trunk", 0, 4), ("trunk", 4, 2), ("cooldown", 6, 2)]
    location, folders, traces, figures = "tiny", [], [], []
    for i, step in enumerate(chain):
        trace, out = LrTrace(), root / f"segment{i}"
        figures.append(train_stage(step.spec, location, out, desc=step.note, callbacks=[trace]))
        location = str(out)
        folders.append(out)
        traces.append(trace)
    return spec, root / "direct", direct, folders, traces, figures


def weights(folder, spec):
    return load_file(folder / ("adapter_model.safetensors" if spec.lora else "model.safetensors"))


def test_wsd_lr_trace(runs):
    _, _, direct, _, traces, _ = runs
    assert direct.steps == list(range(1, 9))
    assert direct.lrs == pytest.approx(EXPECTED_LR, abs=1e-12)
    # The segments follow the same schedule, each from the step its parent stopped at.
    assert [t.steps for t in traces] == [[1, 2, 3, 4], [5, 6], [7, 8]]
    assert [lr for t in traces for lr in t.lrs] == pytest.approx(EXPECTED_LR, abs=1e-12)


def test_segments_reproduce_uninterrupted_run(runs):
    spec, direct, _, folders, _, figures = runs
    want = weights(direct, spec)
    got = weights(folders[-1], spec)
    assert want.keys() == got.keys()
    # Same weights, optimizer moments, scheduler position, RNG and data order: CPU fp32 gives
    # bit-identical weights here; the tolerance only allows for another BLAS's summation order.
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # The comparison can fail: the trunk alone is 2 steps short of those weights.
    trunk = weights(folders[1], spec)
    assert max((trunk[k] - want[k]).abs().max().item() for k in want) > 1e-4
    # Trunk segments keep the optimizer state their continuations need; cooldowns do not.
    for folder, keeps in zip(folders, (True, True, False), strict=True):
        assert all(any(folder.glob(f)) == keeps for f in RESUME_FILES[:4])
        assert json.loads((folder / STAGE_META).read_text())["base"] == "tiny"
    assert not (direct / "optimizer.pt").exists()
    direct_tokens = json.loads((direct / STAGE_META).read_text())["figures"]["tokens"]
    assert sum(f["tokens"] for f in figures) == direct_tokens
    # The cooldown checkpoint loads like any stage (LoRA merged onto the trunk's base).
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    a, _ = load_model(str(direct), device="cpu")
    b, _ = load_model(str(folders[-1]), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_segment_without_optimizer_state_is_refused(runs):
    spec, direct, *_ = runs
    late = spec.model_copy(update={"steps": 2, "segment": WsdSegment(
        start=8, stream_steps=10, warmup_steps=2, cooldown=True)})
    with pytest.raises(TaxonError, match=r"lacks optimizer.pt, .*delete that folder"):
        resume_point(late, str(direct))


STUDY = """
name: wsd-study
model: tiny
eval: {tasks: [sst2], limit: 4, batch_size: 4}
x-wsd: &wsd
  objective: sft
  data: [{dataset: fpb}]
  batch_size: 1
  max_length: 96
  schedule: wsd
  decay_ratio: 0.25
  warmup_ratio: 0.0
  precision: fp32
experiments:
  - {name: short, stages: [{<<: *wsd, steps: 3}]}
  - {name: long, stages: [{<<: *wsd, steps: 4}]}
"""


def test_study_trains_the_shared_trunk_once(tmp_path, monkeypatch, data_dir):
    """Through `study run`: the trunk 0→2 is trained once for both durations, each cooldown
    continues from the cached segment folders, and a rerun trains nothing."""

    from rich.console import Console
    from study_fixtures import fresh_cache

    from taxon.study.cost import duration_floor
    from taxon.study.load import load_study
    from taxon.study.plan import plan, unique_stages
    from taxon.study.run import run_study
    from taxon.study.store import Store

    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    study = load_study(path)
    short, long = plan(study)
    assert [(s.kind, s.spec.steps) for s in short.stages] == [("trunk", 2), ("cooldown", 1)]
    assert [(s.kind, s.spec.steps) for s in long.stages] == [("trunk", 2), ("trunk", 1), ("cooldown", 1)]
    assert short.stages[0].id == long.stages[0].id
    assert sum(s.spec.steps for s in unique_stages([short, long])) == 5  # instead of 3 + 4
    assert duration_floor([short, long]) == 4  # the floor: the 4-step run alone, no own cooldowns

    store = Store(tmp_path / "results.sqlite")
    run_study(study, store, Console(quiet=True))
    assert store.db.execute("SELECT COUNT(*) FROM stages").fetchone()[0] == 4
    trunk = short.stages[0].path
    assert (trunk / "optimizer.pt").is_file() and not (short.stages[1].path / "optimizer.pt").exists()
    seen = {s.id: json.loads((s.path / STAGE_META).read_text())["figures"]["tokens"]
            for s in unique_stages([short, long])}
    assert all(t > 0 for t in seen.values())
    mtime = trunk.stat().st_mtime
    run_study(study, store, Console(quiet=True))
    assert trunk.stat().st_mtime == mtime
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2
