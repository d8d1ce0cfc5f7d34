"""The seeds' command line: every command of issue 3 item 5, run through main.py's entry point on
`tiny-gpt2` (GPT-2's shape and tokenizer behaviour, as the commands name gpt2), in a temporary
folder (./checkpoints and results/ land there) over the mirror plus the Hub-schema fixtures for the
datasets the mirror lacks (conftest's merged_data_dir)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shlex
from pathlib import Path

import pytest

from taxon.identity import model_identity as model_key
from taxon.models import STAGE_META, load_model
from taxon.seeds_cli import default_output_dir, parser, plan_run, tasks_for
from taxon.study.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]

# The commands of issue 3 item 5, verbatim, one a line.
COMMANDS = (REPO_ROOT / "tests" / "fixtures" / "seed_commands.txt").read_text().strip().splitlines()

# What each command must mean: (datasets, configs, rates, mode, steps, eval tasks it must include).
EXPECTED = [
    (["gbharti/finance-alpaca"], [None], [None], "pretrain", 2000, set()),
    (["wikitext"], ["wikitext-103-raw-v1"], [None], "pretrain", 2000, {"eval_general"}),
    (["gbharti/finance-alpaca", "LLukas22/fiqa"], [None, None], [0.7, 0.3], "pretrain", 2000, set()),
    (["openai/gsm8k", "open-web-math/open-web-math"], ["main", None], [0.4, 0.6], "pretrain", 2000,
     {"gsm8k"}),
    (["zeroshot/twitter-financial-news-sentiment"], [None], [None], "sft", 1000, {"tfns"}),
    (["openai/gsm8k"], ["main"], [None], "sft", 800, {"gsm8k"}),
    (["glue"] * 3, ["sst2", "cola", "mrpc"], [0.4, 0.3, 0.3], "sft", 1200, {"sst2"}),
    (["zeroshot/twitter-financial-news-sentiment", "takala/financial_phrasebank",
      "FinGPT/fingpt-sentiment-train"], [None] * 3, [0.4, 0.3, 0.3], "sft", 100,
     {"tfns", "fpb", "eval_domain"}),
    (["gbharti/finance-alpaca"], [None], [None], "pretrain", 1000, set()),
    (["zeroshot/twitter-financial-news-sentiment"], [None], [None], "sft", 500, {"tfns"}),
    (["stanfordnlp/imdb"], [None], [None], None, 0, {"imdb"}),
]


def verbatim(i: int) -> list[str]:
    """Command i as the issue writes it, with `--model gpt2` -> `--model tiny-gpt2`."""
    argv = shlex.split(COMMANDS[i])[2:]
    return ["tiny-gpt2" if a == "gpt2" else a for a in argv]


def fast(i: int) -> list[str]:
    """The verbatim arguments plus overrides that keep the suite fast: argparse's last value wins,
    so these replace the commands' step counts and sizes (the meaning is checked on the verbatim
    arguments). The first command also keeps intermediate checkpoints."""
    argv = verbatim(i)
    if "--evaluation_only" in argv:
        return [*argv, "--eval_limit", "4"]
    sft = "sft" in argv
    gsm8k_sft = sft and "openai/gsm8k" in argv  # its worked answers need room
    extra = ["--max_steps", "3", "--batch_size", "2", "--eval_limit", "4",
             "--max_length", "256" if gsm8k_sft else "128" if sft else "64"]
    if i == 0:
        extra += ["--save_steps", "1", "--save_total_limit", "2"]
    return argv + extra


def entry():
    """main.py's own entry point, loaded from the file as `python main.py` would run it."""
    return runpy.run_path(str(REPO_ROOT / "main.py"), run_name="seeds_main")["main"]


@pytest.fixture(scope="module")
def runs(merged_data_dir, tmp_path_factory):
    """All eleven commands in order (the tenth starts from the ninth's checkpoint)."""
    work = tmp_path_factory.mktemp("seeds")
    main = entry()
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAXON_DATA_DIR", str(merged_data_dir))
        mp.chdir(work)
        for i in range(len(COMMANDS)):
            run = None
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = main(fast(i))
                if rc == 0:
                    run = plan_run(parser().parse_args(verbatim(i)))
            out.append({"rc": rc, "run": run, "stdout": stdout.getvalue(),
                        "stderr": stderr.getvalue(), "work": work})
    return out


PARAMS = [pytest.param(i, id=f"cmd{i + 1}") for i in range(10)] + [pytest.param(10, id="cmd11-imdb")]


@pytest.mark.parametrize("i", PARAMS)
def test_seed_command(runs, i):
    r = runs[i]
    assert r["rc"] == 0, r["stderr"][-2000:]
    datasets, configs, rates, mode, steps, must_eval = EXPECTED[i]
    run = r["run"]
    stage = run.stage
    if mode is None:  # --evaluation_only: nothing is trained
        assert stage is None and run.output_dir is None
        location = run.model
    else:
        assert stage.objective == mode and stage.steps == steps
        assert [d.dataset for d in stage.data] == datasets
        assert [d.config for d in stage.data] == configs
        assert [d.rate for d in stage.data] == rates
        assert stage.lora is not None and stage.adapter == "merge"
        assert stage.mix_by == "auto" and stage.by_tokens() == (mode == "pretrain")
        location = str(run.output_dir)
        assert run.output_dir.parent == r["work"] / "checkpoints"
        meta = json.loads((run.output_dir / STAGE_META).read_text())
        assert meta["spec"]["steps"] == 3  # the fast override won
        assert meta["figures"]["tokens"] > 0
    assert set(run.tasks) == set(tasks_for(datasets, configs)) >= must_eval
    if not run.tasks:
        assert "no eval task uses dataset" in r["stdout"]
        assert not (r["work"] / "results" / "taxon.sqlite").exists() or not Store(
            r["work"] / "results" / "taxon.sqlite").results(model_key(location))
        return
    stored = Store(r["work"] / "results" / "taxon.sqlite").results(model_key(location))
    assert {x["task"] for x in stored} == set(run.tasks)
    # --eval_limit 4 (a fixture split may hold fewer items; perplexity counts windows)
    assert all(x["n"] == min(4, x["n_total"]) for x in stored if get_output(x["task"]) != "perplexity")
    for task in run.tasks:
        assert f"| {run.name} | {task}" in r["stdout"]  # the printed results table


def get_output(task: str) -> str:
    from taxon.evals.tasks import get_task

    return get_task(task).output


def test_output_dirs_and_the_chained_stage(runs):
    work = runs[0]["work"]
    assert runs[0]["run"].output_dir == work / "checkpoints" / "tiny-gpt2_finance-alpaca_pretrain"
    assert runs[6]["run"].output_dir.name == "tiny-gpt2_glue-sst2+glue-cola+glue-mrpc_sft"
    assert runs[8]["run"].output_dir == work / "checkpoints" / "gpt2_finance_pretrain"
    tenth = runs[9]["run"]
    assert tenth.model == str(work / "checkpoints" / "gpt2_finance_pretrain")
    assert tenth.output_dir.name == "gpt2_finance_pretrain_twitter-financial-news-sentiment_sft"
    meta = json.loads((tenth.output_dir / STAGE_META).read_text())
    # The LoRA adapter's base is the cached stage the ninth command's folder is a copy of (same
    # identity), not that folder: the chain loads even after the folder is moved or deleted.
    base = json.loads((Path(meta["base"]) / STAGE_META).read_text())
    assert Path(meta["base"]).parent.name == "stages" and base["id"] == model_key(tenth.model)
    load_model(str(tenth.output_dir), device="cpu")


def test_intermediate_checkpoints_are_kept_and_load(runs):
    out = runs[0]["run"].output_dir
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-3"]  # --save_total_limit 2 of 3 saves
    assert (out / STAGE_META).is_file() and (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "checkpoint-2" / STAGE_META).read_text())
    assert meta["base"] == "tiny-gpt2" and meta["figures"]["step"] == 2
    load_model(str(out / "checkpoint-2"), device="cpu")


@pytest.mark.parametrize("args, message", [
    ("--datasets fpb tfns --mixture_rates 0.5 --mode sft",
     "--mixture_rates has 1 values for 2 dataset(s)"),
    ("--datasets fpb tfns --dataset_configs None --mode sft",
     "--dataset_configs has 1 values for 2 dataset(s)"),
    ("--datasets fpb tfns --mixture_rates 0.5 0.6 --mode sft", "sum to 1.1, not 1"),
    ("--datasets fpb tfns --mixture_rates -0.1 1.1 --mode sft", "must be between 0 and 1"),
    ("--dataset no/such --mode sft", "unknown dataset 'no/such'"),
    ("--dataset glue --dataset_config nope --mode sft", "has no config 'nope'"),
    ("--dataset fpb --mode mixed", "give dataset 'fpb' `as: text`"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.chdir(tmp_path)
    rc = entry()(["--model", "tiny", *shlex.split(args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and "\n" not in err and err.startswith("error:")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results").exists()


def test_missing_checkpoint_folder_is_one_line(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.chdir(tmp_path)
    rc = entry()(["--model", "./checkpoints/nope", "--dataset", "fpb"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no such folder" in err and "\n" not in err


def test_default_output_dir_and_task_matching():
    assert default_output_dir("gpt2", ["gbharti/finance-alpaca", "LLukas22/fiqa"], [None, None],
                              "pretrain").as_posix() == "checkpoints/gpt2_finance-alpaca+fiqa_pretrain"
    # GLUE's configs are different tasks: only the trained config's task is chosen.
    from taxon.data.cards import get_card
    from taxon.evals.tasks import get_task

    chosen = tasks_for(["glue"], ["sst2"])
    assert "sst2" in chosen
    assert all(get_card(get_task(t).dataset).id == "nyu-mll/glue" and get_task(t).config == "sst2"
               for t in chosen)
    # A card with configs of one task (FPB's agreement levels): every task on the card.
    assert {"fpb", "eval_domain"} <= set(tasks_for(["fpb"], ["sentences_allagree"]))
    assert os.path.basename(str(default_output_dir("tiny", ["glue"] * 2, ["sst2", "cola"], "sft"))) \
        == "tiny_glue-sst2+glue-cola_sft"


def test_mixed_objective_from_the_command_line(merged_data_dir, tmp_path, monkeypatch, capsys):
    """Pretraining text and SFT pairs in one stage, 0.3 / 0.7, trained and evaluated."""
    monkeypatch.setenv("TAXON_DATA_DIR", str(merged_data_dir))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--datasets", "wikitext", "fpb", "--dataset_configs",
            "wikitext-103-raw-v1", "None", "--mixture_rates", "0.3", "0.7", "--dataset_as", "text",
            "pair", "--mode", "mixed", "--max_steps", "2", "--batch_size", "5", "--max_length", "128",
            "--eval_tasks", "fpb", "--eval_limit", "4"]
    assert entry()(argv) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "checkpoints" / "tiny_wikitext+fpb_mixed"
    meta = json.loads((folder / STAGE_META).read_text())
    parts = meta["figures"]["mixture"]
    text, pair = parts["wikitext:wikitext-103-raw-v1:train"], parts["fpb:default:train"]
    assert (text["as"], text["examples"], pair["as"], pair["examples"]) == ("text", 3, "pair", 7)
    assert text["loss_tokens"] == text["tokens"] == 3 * 128
    assert pair["loss_tokens"] < pair["tokens"]
    assert meta["figures"]["final_loss"] > 0
    assert "rate 0.30 as text: 3 sequences" in out and "| tiny_wikitext+fpb_mixed | fpb" in out
