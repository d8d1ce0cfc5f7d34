"""Watched stages: domain and general loss at step 0 and every N steps, classified against the
base; a run beyond the threshold for `patience` points stops and keeps the last good weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from taxon import watch
from taxon.config import DataRef, StageSpec, WatchSpec
from taxon.errors import TaxonError
from taxon.models import STAGE_META
from taxon.study.store import Store
from taxon.train import train_stage


def stage(steps: int, **watch_kw) -> StageSpec:
    return StageSpec(objective="pretrain", lora=None, steps=steps, batch_size=2, lr=1e-3,
                     warmup_ratio=0.0, max_length=32, schedule="constant",
                     data=(DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation"),),
                     watch=WatchSpec(**{"every": 2, "limit": 2, "max_length": 32, **watch_kw}))


def test_logs_step_zero_and_every_n_with_changes(tmp_path, data_dir):
    figures = train_stage(stage(5, stop=False), "tiny", tmp_path / "a", desc="watched")
    w = figures["watch"]
    assert [r["step"] for r in w["log"]] == [0, 2, 4, 5]  # and where the stage ended
    first = w["log"][0]
    assert first["domain_vs_start"] == 0 and first["general_vs_base"] == 0  # its own start is the base
    assert w["base"] == w["start"] and all(r["general"] > 0 for r in w["log"])
    last = w["log"][-1]
    assert last["general_vs_start"] == pytest.approx((last["general"] - first["general"]) / first["general"])
    assert w["stopped"] is None and w["verdict"] == last["verdict"]
    meta = json.loads((tmp_path / "a" / STAGE_META).read_text())
    assert meta["figures"]["watch"]["log"] == w["log"]  # a reused cached stage still has it
    store = Store(tmp_path / "s.sqlite")
    store.add_stage("sid", "tiny", {}, str(tmp_path / "a"), figures)
    rows = store.watch_log("sid")
    assert [r["step"] for r in rows] == [0, 2, 4, 5] and rows[0]["verdict"] == w["log"][0]["verdict"]
    # a watched child inherits the base its parent measured
    child = train_stage(stage(2, stop=False), str(tmp_path / "a"), tmp_path / "b", desc="child")
    assert child["watch"]["base"] == w["base"] and child["watch"]["start"] != w["base"]


def test_forgetting_stops_with_patience_and_keeps_the_last_good_weights(tmp_path, data_dir,
                                                                       monkeypatch):
    # general loss: fine at 0 and 2, 20% worse from step 4 on: bad at 4 and 6 -> stop at 6, keep 2
    script = iter([5.0, 5.0, 6.0, 6.0, 6.0, 6.0])
    monkeypatch.setattr(watch.Watcher, "measure",
                        lambda self, model: {"domain": 4.0, "general": next(script)})
    kept = {}
    real_keep = watch.Watcher._keep

    def keep(self, model, step):
        real_keep(self, model, step)
        kept[step] = {k: v.clone() for k, v in self.snapshot.items()}

    monkeypatch.setattr(watch.Watcher, "_keep", keep)
    figures = train_stage(stage(12, patience=2), "tiny", tmp_path / "s", desc="stops")
    w = figures["watch"]
    assert [r["step"] for r in w["log"]] == [0, 2, 4, 6]
    assert [r["verdict"] for r in w["log"]] == ["excellent", "excellent", watch.FORGETTING,
                                                watch.FORGETTING]
    assert w["stopped"]["step"] == 6 and w["stopped"]["kept_step"] == 2
    assert "+20.00% against the base beyond acceptable (10.00%)" in w["stopped"]["reason"]
    assert w["verdict"] == "excellent"  # the kept point's
    saved = load_file(tmp_path / "s" / "model.safetensors")
    compared = [n for n in kept[2] if n in saved]
    assert len(compared) >= len(kept[2]) - 1  # a tied lm_head is saved once
    for name in compared:
        assert torch.equal(saved[name], kept[2][name]), name
    assert any(not torch.equal(kept[0][n], kept[2][n]) for n in compared)  # it did train
    assert set(kept) == {0, 2}


def test_bad_watch_is_refused_before_training():
    with pytest.raises(TaxonError, match="watch a perplexity task"):
        watch.check(WatchSpec(tasks={"domain": "fpb", "general": "eval_general"}))
    with pytest.raises(ValueError, match="excellent <= good <= acceptable"):
        WatchSpec(thresholds={"excellent": 0.2, "good": 0.1, "acceptable": 0.3})
    with pytest.raises(ValueError, match="wsd"):
        StageSpec(objective="pretrain", data=(DataRef(dataset="wikitext"),), schedule="wsd",
                  watch=WatchSpec())
    # an unwatched stage keeps its identity: the field is left out of the canonical spec
    plain = StageSpec(objective="pretrain", data=(DataRef(dataset="wikitext"),))
    assert "watch" not in plain.canonical()
