"""Expand a study into experiments and content-addressed stages.

A stage's identity is the hash of its canonical spec and its parent's identity (a model name or
the parent stage's id), so experiments that begin with the same stages share their checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from taxon.config import EvalSpec, StageSpec, StudySpec, digest
from taxon.evals.tasks import TaskSpec
from taxon.settings import cache_dir

# Bump when a change to training code makes the same spec produce a different checkpoint.
RECIPE_VERSION = "1"


@dataclass(frozen=True)
class PlannedStage:
    id: str
    parent: str  # parent stage id, or "model:<name>"
    spec: StageSpec

    @property
    def path(self) -> Path:
        return cache_dir() / "stages" / self.id


@dataclass(frozen=True)
class PlannedExperiment:
    name: str
    model: str
    stages: tuple[PlannedStage, ...]

    @property
    def model_key(self) -> str:
        """Identity of the model that gets evaluated."""
        return self.stages[-1].id if self.stages else f"model:{self.model}"

    @property
    def location(self) -> str:
        """What `load_model` takes to load it."""
        return str(self.stages[-1].path) if self.stages else self.model


def stage_id(parent: str, spec: StageSpec) -> str:
    return digest(RECIPE_VERSION, parent, spec.canonical())


def plan(study: StudySpec) -> list[PlannedExperiment]:
    out = []
    for exp in study.experiments:
        model = exp.model or study.model
        parent, stages = f"model:{model}", []
        for spec in exp.stages:
            sid = stage_id(parent, spec)
            stages.append(PlannedStage(sid, parent, spec))
            parent = sid
        out.append(PlannedExperiment(exp.name, model, tuple(stages)))
    return out


def eval_key(task: TaskSpec, spec: EvalSpec) -> str:
    """Identity of one evaluation: the task definition and everything that changes its numbers."""
    return digest(task.canonical(), str(spec.shots), str(spec.limit), str(spec.seed), spec.precision)


def unique_stages(experiments: list[PlannedExperiment]) -> list[PlannedStage]:
    seen: dict[str, PlannedStage] = {}
    for e in experiments:
        for s in e.stages:
            seen.setdefault(s.id, s)
    return list(seen.values())
