"""What the comparisons against lm-evaluation-harness share: each side runs in a fresh process of
its own (so its peak resident set is its own), and lm-eval runs one task, written as YAML into a
temporary folder, with the one model method under test timed from inside `simple_evaluate`."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def spawn(script: str, side: str, model_dir: str, path: Path, batch_size: int, folder: Path) -> dict:
    """Run `script --child side ...` in a fresh interpreter; its figures, read back from JSON."""
    out = folder / f"{path.stem}-{side}.json"
    cmd = [sys.executable, script, "--child", side, "--model-dir", model_dir, "--items", str(path),
           "--batch-size", str(batch_size), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if side == "lmeval" else None)
    return json.loads(out.read_text())


def run_lmeval(model_dir: str, name: str, task_yaml: str, batch_size: int,
               method: str) -> tuple[list[dict], dict]:
    """lm-eval's hf backend on the task `name` (its YAML text), fp32 on the CPU. Returns the
    samples in document order and {seconds, rss_before_mb, peak_mb}, where seconds and the
    resident set before are taken around `method` (`loglikelihood`, `generate_until`) only."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="lmeval-tasks-"))
    (folder / f"{name}.yaml").write_text(task_yaml)
    lm = HFLM(pretrained=model_dir, dtype="float32", batch_size=batch_size, device="cpu")
    timing = {}
    inner = getattr(lm, method)

    def timed(requests, *a, **kw):
        timing["rss_before_mb"] = rss_mb()
        t0 = time.perf_counter()
        res = inner(requests, *a, **kw)
        timing["seconds"] = time.perf_counter() - t0
        return res

    setattr(lm, method, timed)
    results = lm_eval.simple_evaluate(model=lm, tasks=[name], log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(folder)))
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    return samples, {**timing, "peak_mb": peak_mb()}
