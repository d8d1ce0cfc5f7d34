"""Entry point for training one stage under a launcher, e.g. `accelerate launch` for DDP over
several GPUs: `accelerate launch --multi_gpu --num_processes 4 -m taxon.study.launch JOB.json`.

`study run --launcher "accelerate launch ..."` writes JOB.json (the stage spec, where training
starts, where the checkpoint goes) and runs this once per stage; every rank trains, the Trainer
synchronises gradients, and only the main process writes the checkpoint (train.train_stage).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from taxon.errors import TaxonError


def launch_stage(launcher: str, spec, base: str, out: str, desc: str,
                 report_to: tuple[str, ...], run_name: str | None, stage_id: str | None = None,
                 keep: dict[int, tuple[str, str]] | None = None) -> dict:
    """Run `launcher -m taxon.study.launch JOB` and return the figures it wrote."""
    from taxon.models import STAGE_META

    with tempfile.TemporaryDirectory(prefix="taxon-launch-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"spec": spec.model_dump(mode="json"), "base": base, "out": out,
                                   "desc": desc, "report_to": list(report_to),
                                   "run_name": run_name, "stage_id": stage_id,
                                   "keep": {str(k): v for k, v in (keep or {}).items()}}))
        cmd = [*shlex.split(launcher), "-m", "taxon.study.launch", str(job)]
        done = subprocess.run(cmd)
    meta = Path(out) / STAGE_META
    if done.returncode != 0 or not meta.is_file():
        raise TaxonError(f"stage launched with `{launcher}` failed (exit {done.returncode}); "
                         "its output is above; check the launcher command")
    return json.loads(meta.read_text())["figures"]


def main(argv: list[str]) -> None:
    from taxon.config import StageSpec
    from taxon.train import train_stage

    job = json.loads(Path(argv[0]).read_text())
    train_stage(StageSpec.model_validate(job["spec"]), job["base"], Path(job["out"]),
                desc=job["desc"], report_to=job["report_to"] or "none", run_name=job["run_name"],
                stage_id=job.get("stage_id"),
                keep={int(k): tuple(v) for k, v in (job.get("keep") or {}).items()})


if __name__ == "__main__":
    main(sys.argv[1:])
