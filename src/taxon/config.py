"""Typed specs shared by YAML files and command-line flags.

Every default a run uses is visible here; a stage's identity is the hash of its canonical spec.
"""

from __future__ import annotations

import hashlib
import json
import re
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

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)

    dataset: str
    config: str | None = None  # None: the card's default config
    split: str = "train"
    rate: float | None = None  # share of the stage's examples; None = equal shares
    # Share of the source's rows the stage may draw from: a seeded subset (the stage's seed), nested
    # across fractions (the 0.1 subset lies inside the 0.5 one). Left out of the canonical spec at
    # 1.0, so stages written before the field existed keep their identity.
    fraction: float = Field(1.0, gt=0, le=1, exclude_if=lambda v: v == 1.0)
    # objective mixed: how this source is used. `text`: packed blocks, loss on every token;
    # `pair`: (prompt, completion), loss on the completion only. YAML key `as`.
    as_: Literal["text", "pair"] | None = Field(None, alias="as", exclude_if=lambda v: v is None)
    # Adapter sets: at most `cap` rows of the source (a seeded prefix of the same order as
    # `fraction`), of which a `holdout` share is kept out of training and scored as the stage's
    # eval loss. Left out of the canonical spec when unset, so other stages keep their identity.
    cap: int | None = Field(None, ge=2, exclude_if=lambda v: v is None)
    holdout: float | None = Field(None, gt=0, lt=1, exclude_if=lambda v: v is None)

    @field_validator("rate")
    @classmethod
    def _rate_in_range(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"rate {v} must be between 0 and 1")
        return v


class LoraSpec(Spec):
    r: int = Field(16, ge=1)
    # a float where alpha/r ratios need one (r=1, ratio 0.5); unset: 2 x r, the one default rule
    # for study files, `taxon train` and main.py alike.
    alpha: int | float = Field(None, gt=0, validate_default=False)  # type: ignore[assignment]
    dropout: float = Field(0.05, ge=0, lt=1)
    # None: the model architecture's attention projections (architectures.yaml), filled in by
    # models.resolve_targets before the stage is hashed or trained.
    target_modules: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _alpha_default(cls, data):
        if isinstance(data, dict) and data.get("alpha") is None:
            data = {**data, "alpha": 2 * data.get("r", cls.model_fields["r"].default)}
        return data


class WsdSegment(Spec):
    """Steps [start, start + steps) of a warmup-stable-decay run whose data stream is
    `stream_steps` long. The planner sets it when several durations share one trunk: a trunk
    segment keeps its optimizer state for the segments that continue it; a cooldown segment
    decays the learning rate over its whole length."""

    start: int = Field(ge=0)
    stream_steps: int = Field(ge=1)
    warmup_steps: int = Field(ge=0)
    cooldown: bool


class Thresholds(Spec):
    """Rise of the general loss against the base model (a fraction of the base's loss, or nats
    with `relative: false`) up to which a run is excellent, good, acceptable; beyond: forgetting."""

    excellent: float = Field(0.02, ge=0)
    good: float = Field(0.05, ge=0)
    acceptable: float = Field(0.10, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if not self.excellent <= self.good <= self.acceptable:
            raise ValueError("thresholds must rise: excellent <= good <= acceptable")
        return self


class WatchSpec(Spec):
    """Domain and general loss measured during a stage (step 0 and every `every` steps) on a few
    perplexity windows each; each point is classified by the general loss's rise against the base
    model (the model the first watched stage of the chain started from). With `stop`, a run that
    stays beyond `acceptable` for `patience` points in a row stops, and the last checkpoint
    within the threshold is the stage's output."""

    # perplexity tasks: an eval task name, or a corpus folder (`taxon corpus build`; its test split)
    tasks: dict[Literal["domain", "general"], str] = {"domain": "eval_domain", "general": "eval_general"}
    every: int = Field(20, ge=1)
    limit: int = Field(8, ge=1)  # windows scored per task and point (a seeded sample)
    max_length: int | None = Field(256, ge=8)  # window length (None: the task's; capped by the model)
    thresholds: Thresholds = Thresholds()
    relative: bool = True
    patience: int = Field(2, ge=1)
    stop: bool = True

    @model_validator(mode="after")
    def _both(self) -> WatchSpec:
        if set(self.tasks) != {"domain", "general"}:
            raise ValueError("watch.tasks needs both `domain` and `general` (perplexity tasks)")
        return self


class StageSpec(Spec):
    """One training run. `pretrain`: causal LM on packed fixed-length blocks of text.
    `sft`: loss on completion tokens only, over (prompt, completion) pairs. `mixed`: both in one
    stage, each source saying how it is used (`as: text|pair`); the rates are the weights.

    `mix_by`: what the rates share out. `auto` = tokens for pretrain, examples for sft and mixed.
    `adapter` (LoRA on a LoRA parent): `merge` folds the parent's adapter into the weights and
    trains a new one; `continue` keeps training the parent's adapter (same r, alpha, targets)."""

    objective: Literal["pretrain", "sft", "mixed"]
    data: tuple[DataRef, ...]
    replay: DataRef | None = None  # general text mixed in against forgetting; its rate = share
    steps: int = Field(100, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup", "wsd"] = "cosine"
    # wsd: share of the steps spent in the final cooldown (None: 0.2 for wsd, unused otherwise)
    # Left out of the canonical spec when unset, so stages that do not use wsd keep their ids.
    decay_ratio: float | None = Field(None, gt=0, lt=1, exclude_if=lambda v: v is None)
    # set by the planner only (a slice of a shared wsd run)
    segment: WsdSegment | None = Field(None, exclude_if=lambda v: v is None)
    max_length: int = Field(256, ge=8)
    lora: LoraSpec | None = LoraSpec()  # None: full fine-tuning
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    # Fields added after the first release stay out of the canonical spec at their defaults, so
    # stages defined before them keep their identities (and cached checkpoints).
    mix_by: Literal["auto", "tokens", "examples"] = Field("auto", exclude_if=lambda v: v == "auto")
    adapter: Literal["merge", "continue"] = Field("merge", exclude_if=lambda v: v == "merge")
    # Domain and general loss watched during the stage, with early stopping on forgetting.
    watch: WatchSpec | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _uses_fit_objective(self) -> StageSpec:
        for ref in self.data:
            if self.objective == "mixed" and ref.as_ is None:
                raise ValueError(f"objective mixed: give dataset '{ref.dataset}' `as: text` "
                                 "(loss on every token) or `as: pair` (loss on the completion)")
            fits = {"pretrain": "text", "sft": "pair"}.get(self.objective, ref.as_)
            if ref.as_ not in (None, fits):
                raise ValueError(f"dataset '{ref.dataset}' has `as: {ref.as_}`, which objective "
                                 f"{self.objective} cannot use; use objective mixed")
        if self.adapter == "continue" and self.lora is None:
            raise ValueError("adapter continue needs a LoRA stage (lora: {...}); use adapter merge "
                             "for full fine-tuning")
        return self

    def by_tokens(self) -> bool:
        """Whether the rates share out tokens (else examples)."""
        return self.mix_by == "tokens" or (self.mix_by == "auto" and self.objective == "pretrain")

    def usage(self, ref: DataRef) -> Literal["text", "pair"]:
        """How a source's rows are used: given by `as`, or by the objective (replay is text)."""
        if ref.as_ is not None:
            return ref.as_
        return "pair" if self.objective == "sft" and ref is not self.replay else "text"

    @model_validator(mode="before")
    @classmethod
    def _wsd_decay_default(cls, data):
        # Filled in before hashing, so `wsd` alone and `wsd` with the default ratio are one stage.
        if isinstance(data, dict) and data.get("schedule") == "wsd" and data.get("decay_ratio") is None:
            data = {**data, "decay_ratio": 0.2}
        return data

    @model_validator(mode="after")
    def _wsd_fields(self) -> StageSpec:
        if self.schedule != "wsd" and (self.decay_ratio is not None or self.segment is not None):
            raise ValueError("decay_ratio applies to schedule 'wsd' only; remove it or set schedule: wsd")
        if self.schedule == "wsd" and self.warmup_ratio + self.decay_ratio > 1:
            raise ValueError(f"warmup_ratio {self.warmup_ratio} + decay_ratio {self.decay_ratio} exceed 1; "
                             "lower one of them")
        if self.watch is not None and self.schedule == "wsd":
            raise ValueError("watch cannot stop a wsd segment that other durations share; use "
                             "another schedule for a watched stage")
        if self.segment is not None and self.segment.start + self.steps > self.segment.stream_steps:
            raise ValueError("segment ends after its data stream; segments are made by the planner")
        return self

    # SFT batches: True puts a micro-batch's examples in one row without padding, each kept to its
    # own attention; False pads each batch to its longest example. None (auto): padding-free on
    # CUDA, padded on CPU, where sdpa attends over the whole packed row (O(total^2)) and measured
    # slower than padding for 135M-parameter models. Pretraining blocks are always full.
    packing: bool | None = Field(None, exclude_if=lambda v: v is None)
    # Warmup in steps instead of warmup_ratio x steps: a warmup that does not depend on the run's
    # length, so that with a constant schedule the checkpoints of one run ARE the shorter runs
    # (study/durations.py). When given, warmup_ratio is unused and kept at its default, so a
    # leftover ratio cannot split one training into two stage ids.
    warmup_steps: int | None = Field(None, ge=0, exclude_if=lambda v: v is None)
    # Steps (each below `steps`) at which this run's weights are also kept as stages of their
    # own, written while it trains: the checkpoint at k is the stage `steps: k, run_steps: steps`.
    # Left out of the stage's identity: keeping checkpoints does not change the run's weights.
    # `checkpoint_every: n` is shorthand for n, 2n, ... below `steps`.
    checkpoints: tuple[int, ...] = Field((), exclude_if=lambda v: not v)
    # A checkpoint: the first `steps` steps of a `run_steps`-step run, with that run's data stream
    # and learning-rate schedule, so it is exactly that run's weights at step `steps`. Trained
    # alone (a stop at `steps`) it gives the same weights as the checkpoint the run keeps.
    run_steps: int | None = Field(None, ge=1, exclude_if=lambda v: v is None)

    def canonical(self) -> str:
        """The identity-bearing spec: everything but `checkpoints` (which only says what else the
        run writes)."""
        data = self.model_dump(mode="json")
        data.pop("checkpoints", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_spellings(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("warmup_steps") is not None:  # the ratio is unused: one spelling, one id
            data.pop("warmup_ratio", None)
        every = data.pop("checkpoint_every", None)
        if every is not None:
            if not isinstance(every, int) or isinstance(every, bool) or every < 1:
                raise ValueError(f"checkpoint_every {every!r} must be a whole number of steps >= 1")
            steps = data.get("steps", cls.model_fields["steps"].default)
            data["checkpoints"] = [*(data.get("checkpoints") or ()), *range(every, steps, every)]
        if data.get("checkpoints"):
            data["checkpoints"] = sorted(set(data["checkpoints"]))
        return data

    @model_validator(mode="after")
    def _checkpoint_fields(self) -> StageSpec:
        bad = [k for k in self.checkpoints if not 0 < k < self.steps]
        if bad:
            raise ValueError(f"checkpoints {bad} must lie between 1 and steps - 1 ({self.steps - 1}); "
                             "the run's own end is the stage itself")
        if self.run_steps is not None:
            if self.run_steps <= self.steps:
                raise ValueError(f"run_steps {self.run_steps} must exceed steps {self.steps} (a "
                                 "checkpoint is the first `steps` of a longer run); remove run_steps")
            if self.checkpoints:
                raise ValueError("a checkpoint (run_steps) keeps no checkpoints of its own; keep them "
                                 "on the whole run")
        if (self.checkpoints or self.run_steps) and (self.watch is not None or self.segment is not None):
            raise ValueError("checkpoints and run_steps need a run that trains to its end; remove "
                             "watch (it can stop the run early)")
        return self

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
    shots: int | None = Field(None, ge=0)  # None: each task's own default
    limit: int | None = Field(None, ge=1)  # seeded subsample of the test split
    batch_size: int = Field(16, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    seed: int = 0
    # Models behind an API (`api:...`): how classification tasks are scored; `auto`: the endpoint's
    # `choice_method` (evals/endpoints.yaml). Local models ignore it.
    api_method: Literal["auto", "loglikelihood-echo", "top-logprobs", "constrained-choice"] = "auto"


ARCHITECTURES = ("llama", "gpt2", "qwen2", "gemma2", "gemma3_text")
_DECLARED = re.compile(r"^(?P<arch>[a-z0-9_]+)\((?P<args>[^()]*)\)$")


class ModelConfig(Spec):
    """A model declared by architecture and size, built with random weights from `init_seed` and
    trained from scratch (a `pretrain` stage with `lora: null`). The tokenizer is named: a model
    alias whose tokenizer it borrows (`smollm2-135m`, embedded, works offline) or a named variant
    in models.yaml's `tokenizers:` (`gpt2-style`: SmolLM2's vocabulary with GPT-2's special tokens
    and no chat template). Every field is part of the model's identity (`config:<digest>`).

    In a study, `model:` takes it as a mapping; it travels as its canonical name, e.g.
    `llama(layers=4,hidden=128,heads=4,...)`, which is also accepted written out."""

    architecture: Literal["llama", "gpt2", "qwen2", "gemma2", "gemma3_text"]
    layers: int = Field(ge=1, le=128)
    hidden: int = Field(ge=8)
    heads: int = Field(ge=1)
    kv_heads: int | None = Field(None, ge=1)  # None: as many as heads (GPT-2 has no other choice)
    intermediate: int | None = Field(None, ge=1)  # MLP width; None: 4 x hidden
    context: int = Field(1024, ge=8)  # positions the model has
    tokenizer: str = "smollm2-135m"
    init_seed: int = 0
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.architecture == "gpt2" and self.kv_heads not in (None, self.heads):
            raise ValueError("gpt2 has no grouped-query attention; leave kv_heads out")
        return self

    def name(self) -> str:
        """The canonical name: every field, in declaration order, None left out."""
        args = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                for k, v in self.model_dump().items() if k != "architecture" and v is not None]
        return f"{self.architecture}({','.join(args)})"

    @classmethod
    def declared(cls, name: str) -> bool:
        m = _DECLARED.match(name)
        return bool(m) and m.group("arch") in ARCHITECTURES

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        m = _DECLARED.match(name)
        if not m or m.group("arch") not in ARCHITECTURES:
            raise TaxonError(f"'{name}' is not a declared model; write architecture(layers=..,"
                             f"hidden=..,heads=..), architecture one of {', '.join(ARCHITECTURES)}")
        fields: dict = {"architecture": m.group("arch")}
        for part in filter(None, (p.strip() for p in m.group("args").split(","))):
            key, eq, value = part.partition("=")
            if not eq:
                raise TaxonError(f"model '{name}': '{part}' is not key=value; fix the name")
            fields[key.strip()] = yaml.safe_load(value.strip())
        return parse(cls, fields, f"model '{name}'")  # type: ignore[return-value]

    def approx_params(self, vocab: int = 49152) -> int:
        """Total parameters (attention 4 d^2, gated MLP 3 d i, embeddings), for time estimates."""
        d, inter = self.hidden, self.intermediate or 4 * self.hidden
        mlp = (2 if self.architecture == "gpt2" else 3) * d * inter
        return self.layers * (4 * d * d + mlp) + vocab * d * (1 if self.tie_embeddings else 2)


def model_name(value):
    """A study's `model:` as the string every layer passes around: a mapping declares a model
    from its config (ModelConfig); a string is an alias, Hub id, folder or a declared name."""
    if isinstance(value, dict):
        return ModelConfig.model_validate(value).name()
    if isinstance(value, str) and ModelConfig.declared(value):
        return ModelConfig.from_name(value).name()  # one spelling, one identity
    return value


COMPOSE_METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                   "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
# Methods that prune each adapter's delta to a share `density` of its entries (peft's names).
PRUNING_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune", "magnitude_prune_svd")


class ComposeSpec(Spec):
    """An experiment whose model is the merge of the final LoRA adapters of other experiments of the
    study (`members`, by name), with one of peft's weighted-adapter methods, in fp32. `weights`:
    one per member (default: 1/n each); `density`: the share of each delta kept by the pruning
    methods (ties, dare_*, magnitude_prune*); `seed`: the DARE methods' random masks; `svd_rank`:
    the `_svd` methods' rank (default: the members' largest). `baseline`: an experiment (arm) of
    the study trained on all the members' data at once, whose retention the report shows beside
    the composite's; it is not part of the composite's identity."""

    members: tuple[str, ...] = Field(min_length=1)
    method: Literal[COMPOSE_METHODS] = "linear"  # type: ignore[valid-type]
    weights: tuple[float, ...] | None = None
    density: float | None = Field(None, gt=0, le=1)
    seed: int = 0
    svd_rank: int | None = Field(None, ge=1)
    baseline: str | None = None

    @model_validator(mode="after")
    def _fits_method(self) -> ComposeSpec:
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"compose.members repeats a member ({', '.join(self.members)}); name each once")
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(f"compose.weights has {len(self.weights)} values for {len(self.members)} "
                             "members; give one weight per member")
        if self.method in PRUNING_METHODS and self.density is None:
            raise ValueError(f"compose method {self.method} needs a density (the share of each "
                             "adapter's delta kept, e.g. 0.5)")
        if self.method not in PRUNING_METHODS and self.density is not None:
            raise ValueError(f"compose method {self.method} does not prune; leave density out or "
                             f"use one of {', '.join(PRUNING_METHODS)}")
        if self.svd_rank is not None and not self.method.endswith("svd"):
            raise ValueError("svd_rank applies to the svd methods only; leave it out")
        return self

    def member_weights(self) -> tuple[float, ...]:
        return self.weights if self.weights is not None else (1 / len(self.members),) * len(self.members)


class ExperimentSpec(Spec):
    """A chain of stages (empty: the zero-shot baseline) on one model, evaluated on the suite."""

    name: str
    model: str | None = None  # None: the study's model; a mapping declares one (ModelConfig)
    stages: tuple[StageSpec, ...] = ()
    # Set by a study's `grid:`: the named recipe and the axis values this experiment came from.
    recipe: str | None = Field(None, exclude_if=lambda v: v is None)
    axes: dict[str, str | int | float] | None = Field(None, exclude_if=lambda v: v is None)
    # The merge of other experiments' final LoRA adapters instead of stages (ComposeSpec).
    compose: ComposeSpec | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _compose_trains_nothing(self) -> ExperimentSpec:
        if self.compose is not None and self.stages:
            raise ValueError(f"experiment '{self.name}' has both stages and compose; a composite "
                             "trains nothing: move the stages into a member experiment")
        return self

    _model = field_validator("model", mode="before")(classmethod(lambda cls, v: model_name(v)))


class QuestionSpec(Spec):
    """A research question the report answers from the study's results.

    `compare` names arms (experiments without their `seed=` part): two arms give paired tests of
    the first against the second, three or more a Friedman test with Nemenyi pairs. A `template`
    (the thesis plan's rq1-rq5) finds its arms from the recipes and axes itself when `compare`
    is left out. `tasks` and `metric` narrow it (default: every evaluated task, each by its primary
    metric); the tests of one question form one Holm family."""

    id: str | None = None
    ask: str | None = None
    template: Literal["rq1", "rq2", "rq3", "rq4", "rq5"] | None = None
    compare: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    metric: str | None = None
    axis: Literal["steps", "fraction"] | None = None  # rq5: the scaling axis to scan
    share: float = Field(0.8, gt=0, le=1)  # rq5: the share of the large model's score to reach

    @model_validator(mode="after")
    def _asks_something(self) -> QuestionSpec:
        if self.template is None and len(self.compare) < 2:
            raise ValueError("a question needs `compare: [arm A, arm B, ...]` (two or more arms) or "
                             "a `template` (rq1-rq5)")
        return self


class AdapterDataSpec(Spec):
    """One dataset of an adapter set: the rows an adapter trains on and the eval task that scores
    it (the transfer matrix's column for this adapter; its diagonal cell)."""

    dataset: str  # a card id or alias
    config: str | None = None
    split: str = "train"
    task: str  # an eval task (src/taxon/evals/tasks) on the same data


class AdapterSetSpec(Spec):
    """One LoRA adapter per dataset from the same base with identical settings, each on at most
    `examples` rows of its dataset (in the model's chat format), of which a seeded `holdout` share
    is kept out for the eval loss. Expanded (study/adapter_sets.py) into experiments
    `<name>[<key>]`, `<name>[base]` (the model untrained) and, with `multi_task`, `<name>[multi-task]`
    (one adapter on all the datasets, equal shares, the same settings)."""

    name: str = "adapter"
    datasets: dict[str, AdapterDataSpec]
    examples: int = Field(300, ge=10)  # N: rows per dataset, train and held-out together
    holdout: float = Field(0.1, gt=0, lt=1)
    # The shared training settings: StageSpec fields other than objective, data and replay
    # (steps, batch_size, grad_accum, lr, max_length, lora, precision, schedule, ...).
    stage: dict = {}
    multi_task: bool = True
    validation: bool = True  # run each dataset's validation prompts (evals/validation) on every model

    @model_validator(mode="after")
    def _keys(self) -> AdapterSetSpec:
        if not self.datasets:
            raise ValueError("an adapter set needs at least one dataset under `datasets:`")
        for key in self.datasets:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or key in ("base", "multi-task"):
                raise ValueError(f"dataset key '{key}' must be letters, digits, _ . - and not "
                                 "'base' or 'multi-task'; rename it")
        banned = sorted({"objective", "data", "replay"} & set(self.stage))
        if banned:
            raise ValueError(f"`stage` sets {', '.join(banned)}, which the adapter set decides "
                             "(sft on each dataset); remove it")
        if "lora" in self.stage and self.stage["lora"] is None:
            raise ValueError("an adapter set trains LoRA adapters; give `stage.lora` r/alpha or leave "
                             "it out for the default")
        return self


class StudySpec(Spec):
    name: str
    model: str = "smollm2-135m"  # a mapping declares a model from its config (ModelConfig)
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # expanded by the study loader into one run per seed
    eval: EvalSpec = EvalSpec()
    experiments: tuple[ExperimentSpec, ...]
    questions: tuple[QuestionSpec, ...] = ()
    # Kept after expansion into experiments: the report and the validation prompts read them.
    adapter_sets: tuple[AdapterSetSpec, ...] = ()

    _model = field_validator("model", mode="before")(classmethod(lambda cls, v: model_name(v)))

    @model_validator(mode="after")
    def _unique_names(self) -> StudySpec:
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experiment names must be unique; repeated: {', '.join(dupes)}")
        return self


def default(spec: type[Spec], path: str):
    """The default of a spec field, e.g. default(StageSpec, "lora.r"): flags take their defaults
    from here, so the command lines and study files cannot drift apart."""
    head, _, rest = path.partition(".")
    value = spec.model_fields[head].default
    if rest:
        return default(type(value), rest)
    return value


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
