"""Everything is validated before anything trains or is written: bad input through `taxon`,
`main.py` and study files is one line (or one line per problem), exit status 2, and leaves no
store, checkpoint or stage behind."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest
from study_fixtures import fresh_cache

from taxon import cli, seeds_cli
from taxon.study import store as store_module
from taxon.study.store import Store


@pytest.fixture
def sandbox(tmp_path, monkeypatch, data_dir):
    """A working folder and an empty stage cache: whatever a refused command wrote would be here.
    The models' converted copies (tiny, smollm2) are linked in so nothing is rebuilt."""
    monkeypatch.setenv("TAXON_CACHE_DIR", str(fresh_cache(tmp_path / "cache")))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def written(work: Path) -> list[str]:
    """What a command left in the working folder and the stage cache."""
    cache = work.parent / "cache"
    return sorted(str(p.relative_to(work.parent)) for p in [*work.rglob("*"), *cache.rglob("*")]
                  if "models" not in p.relative_to(work.parent).parts[:2] and p.name != "locks")


def taxon(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    return e.value.code, capsys.readouterr().err


def main_py(capsys, *args) -> tuple[int, str]:
    try:
        rc = seeds_cli.main(list(args))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
TRAIN = ["train", "--model", "tiny", "--dataset", "fpb", "--output", "out", "--steps", "2"]
MAIN = ["--model", "tiny", "--dataset", "takala/financial_phrasebank", "--max_steps", "2"]

BAD = [
    (taxon, ["eval", "--model", "tiny", "--tasks", "fpb", "--shots", "-1"], "shots"),
    (taxon, ["eval", "--model", "tiny", "--tasks", "fpb", "--limit", "0"], "limit"),
    (taxon, ["eval", "--model", "tiny", "--tasks", "fpb", "--batch-size", "0"], "batch_size"),
    (taxon, ["eval", "--model", "tiny", "--tasks", "fpb,nosuchtask"], "unknown eval task 'nosuchtask'"),
    (taxon, ["eval", "--model", "no-such-alias", "--tasks", "fpb"], "unknown model 'no-such-alias'"),
    (taxon, ["eval", "--model", "./no/such/folder", "--tasks", "fpb"], "unknown model"),
    (taxon, ["eval", "--model", "tiny", "--tasks", "fpb", "--precision", "fp16"], "precision"),
    (taxon, [*TRAIN, "--lr", "0"], "lr"),
    (taxon, [*TRAIN[:-1], "-5"], "steps"),
    (taxon, [*TRAIN, "--rate", "0.5"], "sum to 0.5"),
    (taxon, [*TRAIN, "--lora-r", "4", "--lora-alpha", "-1"], "alpha"),
    (taxon, [*TRAIN, "--warmup-ratio", "1.5"], "warmup_ratio"),
    (taxon, [*TRAIN, "--config", "nosuchconfig"], "no config 'nosuchconfig'"),
    (taxon, ["train", "--model", "tiny", "--dataset", "nosuch/data", "--output", "out"], "unknown dataset"),
    (taxon, ["train", "--model", "tiny", "--dataset", "tfns", "--output", "out", "--objective", "sft",
             "--as", "text"], "objective sft cannot use"),
    (main_py, [*MAIN[:-1], "-1"], "steps"),
    (main_py, [*MAIN, "--save_steps", "0"], "save_steps"),
    (main_py, [*MAIN, "--eval_limit", "0"], "limit"),
    (main_py, [*MAIN, "--eval_batch_size", "0"], "batch_size"),
    (main_py, [*MAIN, "--mixture_rates", "0.5", "0.5"], "--mixture_rates has 2 values"),
    (main_py, [*MAIN, "--dataset_config", "nosuchconfig"], "no config 'nosuchconfig'"),
    (main_py, [*MAIN, "--batch_size", "0"], "batch_size"),
    (main_py, [*MAIN, "--lora_r", "-2"], "lora"),
    (main_py, [*MAIN, "--eval_tasks", "fpb,nosuch"], "unknown eval task 'nosuch'"),
    (main_py, ["--model", "tiny", "--dataset", "tfns", "--eval_limit", "-3"], "limit"),
    (main_py, ["--model", "tiny", "--max_steps", "abc"], "invalid int value"),
    (taxon, ["study", "plan", str(QUICKSTART), "--mfu", "0"], "--mfu 0.0"),
    (taxon, ["study", "run", str(QUICKSTART), "--workers", "0"], "--workers 0"),
    (taxon, ["study", "run", str(QUICKSTART), "--address", "h:1"], "--address is for --executor ray"),
    (taxon, ["data", "show", "fpb", "-n", "0"], "-n 0"),
]


@pytest.mark.parametrize("command,args,message", BAD,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(BAD)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(sandbox, capsys, command, args, message):
    rc, err = command(capsys, *args)
    assert rc == 2, err
    assert message in one_line(err)
    assert written(sandbox) == []


def test_store_that_is_a_folder_or_not_sqlite(sandbox, capsys):
    (sandbox / "folder.sqlite").mkdir()
    rc, err = taxon(capsys, "eval", "--model", "tiny", "--tasks", "fpb", "--limit", "2",
                    "--store", "folder.sqlite")
    assert rc == 2 and "is a folder" in one_line(err)
    junk = sandbox / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    before = junk.read_bytes()
    rc, err = taxon(capsys, "eval", "--model", "tiny", "--tasks", "fpb", "--limit", "2", "--store",
                    str(junk))
    assert rc == 2 and "not a taxon results store" in one_line(err)
    assert junk.read_bytes() == before
    assert not (sandbox.parent / "cache" / "stages").exists()


def test_store_locked_past_the_timeout_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "r.sqlite"
    Store(path).close()
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(store_module, "LOCK_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(store_module.TaxonError, match="locked.*another process held it"):
            Store(path).start_run("r1", "s", "sequential", {})
    finally:
        holder.rollback()
        holder.close()


def test_train_output_that_is_a_file_or_a_foreign_folder(sandbox, capsys):
    (sandbox / "afile").write_text("keep me")
    rc, err = taxon(capsys, "train", "--model", "tiny", "--dataset", "fpb", "--output", "afile")
    assert rc == 2 and "is a file" in one_line(err)
    (sandbox / "mine").mkdir()
    (sandbox / "mine" / "notes.txt").write_text("keep me")
    rc, err = main_py(capsys, *MAIN, "--output_dir", "mine")
    assert rc == 2 and "other than a taxon checkpoint" in one_line(err)
    assert (sandbox / "afile").read_text() == (sandbox / "mine" / "notes.txt").read_text() == "keep me"
    assert not (sandbox.parent / "cache" / "stages").exists()


TYPOS = """\
name: typos
model: tiny
eval: {tasks: [fpb, nosuchtask], limit: 2}
experiments:
  - name: good
    stages:
      - {objective: sft, data: [{dataset: fpb}], steps: 2, batch_size: 2, max_length: 64}
  - name: late-typo
    stages:
      - {objective: sft, data: [{dataset: fpb}], steps: 2, batch_size: 2, max_length: 64}
      - {objective: sft, data: [{dataset: takala/financial_phrasebank_typo}], steps: 2}
      - {objective: pretrain, data: [{dataset: wikitext, config: no-such-config}], steps: 2}
      - {objective: sft, data: [{dataset: tfns, split: validation}], steps: 2}
      - {objective: sft, data: [{dataset: fpb, split: nosplit}], steps: 2}
"""


@pytest.mark.parametrize("verb", ["plan", "run"])
def test_a_typo_in_the_last_experiment_trains_nothing(sandbox, capsys, verb):
    (sandbox / "typos.yaml").write_text(TYPOS)
    rc, err = taxon(capsys, "study", verb, "typos.yaml")
    assert rc == 2, err
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert lines[0].endswith("has 5 problems; nothing was loaded or trained:"), err
    expected = [
        ("experiment 'late-typo' stage 2", "unknown dataset 'takala/financial_phrasebank_typo'"),
        ("experiment 'late-typo' stage 3", "has no config 'no-such-config'"),
        ("experiment 'late-typo' stage 4", "is scored by an eval task"),
        ("experiment 'late-typo' stage 5", "has no split 'nosplit'"),
        ("eval", "unknown eval task 'nosuchtask'"),
    ]
    for where, what in expected:
        assert any(ln.startswith(where) and what in ln for ln in lines[1:]), (where, err)
    assert written(sandbox) == ["work/typos.yaml"]


def test_plan_notes_unavailable_data_but_run_refuses_it(sandbox, capsys, monkeypatch, tmp_path):
    """A dataset the mirror lacks (and no Hub): `plan` still plans and says so; `run` refuses
    before training the experiments that could run."""
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("TAXON_DATA_DIR", str(empty))
    (sandbox / "s.yaml").write_text(textwrap.dedent("""\
        name: offline
        model: tiny
        eval: {tasks: [fpb], limit: 2}
        experiments:
          - name: zero-shot
            stages: []
          - name: sft
            stages: [{objective: sft, data: [{dataset: fpb}], steps: 2}]
    """))
    rc, err = taxon(capsys, "study", "plan", "s.yaml")
    assert rc == 0, err
    rc, err = taxon(capsys, "study", "run", "s.yaml")
    assert rc == 2 and "neither in the mirror nor on a reachable Hub" in err
    assert written(sandbox) == ["work/s.yaml"]
