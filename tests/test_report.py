"""The study's answer: arms over seeds, two-level intervals, comparisons, research questions and
the written report (HTML, Markdown, LaTeX, CSV, figures).

Stores here are real SQLite files written through `Store`, with predictions drawn so that the
truth is known: arms that differ only by noise, and arms that differ clearly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_runner import run_taxon
from sklearn.metrics import f1_score
from study_fixtures import fresh_cache

from taxon.config import QuestionSpec
from taxon.evals.evaluate import TaskResult
from taxon.evals.metrics import scalar_metrics
from taxon.report import stats
from taxon.report.arms import Scores, arms
from taxon.report.build import build
from taxon.report.questions import answer_all
from taxon.report.write import write
from taxon.study.load import arm_of
from taxon.study.store import Store

N = 300  # FPB-like items, three classes


def _gold(rng):
    return rng.integers(0, 3, N)


def _predict(gold, accuracy, rng):
    wrong = (gold + rng.integers(1, 3, N)) % 3
    return np.where(rng.random(N) < accuracy, gold, wrong)


def _add(store, study, name, gold, pred, seed=None, stages=(), model="tiny", settings=None):
    key = f"model-{name}"
    result = TaskResult(
        "fpb",
        N,
        970,
        0,
        {
            "macro_f1": {"value": float(f1_score(gold, pred, average="macro")), "low": 0, "high": 1},
            "accuracy": {"value": float((gold == pred).mean()), "low": 0, "high": 1},
            "per_class": {"negative": {}, "neutral": {}, "positive": {}},
            "settings": settings or {"precision": "fp32"},
        },
        [
            {"idx": i, "gold": int(g), "pred": int(p), "scores": [0.0, 0.0, 0.0]}
            for i, (g, p) in enumerate(zip(gold, pred, strict=True))
        ],
    )
    store.add_result(key, "ek-" + key, result)
    spec = {"name": name, "stages": list(stages)}
    if seed is not None:
        spec["axes"] = {"seed": seed}
    store.add_experiment(study, name, model, key, [], spec, ["ek-" + key])


def _store(tmp_path, accuracies: dict[str, float], seeds=(0, 1, 2), seed=0) -> Store:
    """Arms named by `accuracies`, each on `seeds` (one seed for the zero-shot arm), all scored on
    the same gold labels."""
    rng = np.random.default_rng(seed)
    gold = _gold(rng)
    store = Store(tmp_path / "s.sqlite")
    for arm, acc in accuracies.items():
        if arm == "zero-shot":
            _add(store, "st", arm, gold, _predict(gold, acc, rng))
            continue
        for s in seeds:
            _add(
                store,
                "st",
                f"{arm}[seed={s}]",
                gold,
                _predict(gold, acc, rng),
                seed=s,
                stages=[{"objective": "sft"}],
            )
    return store


def test_arm_of_strips_only_the_seed():
    assert arm_of("lora[seed=2]") == "lora"
    assert arm_of("sequential[qwen2,task=fpb,seed=10]") == "sequential[qwen2,task=fpb]"
    assert arm_of("direct_finetuning[seed=0,task=fpb]") == "direct_finetuning[task=fpb]"
    assert arm_of("zero-shot") == "zero-shot"
    assert arm_of("x[seeds=1]") == "x[seeds=1]"


def test_arms_group_seeds_and_score_from_predictions(tmp_path):
    store = _store(tmp_path, {"zero-shot": 0.4, "a": 0.7})
    groups = {a.name: a for a in arms(store, "st")}
    assert set(groups) == {"zero-shot", "a"}
    assert groups["a"].seeds == [0, 1, 2] and groups["zero-shot"].seeds == [None]
    scores = Scores(store, "st")
    s = scores.score(groups["a"], "fpb")
    assert s.metric == "macro_f1" and len(s.per_seed) == 3 and s.n_items == N
    for exp, v in zip(groups["a"].experiments, s.per_seed, strict=True):  # recomputed = stored
        stored = store.experiment_results(exp)[0]["metrics"]["macro_f1"]["value"]
        assert v == pytest.approx(stored, abs=1e-12)
    assert s.low < s.mean < s.high
    # the two-level interval is wider than any one seed's item-only interval would suggest alone
    assert s.high - s.low > 0.02


def test_noise_only_arms_get_not_enough_evidence(tmp_path):
    store = _store(tmp_path, {"zero-shot": 0.4, "a": 0.6, "b": 0.6}, seed=3)
    scores = Scores(store, "st")
    (ans,) = answer_all(scores, [QuestionSpec(id="ab", compare=("a", "b"))])
    assert ans.answer.startswith("not enough evidence")
    assert not ans.supported
    assert "Wilcoxon over 3 seeds cannot go below p = 0.25" in ans.answer
    deciding = [r for r in ans.rows if r.decides]
    assert len(deciding) == 1 and deciding[0].comparison.p_adjusted >= 0.05
    tests = {r.comparison.test for r in ans.rows}
    assert {"paired_bootstrap", "wilcoxon", "paired_t", "mcnemar_exact"} <= tests


def test_clear_difference_is_claimed_with_holm(tmp_path):
    store = _store(tmp_path, {"zero-shot": 0.35, "a": 0.8, "b": 0.55}, seed=4)
    scores = Scores(store, "st")
    lift, ab, three = answer_all(
        scores,
        [
            QuestionSpec(id="lift", compare=("a", "zero-shot")),
            QuestionSpec(id="ab", compare=("b", "a")),
            QuestionSpec(id="all", compare=("a", "b", "zero-shot")),
        ],
    )
    assert lift.supported and lift.answer.startswith("a beats zero-shot on fpb")
    assert ab.supported and "a beats b on fpb" in ab.answer  # the second arm wins: named first
    deciding = [r.comparison for r in lift.rows if r.decides]
    assert deciding[0].p_adjusted is not None and deciding[0].p_adjusted < 0.05
    assert deciding[0].effect_low > 0
    # Friedman over 3 seeds (zero-shot repeated in each block), Nemenyi pairs, average ranks
    assert three.rows and three.rows[0].comparison.test == "friedman"
    info = next(iter(three.ranks.values()))
    assert min(info["ranks"], key=info["ranks"].get) == "a"
    assert info["cd"] == pytest.approx(stats.critical_difference(3, 3))


def test_holm_family_is_per_question(tmp_path):
    store = _store(tmp_path, {"zero-shot": 0.35, "a": 0.5, "b": 0.52}, seed=5)
    scores = Scores(store, "st")
    (ans,) = answer_all(scores, [QuestionSpec(id="q", compare=("a", "b"), tasks=("fpb",))])
    deciding = [r.comparison for r in ans.rows if r.decides]
    expected = stats.holm([stats.Comparison("x", 1, 0, c.p) for c in deciding])
    assert [c.p_adjusted for c in deciding] == [e.p_adjusted for e in expected]


def test_two_level_bootstrap_with_one_seed_is_the_item_bootstrap():
    rng = np.random.default_rng(0)
    gold = _gold(rng)
    a, b = _predict(gold, 0.7, rng), _predict(gold, 0.6, rng)
    f1 = scalar_metrics(3)["macro_f1"]
    fa = [lambda idx: f1(gold[idx], a[idx], None)]
    fb = [lambda idx: f1(gold[idx], b[idx], None)]
    two = stats.paired_two_level_bootstrap(fa, fb, N, 2000, seed=1)
    one = stats.paired_bootstrap(gold, a, b, "macro_f1", 2000, seed=1)
    assert two.effect == pytest.approx(one.effect, abs=1e-12)
    assert two.effect == pytest.approx(
        f1_score(gold, a, average="macro") - f1_score(gold, b, average="macro")
    )
    assert two.effect_low == pytest.approx(one.effect_low, abs=0.02)
    assert two.effect_high == pytest.approx(one.effect_high, abs=0.02)


def test_report_files_and_tables(tmp_path):
    store = _store(tmp_path, {"zero-shot": 0.35, "a": 0.8, "b": 0.55}, seed=6)
    rep = build(store, "st", [QuestionSpec(id="lift", compare=("a", "zero-shot"))])
    html = write(rep, tmp_path / "out", store.path)
    out = html.parent
    for name in (
        "report.html",
        "report.md",
        "answers.json",
        "tables/summary.csv",
        "tables/summary.tex",
        "tables/compute.csv",
        "tables/comparisons.csv",
        "figures/heatmap.png",
        "figures/heatmap.svg",
        "figures/pareto.png",
    ):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "tables/summary.csv")
    row = summary[summary.arm == "a"].iloc[0]
    assert row.seeds == 3 and row.ci_low < row["mean"] < row.ci_high
    assert row.gain == pytest.approx(row["mean"] - summary[summary.arm == "zero-shot"].iloc[0]["mean"])
    assert "\\toprule" in (out / "tables/summary.tex").read_text()  # booktabs
    answers = json.loads((out / "answers.json").read_text())["answers"]
    assert answers[0]["id"] == "lift" and answers[0]["supported"]
    comparisons = pd.read_csv(out / "tables/comparisons.csv")
    assert {"test", "n", "statistic", "p", "p_holm", "effect"} <= set(comparisons.columns)
    page = html.read_text()
    assert "data:image/png;base64," in page and "http" not in page.split("<body>")[1].split("Written")[0]


def test_taxon_report_command_and_bad_study(tmp_path):
    store = _store(tmp_path, {"zero-shot": 0.35, "a": 0.8}, seed=7)
    store.close()
    r = run_taxon("report", tmp_path / "s.sqlite", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "rep" / "report.html").is_file()
    assert "lift:a: a beats zero-shot on fpb" in r.stdout  # the default question: arm vs zero-shot
    bad = run_taxon("report", tmp_path / "s.sqlite", "--study", "nope", "--out", tmp_path / "rep2")
    assert bad.returncode == 2 and "study 'nope' is not in" in (bad.stdout + bad.stderr)
    assert not (tmp_path / "rep2").exists()


def _chromium() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "no headless browser: install Debian's `chromium` package (.ci/run and `make test` do, as root)"
        )
    return path


def test_demo_report_renders_in_headless_chromium(tmp_path, data_dir, monkeypatch):
    """The demo's own study file (examples/quickstart.yaml: 3 seeds, its questions), shrunk to the
    `tiny` model and a few steps, run as a user would; its report opened in headless Chromium."""
    import subprocess

    import yaml
    from conftest import REPO_ROOT

    study = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    study["model"] = "tiny"
    study["eval"].update(limit=24, tasks=["fpb", "sst2"])
    for exp in study["experiments"]:
        for stage in exp["stages"]:
            stage.update(steps=2, batch_size=2)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(study))
    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    r = run_taxon("study", "run", path, "--out", tmp_path / "report", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rq1: " in r.stdout and "lift: " in r.stdout and "report: " in r.stdout
    page = tmp_path / "report" / "report.html"
    dom = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'data-checked="yes"' in dom  # the page's own script ran after every image loaded
    figures = dom.count("<figure")
    assert figures >= 3 and dom.count('data-drawn="yes"') == figures  # heatmap, Pareto, CD diagram
    for section in ("questions", "summary", "compute", "comparisons", "figures", "experiments"):
        assert f'id="{section}"' in dom
    assert dom.count("<table") >= 3
    for arm in ("zero-shot", "lora-sft", "dapt+lora-sft"):
        assert f"<td>{arm}</td>" in dom
    assert 'id="q-lift"' in dom and 'id="q-rq1"' in dom
    assert 'id="q-rank"' in dom and 'id="fig-cd-rank' in dom  # the Friedman question's diagram
    for test in ("paired_bootstrap", "wilcoxon", "paired_t", "mcnemar_exact", "friedman"):
        assert f"<td>{test}</td>" in dom


def test_api_arm_is_the_large_model_reference(tmp_path):
    rng = np.random.default_rng(8)
    gold = _gold(rng)
    store = Store(tmp_path / "s.sqlite")
    _add(store, "st", "zero-shot", gold, _predict(gold, 0.4, rng))
    api_pred = _predict(gold, 0.9, rng)
    api_pred[:10] = -1  # unparsed replies
    _add(
        store,
        "st",
        "gpt",
        gold,
        api_pred,
        model="api:openai/gpt-4o",
        settings={
            "precision": "fp32",
            "prompt_example": "[user]\nWhat is the sentiment ...",
            "api": {
                "method": "constrained-choice",
                "unparsed": 10,
                "prompt_tokens": 1200,
                "completion_tokens": 300,
                "cost_usd": 0.01,
            },
        },
    )
    rep = build(store, "st", [])
    lm = rep.large_models.iloc[0]
    assert lm.model == "api:openai/gpt-4o" and lm.unparsed == 10 and lm.method == "constrained-choice"
    assert "GPT-4" in lm.published  # the published score stands beside it
    zs = rep.summary[rep.summary.arm == "zero-shot"].iloc[0]
    api_mean = rep.summary[rep.summary.arm == "gpt"].iloc[0]["mean"]
    assert zs.pct_of_reference == pytest.approx(100 * zs["mean"] / api_mean)  # the API arm is the yardstick
    page = write(rep, tmp_path / "out", store.path).read_text()
    assert 'id="large-models"' in page and "What is the sentiment" in page


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("questions:\n  - {id: q, compare: [lora-sft, nope]}\n", "question q: no arm named 'nope'"),
        ("questions:\n  - {id: q, compare: [lora-sft, zero-shot], tasks: [sst2]}\n",
         "question q: task 'sst2' is not evaluated"),
        ("questions:\n  - {id: q, compare: [lora-sft]}\n", "two or more arms"),
        ("seeds: [0, 0]\n", "field 'seeds'"),
    ],
)
def test_bad_questions_and_seeds_stop_before_training(tmp_path, data_dir, extra, message):
    study = tmp_path / "s.yaml"
    study.write_text(
        "name: s\nmodel: tiny\nseeds: [0, 1]\neval: {tasks: [fpb], limit: 8}\nexperiments:\n"
        "  - {name: zero-shot, stages: []}\n"
        "  - name: lora-sft\n    stages: [{objective: sft, data: [{dataset: takala/financial_phrasebank}],"
        " steps: 1, batch_size: 2}]\n" + extra.replace("seeds: [0, 0]\n", "")
    )
    if extra.startswith("seeds"):
        study.write_text(study.read_text().replace("seeds: [0, 1]", "seeds: [0, 0]"))
    r = run_taxon("study", "run", study, cwd=tmp_path, env={"TAXON_CACHE_DIR": str(tmp_path / "cache")})
    out = r.stdout + r.stderr
    assert r.returncode == 2 and message in out, out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache" / "stages").exists()
