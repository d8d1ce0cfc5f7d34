"""What a planned study costs before anything runs: stages and training steps with and without
reuse, tokens, and time estimated from throughput measured on this machine and from a named
GPU's peak FLOP/s. Reads config files and stage metadata only; never loads a model."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from taxon.config import ModelConfig
from taxon.errors import TaxonError
from taxon.settings import cache_dir
from taxon.study.durations import length_free
from taxon.study.grid import model_table
from taxon.study.plan import PlannedExperiment, PlannedStage, unique_stages

GPUS_FILE = Path(__file__).with_name("gpus.yaml")
STAGE_META = "taxon_stage.json"  # = taxon.models.STAGE_META (that module imports torch)
DEFAULT_MFU = 0.3  # model FLOP utilisation assumed for GPU estimates (small models, short sequences)
MIN_SCALING_PARAMS = 20_000_000  # smaller models are overhead-bound: their rate does not scale


def stage_tokens(stage: PlannedStage) -> int:
    """Tokens a stage processes: every step's batch at full length. Exact for packed pretraining;
    an upper bound for SFT, whose pairs are shorter than max_length."""
    s = stage.spec
    return s.steps * s.batch_size * s.grad_accum * s.max_length


def trained_steps(stage: PlannedStage) -> int:
    """Steps a planned stage trains: none for a checkpoint, which a longer run keeps."""
    return 0 if stage.kind == "checkpoint" else stage.spec.steps


@dataclass
class Cost:
    experiments: int
    stage_refs: int  # stages over all chains: what training every experiment alone would run
    unique_stages: int
    naive_steps: int
    steps: int  # with reuse: the steps of the unique planned stages
    naive_tokens: Counter = field(default_factory=Counter)  # per model
    tokens: Counter = field(default_factory=Counter)
    checkpoints: int = 0  # unique stages that are checkpoints kept by a run (no steps of their own)

    @property
    def ratio(self) -> float:
        return self.steps / self.naive_steps if self.naive_steps else 1.0


def study_cost(experiments: list[PlannedExperiment]) -> Cost:
    cost = Cost(len(experiments), 0, 0, 0, 0)
    model_of: dict[str, str] = {}
    for e in experiments:
        for s in e.stages:
            model_of.setdefault(s.id, e.model)
            cost.stage_refs += 1
            cost.naive_steps += s.spec.steps
            cost.naive_tokens[e.model] += stage_tokens(s)
    for s in unique_stages(experiments):
        cost.unique_stages += 1
        cost.steps += trained_steps(s)
        if s.kind == "checkpoint":
            cost.checkpoints += 1
        else:
            cost.tokens[model_of[s.id]] += stage_tokens(s)
    return cost


def _spec_without(stage: PlannedStage, fields: set[str]) -> str:
    """A stage's spec less `fields`, as a key: stages equal in everything else share it."""
    return json.dumps(stage.spec.model_dump(mode="json", exclude=fields), sort_keys=True)


# What distinguishes durations of one run: the step count and the learning rate's layout over it.
DURATION_FIELDS = {"steps", "checkpoints", "run_steps", "schedule", "warmup_ratio", "warmup_steps",
                   "decay_ratio", "segment"}


def duration_floor(experiments: list[PlannedExperiment]) -> int:
    """The fewest steps any reuse across durations could train: every set of stages that differ
    only in duration (steps and schedule) from the same parent costs its longest run once, as if
    each shorter one were that run's checkpoint. A target under this floor needs fewer
    experiments, not better reuse. wsd segments count as the run they belong to."""
    stages = unique_stages(experiments)
    by_id = {s.id: s for s in stages}
    longest: dict[tuple[str, str], int] = {}
    for s in stages:
        parent, steps = s.parent, s.spec.steps
        if s.spec.segment is not None:  # a trunk or cooldown: the run from its first segment's parent
            steps += s.spec.segment.start
            while parent in by_id and by_id[parent].spec.segment is not None:
                parent = by_id[parent].parent
        key = (parent, _spec_without(s, DURATION_FIELDS))
        longest[key] = max(longest.get(key, 0), steps)
    return sum(longest.values())


def new_steps(experiments: list[PlannedExperiment]) -> list[int]:
    """Per experiment, in plan order: the steps of the stages no earlier experiment trains."""
    seen: set[str] = set()
    out = []
    for e in experiments:
        fresh = [s for s in e.stages if s.id not in seen]
        seen.update(s.id for s in fresh)
        out.append(sum(trained_steps(s) for s in fresh))
    return out


def schedule_rules(stages: list[PlannedStage]) -> list[str]:
    """Which duration rule applies to the study's stages, and where a different one would save."""
    lines = []
    for name, n in sorted(Counter(s.spec.schedule for s in stages).items()):
        if name == "wsd":
            lines.append(f"schedule wsd ({n} stages): warmup-stable-decay; durations of one run branch "
                         "off the longest run's stable phase and add only their own cooldown")
        elif any(length_free(s.spec) for s in stages if s.spec.schedule == name):
            lines.append(f"schedule {name} ({n} stages): the learning rate at a step does not depend "
                         "on the run's length (warmup in steps); shorter durations of one run are "
                         "checkpoints of the longest")
        else:
            lines.append(f"schedule {name} ({n} stages): each duration is its own run")
    groups: dict[tuple[str, str], set[int]] = {}
    for s in stages:
        if s.spec.schedule == "wsd" or s.kind == "checkpoint":  # a shared trunk; kept by a run
            continue
        groups.setdefault((s.parent, _spec_without(s, {"steps", "checkpoints"})), set()).add(s.spec.steps)
    multi = [v for v in groups.values() if len(v) > 1]
    if multi:
        saved = sum(sum(v) - max(v) for v in multi)
        lines.append(f"{len(multi)} sets of stages differ only in their step count; each duration is "
                     f"trained in full ({saved:,} steps beyond the longest of each set, which "
                     "`schedule: wsd` would replace by short cooldowns, and `constant_with_warmup` "
                     "with `warmup_steps` by checkpoints of the longest run)")
    return lines


def model_params(model: str) -> int | None:
    """Total parameters: models.yaml's `params`, else a local folder's config.json, else None."""
    entry = model_table().get(model) or {}
    if entry.get("params"):
        return int(entry["params"])
    if ModelConfig.declared(model):
        return ModelConfig.from_name(model).approx_params()
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        d, layers, vocab = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size") or 4 * (d or 0)
        if d and layers and vocab:  # attention 4d^2 + gated MLP 3*d*inter per layer, plus embedding
            return layers * (4 * d * d + 3 * d * inter) + vocab * d
    return None


@dataclass(frozen=True)
class Measured:
    model: str
    tokens: int
    seconds: float
    params: int
    stages: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _root_model(meta: dict, depth: int = 0) -> str:
    base = str(meta.get("base", ""))
    parent = Path(base) / STAGE_META
    if depth < 50 and parent.is_file():
        return _root_model(json.loads(parent.read_text()), depth + 1)
    return base


def measured_throughput(stages_dir: Path | None = None) -> dict[str, Measured]:
    """Training throughput per base model from the stages already trained in the cache: their
    non-padding tokens over their training seconds."""
    root = stages_dir or cache_dir() / "stages"
    acc: dict[str, list] = {}
    for meta_file in sorted(root.glob(f"*/{STAGE_META}")):
        try:
            meta = json.loads(meta_file.read_text())
            fig = meta["figures"]
            if fig.get("checkpoint_of"):  # kept by a run whose own figures count these tokens
                continue
            tokens, seconds = int(fig["tokens"]), float(fig["train_seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a stage without figures says nothing about speed
        if tokens <= 0 or seconds <= 0:
            continue
        a = acc.setdefault(_root_model(meta), [0, 0.0, int(fig.get("total_params") or 0), 0])
        a[0] += tokens
        a[1] += seconds
        a[3] += 1
    return {m: Measured(m, t, s, p, n) for m, (t, s, p, n) in acc.items()}


def local_rate(model: str, measured: dict[str, Measured]) -> tuple[float, str] | None:
    """(tokens/s, where it comes from) on this machine, or None when nothing measured applies."""
    if model in measured:
        m = measured[model]
        return m.tokens_per_s, f"measured: {m.stages} stages, {m.tokens:,} tokens"
    n = model_params(model)
    refs = [m for m in measured.values() if m.params >= MIN_SCALING_PARAMS]
    if n is None or not refs:
        return None
    ref = max(refs, key=lambda m: m.tokens)
    return ref.tokens_per_s * ref.params / n, f"scaled from {ref.model} by parameter count"


@cache
def gpus() -> dict[str, dict]:
    return yaml.safe_load(GPUS_FILE.read_text())


def gpu_seconds(gpu: str, params: int, tokens: int, mfu: float = DEFAULT_MFU) -> float:
    """6 * N * tokens FLOPs (forward + backward) at `mfu` of the GPU's peak."""
    if gpu not in gpus():
        raise TaxonError(f"unknown GPU '{gpu}'; known: {', '.join(gpus())}")
    if not 0 < mfu <= 1:
        raise TaxonError(f"--mfu {mfu} must be in (0, 1], e.g. 0.3")
    return 6 * params * tokens / (gpus()[gpu]["tflops"] * 1e12 * mfu)


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
