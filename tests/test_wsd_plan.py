"""The planner's durations rule: wsd durations share a trunk and branch into their own cooldowns;
other schedules give each duration its own run. Planning only, nothing is trained."""

from __future__ import annotations

import pytest
import yaml

from taxon.config import StageSpec
from taxon.errors import TaxonError
from taxon.identity import model_identity
from taxon.study.load import load_study
from taxon.study.plan import plan, stage_id, unique_stages

STUDY = """
name: durations
model: tiny
x-general: &general
  objective: pretrain
  data: [{dataset: wikitext, config: wikitext-103-raw-v1}]
  schedule: wsd
  decay_ratio: 0.1
  warmup_ratio: 0.01
x-sft: &sft {objective: sft, data: [{dataset: fpb}], steps: 100}
experiments:
  - {name: wsd-10k, stages: [{<<: *general, steps: 10000}, *sft]}
  - {name: wsd-25k, stages: [{<<: *general, steps: 25000}, *sft]}
  - {name: wsd-50k, stages: [{<<: *general, steps: 50000}, *sft]}
  - {name: wsd-50k-again, stages: [{<<: *general, steps: 50000}]}
  - {name: cos-10k, stages: [{<<: *general, schedule: cosine, decay_ratio: null, steps: 10000}]}
  - {name: cos-25k, stages: [{<<: *general, schedule: cosine, decay_ratio: null, steps: 25000}]}
  - {name: wsd-seed1-10k, stages: [{<<: *general, steps: 10000, seed: 1}]}
"""


@pytest.fixture
def experiments(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    return {e.name: e for e in plan(load_study(path))}


def spans(exp) -> list[tuple[str, int, int]]:
    return [(s.kind, s.spec.segment.start, s.spec.segment.start + s.spec.steps)
            for s in exp.stages if s.spec.segment]


def test_three_durations_share_one_trunk(experiments):
    e10, e25, e50 = experiments["wsd-10k"], experiments["wsd-25k"], experiments["wsd-50k"]
    assert spans(e10) == [("trunk", 0, 9000), ("cooldown", 9000, 10000)]
    assert spans(e25) == [("trunk", 0, 9000), ("trunk", 9000, 22500), ("cooldown", 22500, 25000)]
    assert spans(e50) == [("trunk", 0, 9000), ("trunk", 9000, 22500), ("trunk", 22500, 45000),
                          ("cooldown", 45000, 50000)]
    # Shared trunk segments are the same stages (same content hash); cooldowns are each their own.
    assert e10.stages[0].id == e25.stages[0].id == e50.stages[0].id
    assert e25.stages[1].id == e50.stages[1].id
    assert len({e10.stages[1].id, e25.stages[2].id, e50.stages[3].id}) == 3
    # The same experiment twice plans the same stages.
    assert [s.id for s in experiments["wsd-50k-again"].stages] == [s.id for s in e50.stages[:4]]
    # Each stage's parent is the previous segment; ids are hashes of spec + parent.
    for e in (e10, e25, e50):
        assert e.stages[0].parent == model_identity("tiny")
        for prev, cur in zip(e.stages, e.stages[1:], strict=False):
            assert cur.parent == prev.id
            assert cur.id == stage_id(cur.parent, cur.spec)
    # Every segment draws from the 50k run's stream and warms up for the 10k run's 100 steps.
    seg = e50.stages[3].spec.segment
    assert (seg.stream_steps, seg.warmup_steps, seg.cooldown) == (50000, 100, True)
    assert all(s.spec.segment.stream_steps == 50000 for s in e10.stages[:2])
    # The later SFT stage hangs off each duration's own cooldown.
    assert e10.stages[2].parent == e10.stages[1].id and e10.stages[2].kind == "run"
    assert e10.stages[2].id != e25.stages[3].id

    wsd_stages = {s.id: s for e in (e10, e25, e50) for s in e.stages if s.spec.segment}
    assert len(wsd_stages) == 6
    assert sum(s.spec.steps for s in wsd_stages.values()) == 45000 + 1000 + 2500 + 5000  # 53.5k
    assert sum(s.spec.steps for s in wsd_stages.values() if s.kind == "trunk") == 45000


def test_notes_say_which_rule_applies(experiments):
    e50 = experiments["wsd-50k"]
    assert [s.note for s in e50.stages] == [
        "wsd trunk 0→9000 (shared by 3 of 3 durations)",
        "wsd trunk 9000→22500 (shared by 2 of 3 durations)",
        "wsd trunk 22500→45000 (shared by 1 of 3 durations)",
        "wsd cooldown 45000→50000 (the 50000-step run)",
        "own run (cosine)",
    ]
    assert experiments["cos-10k"].stages[0].note == "own run (cosine)"
    single = experiments["wsd-seed1-10k"].stages[0]
    assert single.kind == "run" and single.note.startswith("own run (wsd; no other duration")


def test_other_schedules_and_other_specs_do_not_branch(experiments):
    c10, c25 = experiments["cos-10k"].stages, experiments["cos-25k"].stages
    assert len(c10) == len(c25) == 1 and c10[0].id != c25[0].id
    assert (c10[0].spec.steps, c25[0].spec.steps) == (10000, 25000)
    assert c10[0].spec.segment is None
    # A different seed is a different run: no trunk shared with the seed-0 family.
    single = experiments["wsd-seed1-10k"].stages
    assert len(single) == 1 and single[0].spec.segment is None and single[0].spec.steps == 10000
    total = sum(s.spec.steps for s in unique_stages(list(experiments.values())))
    assert total == 53500 + 3 * 100 + 10000 + 25000 + 10000


def test_wsd_fields_validate(tmp_path):
    spec = StageSpec(objective="sft", data=({"dataset": "fpb"},), schedule="wsd")
    assert spec.decay_ratio == 0.2  # the default is filled in, so it hashes like an explicit 0.2
    assert spec.canonical() == StageSpec(objective="sft", data=({"dataset": "fpb"},), schedule="wsd",
                                         decay_ratio=0.2).canonical()
    assert StageSpec(objective="sft", data=({"dataset": "fpb"},)).decay_ratio is None
    bad = yaml.safe_load(STUDY)
    bad["experiments"][4]["stages"][0]["decay_ratio"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(TaxonError, match=r"field 'experiments.4.stages.0': decay_ratio applies to "
                                         r"schedule 'wsd' only"):
        load_study(path)
    bad = yaml.safe_load(STUDY)
    bad["x-general"]["warmup_ratio"] = 0.95
    bad["experiments"][0]["stages"][0] = {**bad["x-general"], "steps": 10}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(TaxonError, match=r"warmup_ratio 0.95 \+ decay_ratio 0.1 exceed 1"):
        load_study(path)
