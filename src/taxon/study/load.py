"""A study file: YAML in, a typed StudySpec out, with `grid:` blocks of named recipes expanded
into experiments (study/grid.py). It lives in the study layer because the grid does: the specs
below it know nothing of recipes."""

from __future__ import annotations

from pathlib import Path

from taxon.config import StudySpec, load_yaml, parse
from taxon.study.grid import expand_study


def load_study(path: str | Path) -> StudySpec:
    """Parse a study file. Top-level `x-` keys only hold YAML anchors. Stages and the evaluation
    take the study's seed unless they set one."""
    data = {k: v for k, v in load_yaml(path).items() if not str(k).startswith("x-")}
    seed = data.get("seed", 0)
    if "grid" in data or "data" in data:  # named recipes over axes, added to `experiments`
        data = expand_study(data, str(path))
    for exp in data.get("experiments") or []:
        for stage in (exp.get("stages") or []) if isinstance(exp, dict) else []:
            if isinstance(stage, dict):
                stage.setdefault("seed", seed)
    if isinstance(data.get("eval"), dict):
        data["eval"].setdefault("seed", seed)
    return parse(StudySpec, data, str(path))  # type: ignore[return-value]
