"""The domain-adaptation example: its plan validates (with a corpus built where it expects one),
and the report's decision table and forgetting plot read watched stages from the store."""

from __future__ import annotations

import json
import random

from cli_runner import run_taxon
from test_corpus import REPO_ROOT_EXAMPLE, prose

from taxon.report.forgetting import decision_table, forgetting_figure, trajectories
from taxon.study.store import Store


def test_example_plan_validates(tmp_path, data_dir):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"doc{i}.txt").write_text(prose(100 + i, lines=20))
    r = run_taxon("corpus", "build", src, "--out", tmp_path / "corpora" / "it-docs",
                  "--no-decontaminate", "--test-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    r = run_taxon("study", "plan", REPO_ROOT_EXAMPLE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "5 to train" in r.stdout and "llama(layers=4" in r.stdout
    # without the corpus: one line naming the fix, before anything runs
    r = run_taxon("study", "plan", REPO_ROOT_EXAMPLE, cwd=src)
    assert r.returncode == 2 and "taxon corpus build" in r.stderr


def _watch(base, log, stopped=None):
    final = log[-1] if stopped is None else next(p for p in log if p["step"] == stopped["kept_step"])
    return {"tasks": {"domain": "d", "general": "g"}, "limit": 4, "max_length": 32, "relative": True,
            "base": base, "start": {"domain": log[0]["domain"], "general": log[0]["general"]},
            "log": log, "stopped": stopped, "final": final, "verdict": final["verdict"]}


def _point(step, domain, general, base, verdict):
    return {"step": step, "domain": domain, "general": general, "domain_vs_start": 0.0,
            "general_vs_start": 0.0, "domain_vs_base": (domain - base["domain"]) / base["domain"],
            "general_vs_base": (general - base["general"]) / base["general"], "verdict": verdict}


def test_decision_table_and_figure(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    base = {"domain": 5.0, "general": 4.0}
    store.add_stage("b", "config:x", {}, "p", {"train_loss": 1})
    f_log = [_point(0, 5.0, 4.0, base, "excellent"), _point(20, 4.0, 4.1, base, "good")]
    store.add_stage("f", "b", {}, "p", {"watch": _watch(base, f_log)})
    rng = random.Random(0)
    s_log = [_point(0, 4.0, 4.1, base, "good"), _point(20, 3.5, 4.3, base, "acceptable"),
             _point(40, 3.2, 4.8, base, "forgetting: stop"), _point(60, 3.0 + rng.random(), 5.0, base,
                                                                    "forgetting: stop")]
    stop = {"step": 60, "kept_step": 20, "reason": "general loss +25.00% against the base"}
    store.add_stage("s", "f", {}, "p", {"watch": _watch(base, s_log, stop)})
    for name, stages in (("base", ["b"]), ("foundation", ["b", "f"]), ("hot", ["b", "f", "s"])):
        store.add_experiment("st", name, "m", "k", stages, {})
    rows = decision_table(store, "st")
    assert [r["experiment"] for r in rows] == ["base", "foundation", "hot"]
    assert rows[0]["verdict"] == "base" and rows[0]["general_loss"] == 4.0
    assert rows[1]["domain_vs_base"] == -0.2 and rows[1]["verdict"] == "good"
    hot = rows[2]
    assert hot["stopped"] and hot["verdict"] == "acceptable" and hot["steps"] == 20
    assert "kept step 20" in hot["why"]
    assert [r["choice"] for r in rows] == [False, False, True]  # lowest domain loss, not forgetting
    assert [p["x"] for p in trajectories(store, "st")["hot"]] == [0, 20, 20, 40, 60, 80]
    assert store.watch_log("s")[2]["verdict"] == "forgetting: stop"
    fig = forgetting_figure(store, "st")
    assert fig is not None and len(fig.axes) == 2
    fig.savefig(tmp_path / "f.png")
    assert forgetting_figure(store, "other") is None and decision_table(store, "other") == []
    json.dumps(rows)  # plain values, for the report's JSON
