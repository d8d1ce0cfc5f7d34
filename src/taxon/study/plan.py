"""Expand a study into experiments and content-addressed stages.

A stage's identity is the hash of its canonical spec and its parent's identity (the model's
identity or the parent stage's id, `taxon.identity`), so experiments that begin with the same
stages share their checkpoints.
wsd stages that differ only in length share a trunk (`study/wsd.py`); with a constant schedule
the shorter ones are checkpoints of the longest run (`study/durations.py`). Each planned stage's
`kind` and `note` say which rule made it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from taxon.config import ComposeSpec, StageSpec, StudySpec
from taxon.identity import compose_id, eval_key, model_identity, stage_id
from taxon.models import resolve_targets
from taxon.settings import cache_dir
from taxon.study import durations

__all__ = ["PlannedCompose", "PlannedExperiment", "PlannedStage",
           "eval_key", "plan", "stage_id", "unique_stages"]


@dataclass(frozen=True)
class PlannedStage:
    id: str
    parent: str  # parent stage id, or the model's identity
    spec: StageSpec  # spec.steps: the steps this stage trains (a wsd segment's own length)
    kind: str = "run"  # "run": a whole run; "trunk" / "cooldown": a segment of a shared wsd run;
    # "checkpoint": kept by a longer run of the plan while it trains (nothing of its own to train)
    note: str = ""  # e.g. "wsd trunk 0→9000 (shared by 3 of 3 durations)", "own run (cosine)"

    @property
    def path(self) -> Path:
        return cache_dir() / "stages" / self.id


@dataclass(frozen=True)
class PlannedCompose:
    """A composite: the merge of the members' last (LoRA) stages, content-addressed by their ids
    and the merge settings (identity.compose_id)."""

    id: str
    spec: ComposeSpec
    members: tuple[PlannedStage, ...]  # each member experiment's last stage, in spec order

    @property
    def path(self) -> Path:
        return cache_dir() / "composites" / self.id


@dataclass(frozen=True)
class PlannedExperiment:
    name: str
    model: str
    stages: tuple[PlannedStage, ...]
    root: str  # identity of `model` (taxon.identity.model_identity)
    compose: PlannedCompose | None = None

    @property
    def model_key(self) -> str:
        """Identity of the model that gets evaluated."""
        if self.compose is not None:
            return self.compose.id
        return self.stages[-1].id if self.stages else self.root

    @property
    def location(self) -> str:
        """What `load_model` takes to load it; for a model behind an API, its identity (the name
        with the fingerprint pinned, so evaluating asks the server nothing more about it)."""
        if self.compose is not None:
            return str(self.compose.path)
        if not self.stages and self.root.startswith("api:"):
            return self.root
        return str(self.stages[-1].path) if self.stages else self.model


def plan(study: StudySpec) -> list[PlannedExperiment]:
    models = [exp.model or study.model for exp in study.experiments]
    identities = {m: model_identity(m) for m in dict.fromkeys(models)}
    roots = [identities[m] for m in models]
    parents = list(roots)
    # LoRA targets from each chain's model, before anything is hashed: the ids name what trains.
    specs = [[resolve_targets(s, m) for s in exp.stages] for exp, m in zip(study.experiments, models,
                                                                           strict=True)]
    chains: list[list[PlannedStage]] = [[] for _ in study.experiments]
    # Level by level, since a stage's family (wsd branching, checkpoints) depends on its parent's id.
    for level in range(max((len(s) for s in specs), default=0)):
        at = [i for i, s in enumerate(specs) if level < len(s)]
        expanded = durations.expand([(parents[i], specs[i][level]) for i in at])
        for i, steps in zip(at, expanded, strict=True):
            for step in steps:
                sid = stage_id(parents[i], step.spec)
                chains[i].append(PlannedStage(sid, parents[i], step.spec, step.kind, step.note))
                parents[i] = sid
    out = [PlannedExperiment(exp.name, model, tuple(stages), root)
           for exp, model, stages, root in zip(study.experiments, models, chains, roots, strict=True)]
    by_name = {e.name: e for e in out}
    for i, exp in enumerate(study.experiments):  # composites, once their members' stages are named
        if exp.compose is not None:
            members = tuple(by_name[m].stages[-1] for m in exp.compose.members)
            cid = compose_id([m.id for m in members], exp.compose)
            out[i] = dataclasses.replace(out[i], compose=PlannedCompose(cid, exp.compose, members))
    return out


def unique_stages(experiments: list[PlannedExperiment]) -> list[PlannedStage]:
    seen: dict[str, PlannedStage] = {}
    for e in experiments:
        for s in e.stages:
            seen.setdefault(s.id, s)
    return list(seen.values())
