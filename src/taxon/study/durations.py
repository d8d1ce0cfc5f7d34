"""Durations from one run: the planner's rule for schedules whose learning rate at a step does
not depend on the run's length.

With `constant`, or `constant_with_warmup` and a warmup given in steps (`warmup_steps`), the
first k steps of a 20000-step run use the learning rates a k-step run uses. So when experiments
ask for the same stage (same parent, same spec) at several `steps`, the longest is trained once
and keeps its checkpoints at the shorter durations (`StageSpec.checkpoints`); each shorter
duration becomes that checkpoint (`steps: k, run_steps: 20000`), written while the run trains:
100, 250, ..., 20000 steps cost 20000 instead of 38850.

The checkpoint is exactly the first k steps of the long run, data included: the run's stream is
built for its whole length (as for wsd's shared trunk), so the k-step experiment trains on the
first k batches of that stream, an equally random draw from the same mixture as a k-step run's
own stream but not the same examples. Its spec says so (`run_steps`), so its stage id is not the
k-step run's. Trained alone (a run stopped at k) it gives the same weights, which is what keeps a
missing checkpoint folder recoverable (tests/test_durations.py compares them tensor by tensor).

A stage can also ask for checkpoints itself (`checkpoints: [250, 1000]` or `checkpoint_every`):
they are kept while it trains, and those of an experiment's last stage are evaluated, each as an
experiment of its own (`name[steps=250]`, `checkpoint_experiments`).

wsd families are left to `study/wsd.py` (a trunk plus each duration's own cooldown); cosine and
linear decay over the whole run, so each of their durations stays its own run.
"""

from __future__ import annotations

import re

from taxon.config import ExperimentSpec, StageSpec, StudySpec
from taxon.errors import TaxonError
from taxon.schedule import checkpoint, whole_run
from taxon.study import wsd
from taxon.study.wsd import Step


def length_free(spec: StageSpec) -> bool:
    """Whether the learning rate at each step is the same for every length of this run."""
    if spec.schedule == "constant":
        return True
    return spec.schedule == "constant_with_warmup" and (spec.warmup_steps is not None
                                                         or spec.warmup_ratio == 0)


def _joins(spec: StageSpec) -> bool:
    """A whole run that may serve its family's shorter durations (or be served by a longer one):
    not already a checkpoint, not keeping checkpoints of its own, not a segment, not watched
    (a watched run can stop early, before the checkpoints)."""
    return (length_free(spec) and spec.steps > 0 and spec.run_steps is None and not spec.checkpoints
            and spec.segment is None and spec.watch is None)


def expand(items: list[tuple[str, StageSpec]]) -> list[list[Step]]:
    """The planned stages each (parent id, spec) of one level of the stage graph becomes: a
    duration family of a length-free schedule becomes its longest run, keeping checkpoints, and
    those checkpoints; a stage that names `checkpoints` keeps them; everything else as
    `wsd.expand` plans it."""
    durations: dict[str, set[int]] = {}
    for parent, spec in items:
        if _joins(spec):
            durations.setdefault(wsd.family(parent, spec), set()).add(spec.steps)
    served = {i for i, (parent, spec) in enumerate(items)
              if _joins(spec) and len(durations[wsd.family(parent, spec)]) > 1}
    # Checkpoints that runs of this level keep: (parent, whole run's identity) -> steps.
    kept: dict[tuple[str, str], set[int]] = {}
    for i, (parent, spec) in enumerate(items):
        if i in served:
            lengths = durations[wsd.family(parent, spec)]
            whole = spec.model_copy(update={"steps": max(lengths)})
            kept.setdefault((parent, whole.canonical()), set()).update(lengths - {max(lengths)})
        elif spec.checkpoints:
            kept.setdefault((parent, spec.canonical()), set()).update(spec.checkpoints)
    out: list[list[Step] | None] = [None] * len(items)
    rest = [i for i in range(len(items)) if i not in served and items[i][1].run_steps is None
            and not items[i][1].checkpoints]
    for i, steps in zip(rest, wsd.expand([items[i] for i in rest]), strict=True):
        out[i] = steps
    for i, (parent, spec) in enumerate(items):
        if i in served:
            longest = max(durations[wsd.family(parent, spec)])
            if spec.steps < longest:  # the family's longest run keeps this duration
                spec = checkpoint(spec.model_copy(update={"steps": longest}), spec.steps)
        elif spec.run_steps is None and not spec.checkpoints:
            continue
        out[i] = [_step(parent, spec, kept)]
    return out  # type: ignore[return-value]


def _step(parent: str, spec: StageSpec, kept: dict[tuple[str, str], set[int]]) -> Step:
    """`spec` as a run that keeps the checkpoints asked of it, or a checkpoint (`run_steps`):
    written by its run when that run is in the plan, else trained alone (a run stopped early)."""
    if spec.run_steps is None:
        steps = sorted(kept.get((parent, spec.canonical()), ()))
        run = StageSpec.model_validate({**spec.model_dump(), "checkpoints": steps})
        return Step(run, "run", f"own run ({spec.schedule}), keeps checkpoints at "
                                f"{', '.join(map(str, steps))}")
    whole = whole_run(spec)
    if spec.steps in kept.get((parent, whole.canonical()), ()):
        return Step(spec, "checkpoint", f"checkpoint at {spec.steps} of the {spec.run_steps}-step run")
    return Step(spec, "run", f"first {spec.steps} steps of a {spec.run_steps}-step run, trained alone "
                             "(no run of the plan keeps it)")


_STEPS = re.compile(r"(?<=[\[,])steps=[^,\]]*")


def _named(name: str, step: int) -> str:
    """`sft` -> `sft[steps=250]`; `a[model=m,steps=20k,seed=0]` -> `a[model=m,steps=250,seed=0]`."""
    if _STEPS.search(name):
        return _STEPS.sub(f"steps={step}", name, count=1)
    head, bracket, rest = name.partition("[")
    return f"{head}[steps={step},{rest}" if bracket else f"{name}[steps={step}]"


def checkpoint_experiments(study: StudySpec, source: str) -> StudySpec:
    """The study with the checkpoints an experiment's last stage keeps evaluated: after each such
    experiment, one per checkpoint, whose last stage is that checkpoint (the planner finds the run
    that keeps it, so nothing more trains). Its `steps` axis is the checkpoint's step."""
    out: list[ExperimentSpec] = []
    for exp in study.experiments:
        out.append(exp)
        last = exp.stages[-1] if exp.stages else None
        for step in last.checkpoints if last is not None else ():
            axes = {**exp.axes, "steps": step} if exp.axes else None
            out.append(exp.model_copy(update={"name": _named(exp.name, step), "axes": axes,
                                              "stages": (*exp.stages[:-1], checkpoint(last, step))}))
    if len(out) == len(study.experiments):
        return study
    names = [e.name for e in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaxonError(f"{source}: the checkpoint experiment '{dupes[0]}' has the name of another "
                         "experiment; rename that one or drop the step from `checkpoints`")
    return study.model_copy(update={"experiments": tuple(out)})
