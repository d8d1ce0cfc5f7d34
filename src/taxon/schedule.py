"""Learning-rate schedules for the Trainer, and continuing a warmup-stable-decay run from a trunk
segment's checkpoint.

`wsd` (warmup-stable-decay): linear warmup, a constant learning rate, then a cooldown to zero
over the last `decay_ratio` of the steps with the 1-sqrt shape, the shape Hägele et al. (2024,
"Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations") found to match or
beat cosine with a 20% cooldown. Because the learning rate before the cooldown does not depend on
the run's length, runs of several lengths can share one trunk and branch into their own cooldowns
(`study/wsd.py` plans that). Continuing a segment uses the Trainer's own resume: weights, AdamW
moments, scheduler position, RNG states and the data loader's position all come back, and the data
stream is built for the whole trunk so each segment sees the examples an uninterrupted run would.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from taxon.config import StageSpec
from taxon.errors import TaxonError
from taxon.models import STAGE_META

DECAY_SHAPE = "1-sqrt"

# What the Trainer needs besides the weights to continue exactly where a segment stopped (under
# `accelerate launch` each process saves its own rng_state_<rank>.pth).
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state*.pth", "scaler.pt")


def decay_steps(stage: StageSpec, steps: int) -> int:
    """Cooldown length of a `steps`-long wsd run: at least one step, at most the whole run."""
    return min(steps, max(1, round(stage.decay_ratio * steps)))


def warmup_steps(stage: StageSpec, steps: int | None = None) -> int:
    """Warmup length of a `steps`-long run; a wsd warmup never reaches into the cooldown."""
    steps = stage.steps if steps is None else steps
    warmup = min(stage.warmup_steps, steps) if stage.warmup_steps is not None else round(
        stage.warmup_ratio * steps)
    return min(warmup, steps - decay_steps(stage, steps)) if stage.schedule == "wsd" else warmup


def whole_run(stage: StageSpec) -> StageSpec:
    """The run a checkpoint (`run_steps`) is the beginning of; any other stage is its own run."""
    if stage.run_steps is None:
        return stage
    return StageSpec.model_validate({**stage.model_dump(), "steps": stage.run_steps, "run_steps": None})


def checkpoint(stage: StageSpec, step: int) -> StageSpec:
    """The stage a run keeps at `step`: its first `step` steps, on its stream and schedule."""
    return StageSpec.model_validate({**stage.model_dump(), "steps": step, "run_steps": stage.steps,
                                     "checkpoints": ()})


def trainer_args(stage: StageSpec) -> dict:
    """The SFTConfig arguments that set the length, schedule and checkpointing of `stage`. A
    checkpoint gets its whole run's (that run's length sets the schedule); `StopAt` ends it."""
    if stage.run_steps is not None:
        return trainer_args(whole_run(stage))
    seg = stage.segment
    if stage.schedule != "wsd":
        return {"max_steps": stage.steps, "lr_scheduler_type": stage.schedule,
                "warmup_steps": warmup_steps(stage), "save_strategy": "no"}
    if seg is None:
        return {"max_steps": stage.steps, "lr_scheduler_type": "warmup_stable_decay",
                "warmup_steps": warmup_steps(stage),
                "lr_scheduler_kwargs": {"num_decay_steps": decay_steps(stage, stage.steps),
                                        "decay_type": DECAY_SHAPE},
                "save_strategy": "no"}
    end = seg.start + stage.steps
    # The Trainer counts steps from the trunk's start, so max_steps is where this segment ends.
    # A trunk segment has no cooldown and saves a full Trainer checkpoint (optimizer included) at
    # its end for the segments that continue it; a cooldown decays over its whole length.
    return {"max_steps": end, "lr_scheduler_type": "warmup_stable_decay",
            "warmup_steps": seg.warmup_steps,
            "lr_scheduler_kwargs": {"num_decay_steps": stage.steps if seg.cooldown else 0,
                                    "decay_type": DECAY_SHAPE},
            # One save interval for every segment of a stream, so resumed states agree with the args.
            "save_strategy": "no" if seg.cooldown else "steps", "save_steps": seg.stream_steps}


def data_stage(stage: StageSpec) -> StageSpec:
    """The spec whose mixture a stage trains on: a segment or a checkpoint draws from its whole
    run's stream."""
    if stage.run_steps is not None:
        return whole_run(stage)
    if stage.segment is None:
        return stage
    return stage.model_copy(update={"steps": stage.segment.stream_steps, "segment": None})


def resume_point(stage: StageSpec, base: str) -> tuple[str, str | None]:
    """(model to start from, checkpoint to resume from). A segment that starts after step 0
    continues its parent segment: it loads the trunk's own base (for LoRA, the adapter is then
    restored on top of it) and resumes from the parent's checkpoint."""
    if stage.segment is None or stage.segment.start == 0:
        return base, None
    parent = Path(base)
    meta_file = parent / STAGE_META
    missing = [f for f in RESUME_FILES[:4] if not any(parent.glob(f))]
    if not meta_file.is_file() or missing:  # e.g. a stage folder written by an older taxon
        raise TaxonError(
            f"wsd segment starting at step {stage.segment.start} needs its parent checkpoint {parent} "
            f"with optimizer state, which lacks {', '.join(missing) or STAGE_META}; "
            "delete that folder and run the study again to retrain it"
        )
    state = json.loads((parent / "trainer_state.json").read_text())
    if state.get("global_step") != stage.segment.start:
        raise TaxonError(
            f"checkpoint {parent} stopped at step {state.get('global_step')}, not at "
            f"{stage.segment.start} where this segment starts; delete it and run the study again"
        )
    return json.loads(meta_file.read_text())["base"], str(parent)


def tokens_seen(checkpoint: str | None) -> int:
    """Tokens the run had seen when `checkpoint` was saved (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["num_input_tokens_seen"])


def resume_files(stage: StageSpec, scratch: Path) -> list[Path]:
    """The optimizer, scheduler, RNG and Trainer-state files of a trunk segment's final
    checkpoint, to be stored beside its weights (cooldowns and whole runs keep none)."""
    if stage.segment is None or stage.segment.cooldown:
        return []
    end = stage.segment.start + stage.steps
    folder = scratch / f"checkpoint-{end}"
    files = sorted(path for pattern in RESUME_FILES for path in folder.glob(pattern))
    if not any(f.name == "optimizer.pt" for f in files):
        raise RuntimeError(f"the Trainer saved no optimizer state in {folder}")  # a bug, not user input
    return files


class ContinueSchedule(TrainerCallback):
    """On resuming a segment, set the learning rate from this segment's schedule at the resumed
    step. The optimizer file holds the rate the trunk would use next (a trunk has no cooldown, so
    its scheduler has already dropped to its floor), not this segment's."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        if state.global_step == 0 or lr_scheduler is None:
            return
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
        step = sched.last_epoch
        lrs = [base * f(step) for base, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs


class StopAt(TrainerCallback):
    """Ends a checkpoint's training at its own `steps`, inside a schedule built for its whole
    run: the weights are then those the whole run has at that step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True
