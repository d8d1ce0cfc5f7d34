"""The command line: bad input gets one line and exit status 2."""

from __future__ import annotations

import pytest
from cli_runner import run_taxon


def taxon(*args, env=None):
    return run_taxon(*args, env=env)


def test_eval_unreachable_model_is_one_line_exit_2(data_dir):
    r = taxon("eval", "--model", "gpt2", "--tasks", "fpb", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "gpt2" in lines[0] and "local folder" in lines[0]


@pytest.mark.parametrize("args", [["data", "show", "no/such-dataset"],
                                  ["eval", "--model", "tiny", "--tasks", "nosuchtask"]])
def test_unknown_names_exit_2(args, data_dir):
    r = taxon(*args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_data_show_renders_text_and_pair(data_dir):
    r = taxon("data", "show", "fpb", "-n", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("prompt:") == 2 and "completion:" in r.stdout
