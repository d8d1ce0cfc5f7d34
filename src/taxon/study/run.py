"""Run a study: train each stage once (parents first), evaluate each model once per task, store."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from taxon.config import EvalSpec, StudySpec
from taxon.evals.evaluate import evaluate_task
from taxon.evals.tasks import missing_data, parse_task_list
from taxon.models import STAGE_META, load_model
from taxon.study.plan import PlannedExperiment, PlannedStage, eval_key, plan, unique_stages
from taxon.study.store import Store
from taxon.train import train_stage, use_bf16


def _ensure_stage(stage: PlannedStage, location: str, store: Store, console: Console,
                  label: str) -> None:
    meta = stage.path / STAGE_META
    if meta.is_file():  # only complete checkpoints have it (written last, then renamed in)
        console.print(f"[dim]reuse stage {stage.id} ({label})[/dim]")
        figures = json.loads(meta.read_text())["figures"]
    else:
        console.print(f"[bold]train stage {stage.id}[/bold] ({label}): {stage.spec.objective}, "
                      f"{stage.spec.steps} steps")
        figures = train_stage(stage.spec, location, stage.path, desc=label)
    store.add_stage(stage.id, stage.parent, stage.spec.model_dump(mode="json"), str(stage.path),
                    figures)


def _skip_missing(task, console: Console) -> bool:
    reason = missing_data(task)
    if reason:
        console.print(f"[yellow]skip {task.name}[/yellow]: {reason}")
    return reason is not None


def evaluate_model(location: str, model_key: str, spec: EvalSpec, store: Store,
                   console: Console) -> None:
    """Evaluate one model on every task of `spec` that the store does not hold yet."""
    tasks = parse_task_list(spec.tasks)
    if list(spec.tasks) == ["all"]:  # the suite runs what it can; named tasks must all load
        tasks = [t for t in tasks if not _skip_missing(t, console)]
    pending = [t for t in tasks if not store.has_result(model_key, eval_key(t, spec))]
    if not pending:
        console.print("[dim]all results already stored[/dim]")
        return
    model, tokenizer = load_model(location)
    meta = Path(location) / STAGE_META
    trainable = json.loads(meta.read_text())["figures"].get("trainable_params") if meta.is_file() else None
    for task in pending:
        r = evaluate_task(model, tokenizer, task, shots=spec.shots, limit=spec.limit,
                          seed=spec.seed, batch_size=spec.batch_size,
                          bf16=use_bf16(spec.precision), trainable_params=trainable)
        store.add_result(model_key, eval_key(task, spec), r)
        m = r.metrics[task.primary]
        eff = r.metrics["efficiency"]
        console.print(f"  {task.name}: {task.primary} {m['value']:.3f} "
                      f"[{m['low']:.3f}, {m['high']:.3f}] on {r.n} items ({r.seconds:.0f} s, "
                      f"{eff['tokens_per_s']:.0f} tokens/s, peak {eff['peak_memory_mb']:.0f} MB)")


def run_study(study: StudySpec, store: Store, console: Console | None = None) -> list[PlannedExperiment]:
    console = console or Console()
    experiments = plan(study)
    n_stage_refs = sum(len(e.stages) for e in experiments)
    console.print(f"study [bold]{study.name}[/bold]: {len(experiments)} experiments, "
                  f"{len(unique_stages(experiments))} stages to train or reuse "
                  f"({n_stage_refs} without sharing)")
    for i, exp in enumerate(experiments, 1):
        console.rule(f"[{i}/{len(experiments)}] {exp.name}")
        location = exp.model
        for j, stage in enumerate(exp.stages, 1):
            _ensure_stage(stage, location, store, console, f"{exp.name} {j}/{len(exp.stages)}")
            location = str(stage.path)
        store.add_experiment(study.name, exp.name, exp.model, exp.model_key,
                             [s.id for s in exp.stages],
                             next(e for e in study.experiments if e.name == exp.name)
                             .model_dump(mode="json"))
        evaluate_model(exp.location, exp.model_key, study.eval, store, console)
    return experiments
