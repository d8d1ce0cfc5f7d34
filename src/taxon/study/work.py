"""The kinds of job a study runs, as plain functions an executor can call in this process, in a
worker process or on a Ray node: train one stage, merge adapters into a composite, evaluate one
model on one task. They write only
the checkpoint folder; the driver writes the store (it holds the job's lock meanwhile)."""

from __future__ import annotations

import time
from pathlib import Path

from taxon.config import EvalSpec, StageSpec
from taxon.models import load_model

# The last model loaded by `evaluate_job` in this process: consecutive tasks of one model reuse it.
# With adapter switching, an AdapterSet instead: one base, every adapter evaluated over it.
_loaded: tuple[str, object, object] | None = None
_adapters = None
# What `evaluate_job` loaded from disk in this process, in order (a base once for all its adapters
# when switching): `taxon eval` reports it, the tests check it.
loads: list[str] = []


def train_job(spec: StageSpec, base: str, out: str, desc: str, report_to: tuple[str, ...] = (),
              run_name: str | None = None, launcher: str | None = None, stage_id: str | None = None,
              save_steps: int | None = None, save_total_limit: int | None = None,
              keep: dict[int, tuple[str, str]] | None = None) -> dict:
    """Train a stage into `out` (written atomically); the training figures. With `launcher`
    (e.g. "accelerate launch --multi_gpu --num_processes 4") the stage runs in that command.
    `save_steps`: also keep intermediate checkpoints (out/checkpoint-N). `keep`: {step: (stage
    id, folder)}, the checkpoints the run writes as stages of their own."""
    from taxon.study import tracking
    from taxon.train import train_stage

    if launcher:
        from taxon.study.launch import launch_stage

        return launch_stage(launcher, spec, base, out, desc, report_to, run_name, stage_id, keep)
    try:
        return train_stage(spec, base, Path(out), desc=desc, report_to=list(report_to) or "none",
                           run_name=run_name, stage_id=stage_id, save_steps=save_steps,
                           save_total_limit=save_total_limit, keep=keep)
    finally:
        tracking.close_training_runs(report_to)


def compose_job(members: list[str], spec, out: str, composite_id: str) -> dict:
    """Merge the members' LoRA adapters into the composite folder `out`; its metadata."""
    from taxon.compose import write_composite

    t0 = time.time()
    meta = write_composite(members, spec, Path(out), composite_id)
    return {**meta, "seconds": time.time() - t0}


def _model_for(location: str, switch: bool):
    """(model, tokenizer) for `location`: a LoRA adapter over the base already loaded (switching),
    the model loaded for the previous job, or a fresh load (a LoRA checkpoint merged)."""
    global _loaded, _adapters
    from taxon.adapter_set import AdapterSet, adapter_base

    base = adapter_base(location) if switch else None
    if base is not None:
        if _adapters is None or not _adapters.fits(location):
            _loaded = _adapters = None  # free what was loaded before
            loads.append(base)
            _adapters = AdapterSet(base)
        return _adapters.use(location), _adapters.tokenizer
    if _loaded is None or _loaded[0] != location:
        _loaded = _adapters = None  # free the previous model before loading the next
        loads.append(location)
        _loaded = (location, *load_model(location))
    return _loaded[1], _loaded[2]


def evaluate_job(location: str, task_name: str, spec: EvalSpec, switch: bool = False) -> tuple:
    """Evaluate the model at `location` on one task; (TaskResult, resources). `switch`: a LoRA
    adapter is put over its base loaded once for every adapter on it, instead of merged into a
    fresh copy of the base (`taxon eval` with several adapters)."""
    from taxon.evals.evaluate import evaluate_task
    from taxon.evals.tasks import get_task
    from taxon.models import use_bf16

    if location.startswith("api:"):  # a model behind an OpenAI-compatible API
        from taxon.evals.api_eval import evaluate_api

        return evaluate_api(location, get_task(task_name), spec)
    t0 = time.time()
    model, tokenizer = _model_for(location, switch)
    result = evaluate_task(model, tokenizer, get_task(task_name), shots=spec.shots,
                           limit=spec.limit, seed=spec.seed, batch_size=spec.batch_size,
                           bf16=use_bf16(spec.precision))
    eff = result.metrics["efficiency"]  # measured by evaluate_task over the task alone
    resources = {
        "wall_seconds": time.time() - t0,
        "tokens": eff["tokens"],
        "peak_memory_mb": eff["peak_memory_mb"],
        "total_params": eff["total_params"],
        "trainable_params": None,  # set by the driver from the last stage's figures
    }
    return result, resources
