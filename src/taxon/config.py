"""Typed specs shared by YAML files and command-line flags.

Every default a run uses is visible here; a stage's identity is the hash of its canonical spec.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taxon.errors import TaxonError


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def canonical(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class DataRef(Spec):
    """One dataset in a stage: a card id, its config and split, and its share of the mixture."""

    dataset: str
    config: str | None = None  # None: the card's default config
    split: str = "train"
    rate: float | None = None  # share of the stage's examples; None = equal shares

    @field_validator("rate")
    @classmethod
    def _rate_in_range(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"rate {v} must be between 0 and 1")
        return v


class LoraSpec(Spec):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class StageSpec(Spec):
    """One training run. `pretrain`: causal LM on packed fixed-length blocks of text.
    `sft`: loss on completion tokens only, over (prompt, completion) pairs."""

    objective: Literal["pretrain", "sft"]
    data: tuple[DataRef, ...]
    replay: DataRef | None = None  # general text mixed in against forgetting; its rate = share
    steps: int = Field(100, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    max_length: int = Field(256, ge=8)
    lora: LoraSpec | None = LoraSpec()  # None: full fine-tuning
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    # SFT: the examples of a micro-batch go in one row without padding, each kept to its own
    # attention; False pads each batch to its longest example. Pretraining blocks are always full.
    packing: bool = True

    @model_validator(mode="after")
    def _rates_sum_to_one(self) -> StageSpec:
        parts = list(self.data) + ([self.replay] if self.replay else [])
        given = [d.rate for d in parts]
        if self.replay is not None and self.replay.rate is None:
            raise ValueError("replay needs a rate (its share of the mixture, e.g. 0.2)")
        if any(r is not None for r in given) and any(r is None for r in given):
            raise ValueError("give a rate to every dataset of the stage, or to none")
        if all(r is not None for r in given) and abs(sum(given) - 1) > 1e-6:
            raise ValueError(f"mixture rates {given} sum to {sum(given):g}, not 1")
        return self

    def rates(self) -> list[float]:
        """Rates of data + replay, in that order; equal shares when none are given."""
        parts = list(self.data) + ([self.replay] if self.replay else [])
        if parts[0].rate is None:
            return [1 / len(parts)] * len(parts)
        return [p.rate for p in parts]  # type: ignore[misc]


class EvalSpec(Spec):
    tasks: tuple[str, ...] = ("fpb", "tfns", "sst2")
    shots: int | None = None  # None: each task's own default
    limit: int | None = Field(None, ge=1)  # seeded subsample of the test split
    batch_size: int = Field(16, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    seed: int = 0


class ExperimentSpec(Spec):
    """A chain of stages (empty: the zero-shot baseline) on one model, evaluated on the suite."""

    name: str
    model: str | None = None  # None: the study's model
    stages: tuple[StageSpec, ...] = ()


class StudySpec(Spec):
    name: str
    model: str = "smollm2-135m"
    seed: int = 0
    eval: EvalSpec = EvalSpec()
    experiments: tuple[ExperimentSpec, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> StudySpec:
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experiment names must be unique; repeated: {', '.join(dupes)}")
        return self


def digest(*parts: str, length: int = 16) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:length]


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TaxonError(f"no such file: {path}; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TaxonError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the file") from e
    if not isinstance(data, dict):
        raise TaxonError(f"{path}: expected a mapping at the top level; fix the file")
    return data


def parse(spec_type: type[Spec], data: dict, source: str) -> Spec:
    """Validate `data` as `spec_type`; a problem becomes one line naming the file and field."""
    try:
        return spec_type.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"] and ": " in msg and msg.split(": ", 1)[0].startswith("overrides."):
            field, _, msg = msg.partition(": ")  # a model validator that names the field itself
        raise TaxonError(f"{source}: field '{field}': {msg}; fix the file") from e


def load_study(path: str | Path) -> StudySpec:
    """Parse a study file. Top-level `x-` keys only hold YAML anchors. Stages and the evaluation
    take the study's seed unless they set one."""
    data = {k: v for k, v in load_yaml(path).items() if not str(k).startswith("x-")}
    seed = data.get("seed", 0)
    for exp in data.get("experiments") or []:
        for stage in (exp.get("stages") or []) if isinstance(exp, dict) else []:
            if isinstance(stage, dict):
                stage.setdefault("seed", seed)
    if isinstance(data.get("eval"), dict):
        data["eval"].setdefault("seed", seed)
    return parse(StudySpec, data, str(path))  # type: ignore[return-value]
