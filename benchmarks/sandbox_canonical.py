"""Run a code task's reference solutions through the sandbox: every one must pass.

    python benchmarks/sandbox_canonical.py [--task code] [--workers N]

Prints the guards in force, the outcome counts, wall time and seconds per program (target: all
pass, under 0.5 s per program). Reads the task's split from the data mirror (TAXON_DATA_DIR).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.sources import load_rows
from taxon.evals import execution
from taxon.evals.generation import extract
from taxon.evals.sandbox import Limits, default_workers, guards, run_programs
from taxon.evals.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="code")
    ap.add_argument("--workers", type=int, default=default_workers())
    args = ap.parse_args()
    task = get_task(args.task)
    card = get_card(task.dataset).for_config(task.config)
    rows = list(load_rows(task.dataset, task.config, task.split))
    answers = [extract(task.extractor, render.as_pair(card, r)[1]) for r in rows]
    sources = execution.programs(task, card, rows, answers)
    print(f"task {task.name}: {len(sources)} reference solutions, {args.workers} workers, "
          f"{os.cpu_count()} CPUs; guards: {guards()}")
    t0 = time.perf_counter()
    outcomes = run_programs(sources, Limits(timeout=task.timeout, memory_mb=task.memory_mb),
                            workers=args.workers)
    wall = time.perf_counter() - t0
    counts = Counter(o.status for o in outcomes)
    per = sorted(o.seconds for o in outcomes)
    print(f"outcomes: {dict(counts)}")
    for r, o in zip(rows, outcomes, strict=True):
        if not o.passed:
            print(f"  {r.get('task_id')}: {o.status}: {o.reason}")
    print(f"wall {wall:.1f} s = {wall / len(sources):.3f} s per program; per program median "
          f"{per[len(per) // 2]:.3f} s, max {per[-1]:.3f} s")
    print(f"all pass: {counts['passed'] == len(sources)}; under 0.5 s per program: "
          f"{wall / len(sources) < 0.5}")


if __name__ == "__main__":
    from taxon.errors import guarded

    sys.exit(guarded(main))
