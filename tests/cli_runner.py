"""`taxon ...` run in this process, as a user would from the shell: exit status, stdout and stderr.
A subprocess would cost a fresh Python with torch and transformers imported (about 5 s each on 2
cores); the command line itself is the same `taxon.cli.main`."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import pytest


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_taxon(*args, env: dict | None = None, cwd=None) -> Completed:
    from taxon import cli

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        if cwd is not None:
            mp.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Completed(code, out.getvalue(), err.getvalue())
