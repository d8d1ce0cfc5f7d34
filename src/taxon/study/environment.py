"""What a run ran on: package versions, git commit, device, Python and OS, stored per run."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("taxon", "torch", "transformers", "trl", "peft", "datasets", "accelerate")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the repository holding taxon's source (with '+dirty' if it has edits), or
    None when taxon is installed from a wheel."""
    where = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def device() -> dict:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"type": "cuda", "count": len(names), "names": names, "cuda": torch.version.cuda}
    return {"type": "cpu", "count": 1, "names": [platform.processor() or platform.machine()],
            "threads": torch.get_num_threads()}


def environment() -> dict:
    from taxon.identity import machine_kind

    return {
        "machine": machine_kind(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(),
        "device": device(),
        "python": sys.version.split()[0],
        "os": platform.platform(),
        "host": platform.node(),
    }
