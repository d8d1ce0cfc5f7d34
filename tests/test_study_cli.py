"""`taxon study run` options: a bad one is one line, exit status 2, and no store is written."""

from __future__ import annotations

import pytest
from cli_runner import run_taxon
from study_fixtures import STUDY


@pytest.mark.parametrize("args, message", [
    (["--report-to", "neptune"], "error: --report-to neptune: unknown; use one of mlflow, wandb"),
    (["--workers", "0"], "error: --workers 0: give 1 or more"),
    (["--address", "10.0.0.1:6379"], "error: --address is for --executor ray"),
])
def test_bad_run_options_exit_2(tmp_path, args, message):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    r = run_taxon("study", "run", str(path), *args, cwd=tmp_path,
                  env={"TAXON_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 2
    assert r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "results").exists()
