"""A study file: YAML in, a typed StudySpec out, with `grid:` blocks of named recipes expanded
into experiments (study/grid.py). It lives in the study layer because the grid does: the specs
below it know nothing of recipes."""

from __future__ import annotations

import re
from pathlib import Path

from taxon.config import StudySpec, load_yaml, parse
from taxon.errors import TaxonError
from taxon.study.adapter_sets import expand_sets
from taxon.study.durations import checkpoint_experiments
from taxon.study.grid import expand_study

_SEED = re.compile(r"(?:^|,)seed=-?\d+(?=,|$)")


def arm_of(name: str) -> str:
    """The arm an experiment belongs to: its name without the `seed=` part (`lora[seed=1]` and
    `lora[seed=2]` are arm `lora`; `sequential[task=fpb,seed=0]` is `sequential[task=fpb]`)."""
    head, bracket, rest = name.partition("[")
    if not bracket:
        return name
    inner = _SEED.sub("", rest.removesuffix("]")).strip(",")
    return f"{head}[{inner}]" if inner else head


def _replicate(experiments: list, seeds: list) -> list:
    """`seeds: [0, 1, 2]`: each listed experiment that trains becomes one experiment per seed,
    `name[seed=s]`, its stages seeded with s. The report groups them back into one arm. An
    experiment without stages (zero-shot) is deterministic and stays one; a composite of
    replicated members becomes one per seed, merging that seed's members (with that seed)."""
    out = []
    replicated = {e.get("name") for e in experiments
                  if isinstance(e, dict) and e.get("stages") and "axes" not in e}
    for exp in experiments:
        compose = exp.get("compose") if isinstance(exp, dict) else None
        if isinstance(compose, dict) and isinstance(compose.get("members"), list) and "axes" not in exp:
            # a composite of replicated members: one per seed, merging the members of that seed
            if any(m in replicated for m in compose["members"]):
                for s in seeds:
                    members = [f"{m}[seed={s}]" if m in replicated else m for m in compose["members"]]
                    out.append({**exp, "name": f"{exp.get('name')}[seed={s}]",
                                "compose": {"seed": s, **compose, "members": members},
                                "axes": {**(exp.get("axes") or {}), "seed": s}})
                continue
        if not isinstance(exp, dict) or not exp.get("stages") or "axes" in exp:
            out.append(exp)
            continue
        for s in seeds:
            stages = [{**st, "seed": s} if isinstance(st, dict) else st for st in exp["stages"]]
            out.append({**exp, "name": f"{exp.get('name')}[seed={s}]", "stages": stages,
                        "axes": {**(exp.get("axes") or {}), "seed": s}})
    return out


def load_study(path: str | Path) -> StudySpec:
    """Parse a study file. Top-level `x-` keys only hold YAML anchors. Stages and the evaluation
    take the study's seed unless they set one; `seeds:` repeats every training experiment (and
    every grid block without its own `seed` axis) once per seed, while the evaluation keeps the
    study's seed, so all seeds are scored on the same test items. The checkpoints an
    experiment's last stage keeps become experiments of their own (`study/durations.py`)."""
    data = {k: v for k, v in load_yaml(path).items() if not str(k).startswith("x-")}
    seeds = data.get("seeds")
    if seeds is not None:
        if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)
                and len(set(seeds)) == len(seeds)):
            raise TaxonError(f"{path}: field 'seeds': {seeds!r} must be a list of distinct integers, "
                             "e.g. [0, 1, 2]; fix the file")
        data["seed"] = data.get("seed", seeds[0])
        for block in data.get("grid") or []:
            if isinstance(block, dict):
                block.setdefault("seed", list(seeds))
    seed = data.get("seed", 0)
    if "grid" in data or "data" in data:  # named recipes over axes, added to `experiments`
        data = expand_study(data, str(path))
    if "adapter_sets" in data:  # one adapter per dataset, expanded into experiments
        data = expand_sets(data, str(path))
    if seeds is not None:
        listed = [e for e in data.get("experiments") or [] if not (isinstance(e, dict) and "axes" in e)]
        gridded = [e for e in data.get("experiments") or [] if isinstance(e, dict) and "axes" in e]
        data["experiments"] = _replicate(listed, seeds) + gridded
    for exp in data.get("experiments") or []:
        for stage in (exp.get("stages") or []) if isinstance(exp, dict) else []:
            if isinstance(stage, dict):
                stage.setdefault("seed", seed)
        if isinstance(exp, dict) and isinstance(exp.get("compose"), dict):
            exp["compose"].setdefault("seed", seed)  # DARE's masks, like a stage's randomness
    if isinstance(data.get("eval"), dict):
        data["eval"].setdefault("seed", seed)
    study = parse(StudySpec, data, str(path))
    return checkpoint_experiments(study, str(path))  # type: ignore[arg-type]
