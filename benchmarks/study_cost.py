"""What the stage graph saves on the example studies: training steps if every experiment trained
its own chain (naive) against the steps of the unique planned stages (with reuse), and how long
`taxon study plan` takes on each. Targets: the thesis taxonomy needs <= 60% of its naive steps
(its duration ablation served by checkpoints of one run per model and seed), the 72-experiment
seed plan <= 45%. The floor is what no reuse across durations can beat (each set of stages that
differ only in steps and schedule trained once, at its longest): a target under it needs a smaller
study.

    python benchmarks/study_cost.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from taxon.errors import TaxonError
from taxon.study.cost import duration_floor, schedule_rules, study_cost
from taxon.study.load import load_study
from taxon.study.plan import plan, unique_stages

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STUDIES = ("seed_qwen2_72", "thesis_taxonomy", "domain_replay")
TARGETS = {"thesis_taxonomy": 0.60, "seed_qwen2_72": 0.45}


def main() -> int:
    print(f"{'study':<18} {'experiments':>11} {'stages':>15} {'steps naive':>12} {'with reuse':>11} "
          f"{'ratio':>6} {'plan CLI':>9}")
    ok = True
    for name in STUDIES:
        path = EXAMPLES / f"{name}.yaml"
        try:
            experiments = plan(load_study(path))
        except TaxonError as e:
            print(f"{name:<18} cannot be planned here: {e}")
            ok = False
            continue
        c = study_cost(experiments)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "taxon.cli", "study", "plan", str(path)],
                           capture_output=True, text=True)
        cli_s = time.perf_counter() - t0
        print(f"{name:<18} {c.experiments:>11} {f'{c.unique_stages}/{c.stage_refs}':>15} "
              f"{c.naive_steps:>12,} {c.steps:>11,} {c.ratio:>6.1%} "
              f"{f'{cli_s:.1f} s' if r.returncode == 0 else 'FAILED':>9}")
        for line in schedule_rules(unique_stages(experiments)):
            print(f"{'':<18} {line}")
        kept = sum(1 for e in experiments if e.stages and e.stages[-1].kind == "checkpoint")
        if kept:
            print(f"{'':<18} {kept} experiments evaluate checkpoints kept by a longer run")
        floor = duration_floor(experiments) / c.naive_steps
        print(f"{'':<18} floor {floor:.1%} of naive steps: every duration of a run its longest run's "
              "checkpoint, whatever the schedule")
        if name in TARGETS:
            met = c.ratio <= TARGETS[name]
            ok &= met
            print(f"{'':<18} target <= {TARGETS[name]:.0%} of naive steps: {'met' if met else 'MISSED'}"
                  + (" (below the floor: only fewer experiments reach it)"
                     if floor > TARGETS[name] else ""))
    print("stages: unique planned stages / stages over all experiments' chains")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
