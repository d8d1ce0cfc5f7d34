"""Run a study: train each stage once (parents first), evaluate each model once per task, store.

The study becomes a graph of jobs: one per stage (after its parent stage) and one per (model, eval
task) (after the model's last stage). The driver hands ready jobs to an executor (this process, N
local workers, or Ray) and alone writes the store. Before starting a job it takes the job's file
lock and looks again whether the job is done (a complete checkpoint; a stored result), so two
`study run` processes sharing a store and a stage cache never do one job twice: the second one
works on other jobs meanwhile, or waits. A job's outcome goes into the store in one transaction,
so a run killed at any moment leaves whole rows or none, and the next run does what is missing.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from taxon.config import EvalSpec, ExperimentSpec, StageSpec, StudySpec
from taxon.errors import TaxonError
from taxon.evals.tasks import get_task, missing_data, parse_task_list
from taxon.identity import stage_meta
from taxon.models import STAGE_META, copy_checkpoint, missing_base
from taxon.schedule import checkpoint, whole_run
from taxon.settings import cache_dir
from taxon.study import adapter_runs, tracking, validate
from taxon.study.environment import environment
from taxon.study.executors import Sequential
from taxon.study.locks import FileLock, lock_for
from taxon.study.plan import (
    PlannedCompose,
    PlannedExperiment,
    PlannedStage,
    eval_key,
    stage_id,
    unique_stages,
)
from taxon.study.store import Store
from taxon.study.work import compose_job, evaluate_job, train_job

POLL_SECONDS = 0.5  # how often a run waiting on another process's lock looks again


@dataclass
class _Ctx:
    study: str
    store: Store
    console: Console
    run_id: str
    eval: EvalSpec
    report_to: tuple[str, ...]
    launcher: str | None = None
    figures: dict = field(default_factory=dict)  # stage id -> training figures (for eval rows)
    train_options: dict = field(default_factory=dict)  # save_steps, save_total_limit (main.py)
    switch_adapters: bool = False  # LoRA adapters evaluated over one loaded base (work.evaluate_job)


def usable(folder: Path) -> bool:
    """A complete checkpoint that can still load: its metadata was written (last), and a LoRA
    adapter's base folder still exists (checkpoints written before bases were recorded by their
    cached stage could name a folder that was since removed)."""
    meta = stage_meta(folder)
    return meta is not None and not missing_base(meta)


def clear_incomplete(stage: PlannedStage) -> list[Path]:
    """Remove what a killed writer left of `stage`: temp folders of `models.atomic_save` and a
    folder without `taxon_stage.json` (which is written last). Call only while holding the
    stage's lock."""
    found = sorted(stage.path.parent.glob(stage.path.name + ".tmp*"))
    if stage.path.exists() and not usable(stage.path):
        found.append(stage.path)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


@dataclass
class StageJob:
    stage: PlannedStage
    base: str  # the model name, or the parent stage's checkpoint folder
    label: str
    deps: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"stage:{self.stage.id}"

    def lock(self) -> FileLock:
        return lock_for("stage", self.stage.id)

    def done(self, ctx: _Ctx) -> bool:
        return usable(self.stage.path)

    def call(self, ctx: _Ctx) -> tuple:
        removed = clear_incomplete(self.stage)
        if removed:
            ctx.console.print(f"[yellow]stage {self.stage.id}: removed an incomplete or unloadable "
                              f"checkpoint ({', '.join(p.name for p in removed)}); training it "
                              "again[/yellow]")
        if self.stage.kind == "checkpoint":
            ctx.console.print(f"[yellow]stage {self.stage.id} ({self.label}): its run did not keep "
                              "this checkpoint (trained before it was asked to); training its "
                              f"{self.stage.spec.steps} steps alone, which gives the same "
                              "weights[/yellow]")
        ctx.console.print(f"[bold]train stage {self.stage.id}[/bold] ({self.label}): "
                          f"{self.stage.spec.objective}, {self.stage.spec.steps} steps"
                          + (f", {self.stage.note}" if self.stage.kind != "run" else ""))
        return train_job, (self.stage.spec, self.base, str(self.stage.path), self.label,
                           ctx.report_to, f"{self.label} [{self.stage.id}]", ctx.launcher,
                           self.stage.id, ctx.train_options.get("save_steps"),
                           ctx.train_options.get("save_total_limit"), kept_checkpoints(self.stage))

    def record(self, ctx: _Ctx, figures: dict | None) -> None:
        """`figures` from training just now, or None: the checkpoint was already there."""
        trained = figures is not None
        if not trained:
            figures = json.loads((self.stage.path / STAGE_META).read_text())["figures"]
            kept = f", kept by run {figures['checkpoint_of']}" if figures.get("checkpoint_of") else ""
            ctx.console.print(f"[dim]reuse stage {self.stage.id} ({self.label}{kept})[/dim]")
            if ctx.train_options.get("save_steps") and not any(self.stage.path.glob("checkpoint-*")):
                ctx.console.print(f"[yellow]stage {self.stage.id} was trained earlier without "
                                  "--save_steps: it has no intermediate checkpoints (they are "
                                  "written only while a stage trains)[/yellow]")
        ctx.figures[self.stage.id] = figures
        ctx.store.add_stage(self.stage.id, self.stage.parent, self.stage.spec.model_dump(mode="json"),
                            str(self.stage.path), figures, run_id=ctx.run_id, trained=trained)


@dataclass
class ComposeJob:
    """Merge the members' final LoRA adapters (after their stages) into the composite's folder."""

    compose: PlannedCompose
    label: str

    @property
    def key(self) -> str:
        return f"compose:{self.compose.id}"

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(f"stage:{m.id}" for m in self.compose.members)

    def lock(self) -> FileLock:
        return lock_for("compose", self.compose.id)

    def done(self, ctx: _Ctx) -> bool:
        return usable(self.compose.path)

    def call(self, ctx: _Ctx) -> tuple:
        spec = self.compose.spec
        for path in sorted(self.compose.path.parent.glob(self.compose.path.name + ".tmp*")):
            shutil.rmtree(path, ignore_errors=True)  # what a killed merge left
        ctx.console.print(f"[bold]compose {self.compose.id}[/bold] ({self.label}): {spec.method} of "
                          f"{len(spec.members)} adapters, weights "
                          f"{', '.join(f'{w:g}' for w in spec.member_weights())}"
                          + (f", density {spec.density:g}" if spec.density is not None else ""))
        return compose_job, ([str(m.path) for m in self.compose.members], spec,
                             str(self.compose.path), self.compose.id)

    def record(self, ctx: _Ctx, meta: dict | None) -> None:
        if meta is None:
            ctx.console.print(f"[dim]reuse composite {self.compose.id} ({self.label})[/dim]")


@dataclass
class EvalJob:
    model_key: str
    location: str
    task: str
    eval_key: str
    experiments: tuple[str, ...]
    last_stage: str | None
    deps: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"eval:{self.model_key}:{self.eval_key}"

    def lock(self) -> FileLock:
        return lock_for("eval", f"{self.model_key}-{self.eval_key}")

    def done(self, ctx: _Ctx) -> bool:
        return ctx.store.has_result(self.model_key, self.eval_key)

    def call(self, ctx: _Ctx) -> tuple:
        return evaluate_job, (self.location, self.task, ctx.eval, ctx.switch_adapters)

    def record(self, ctx: _Ctx, outcome: tuple | None) -> None:
        if outcome is None:
            return
        result, resources = outcome
        if self.last_stage is not None and self.last_stage in ctx.figures:
            resources["trainable_params"] = ctx.figures[self.last_stage].get("trainable_params")
        ctx.store.add_result(self.model_key, self.eval_key, result, resources, ctx.run_id)
        primary = get_task(self.task).primary
        m, eff = result.metrics[primary], result.metrics["efficiency"]
        api = result.metrics.get("settings", {}).get("api")
        if api is not None:  # a model behind an API: requests, cache, tokens and cost instead
            cost = (f"{api['method']}, {api['requests']} requests, {api['cache_hits']} from the cache, "
                    f"{api['retries']} retries, {api['prompt_tokens']:,} + {api['completion_tokens']:,} "
                    f"tokens, ${api['cost_usd']:.4f} (this run ${api['spent_usd']:.4f})"
                    + (f", {api['unparsed']} unparsed replies" if api["unparsed"] else ""))
        else:
            cost = (f"{eff['tokens_per_s'] or 0:.0f} tokens/s, peak {eff['peak_memory_mb']:.0f} MB")
        ctx.console.print(f"  {escape(', '.join(self.experiments))} / {self.task}: "
                          f"{primary} {m['value']:.3f} [{m['low']:.3f}, "
                          f"{m['high']:.3f}] on {result.n} items ({result.seconds:.0f} s, {cost})",
                          highlight=False)
        if ctx.report_to:
            tracking.log_eval(ctx.report_to, ctx.study, list(self.experiments), self.model_key,
                              self.task, result.metrics, resources)


def kept_checkpoints(stage: PlannedStage) -> dict[int, tuple[str, str]]:
    """{step: (stage id, folder)} of the checkpoints `stage` keeps while it trains."""
    out = {}
    for step in stage.spec.checkpoints:
        sid = stage_id(stage.parent, checkpoint(stage.spec, step))
        out[step] = (sid, str(cache_dir() / "stages" / sid))
    return out


def runnable_tasks(spec: EvalSpec, console: Console | None = None) -> list:
    """The tasks of `spec`. `all` is the suite minus tasks whose data cannot be loaded here (each
    skip is printed); tasks named one by one must all load."""
    if not spec.tasks:  # main.py --eval_tasks none, taxon train
        return []
    tasks = parse_task_list(spec.tasks)
    if list(spec.tasks) != ["all"]:
        return tasks
    out = []
    for task in tasks:
        reason = missing_data(task)
        if reason and console is not None:
            console.print(f"[yellow]skip {task.name}[/yellow]: {reason}")
        if not reason:
            out.append(task)
    return out


def durable_base(exp: PlannedExperiment) -> str:
    """Where the experiment's first stage starts from, as its checkpoint will record it (a LoRA
    stage loads its base from there, in any later study that reuses it). A model folder that is a
    copy of a cached stage (main.py's --output_dir) is named by the cached stage itself: the copy
    may be moved or deleted, while the stage id, and so the reuse, stays."""
    cached = cache_dir() / "stages" / exp.root
    if ":" not in exp.root and (cached / STAGE_META).is_file():
        return str(cached)
    return exp.model


def build_jobs(study: StudySpec, experiments: list[PlannedExperiment],
               console: Console | None = None) -> dict:
    """Every job of the study, keyed, in the order a sequential run does them: experiment by
    experiment, stages first, then its evaluations."""
    tasks = runnable_tasks(study.eval, console)
    jobs: dict = {}
    for exp in experiments:
        base = durable_base(exp)
        for j, stage in enumerate(exp.stages, 1):
            job = StageJob(stage, base, f"{exp.name} {j}/{len(exp.stages)}",
                           (f"stage:{stage.parent}",) if j > 1 else ())
            if stage.kind == "checkpoint":  # after the run that keeps it: then it is there
                job.deps += (f"stage:{stage_id(stage.parent, whole_run(stage.spec))}",)
            jobs.setdefault(job.key, job)
            base = str(stage.path)
        last = exp.stages[-1].id if exp.stages else None
        after = (f"stage:{last}",) if last else ()
        if exp.compose is not None:
            job = ComposeJob(exp.compose, exp.name)
            jobs.setdefault(job.key, job)
            after = (job.key,)
        for task in tasks:
            if exp.model_key.startswith("api:") and task.output == "perplexity":
                if console is not None:  # only `--tasks all` gets here: a named one is refused first
                    console.print(f"[yellow]skip {task.name}[/yellow] for {exp.model}: perplexity "
                                  "cannot be scored through an API")
                continue
            job = EvalJob(exp.model_key, exp.location, task.name, eval_key(task, study.eval, exp.model_key),
                          (exp.name,),
                          last, after)
            if job.key in jobs:  # another experiment ends in the same model
                jobs[job.key].experiments += (exp.name,)
            else:
                jobs[job.key] = job
    return jobs


def _drive(jobs: dict, ctx: _Ctx, executor, on_done) -> None:
    """Run `jobs` on `executor`, parents first; `on_done(job)` after each is recorded."""
    pending, running, done = dict(jobs), {}, set()
    held: dict[str, FileLock] = {}
    try:
        while pending or running:
            waiting_on_others = False
            for key, job in list(pending.items()):
                if len(running) >= executor.slots:
                    break
                if any(d not in done for d in job.deps):
                    continue
                lock = job.lock()
                if not lock.try_acquire():
                    waiting_on_others = True  # another process is on it; look again later
                    continue
                del pending[key]
                if job.done(ctx):
                    lock.release()
                    job.record(ctx, None)
                    done.add(key)
                    on_done(job)
                    continue
                held[key] = lock
                fn, args = job.call(ctx)
                running[executor.submit(fn, *args)] = job
            if running:
                for handle in executor.wait(list(running), timeout=POLL_SECONDS if pending else None):
                    job = running.pop(handle)
                    outcome = executor.result(handle)  # a job's error ends the run here
                    job.record(ctx, outcome)
                    held.pop(job.key).release()
                    done.add(job.key)
                    on_done(job)
            elif pending:
                if not waiting_on_others and not any(
                        all(d in done for d in j.deps) for j in pending.values()):
                    raise RuntimeError(f"jobs with unmet dependencies: {sorted(pending)}")
                time.sleep(POLL_SECONDS)
    finally:
        for lock in held.values():
            lock.release()


def run_study(study: StudySpec, store: Store, console: Console | None = None, executor=None,
              report_to: tuple[str, ...] = (), json_dir: Path | None = None,
              launcher: str | None = None, train_options: dict | None = None,
              experiments: list[PlannedExperiment] | None = None,
              switch_adapters: bool = False) -> list[PlannedExperiment]:
    """Validate the whole study (nothing trains if any experiment has a problem), then train and
    evaluate what the store and the stage cache lack. `train_options`: save_steps and
    save_total_limit for main.py's intermediate checkpoints. `switch_adapters`: evaluate LoRA
    adapters over their base loaded once instead of each merged into its own copy."""
    console = console or Console()
    executor = executor or Sequential()
    if experiments is None:
        experiments = validate.checked_plan(study, for_run=True, console=console)
    n_stage_refs = sum(len(e.stages) for e in experiments)
    console.print(f"study [bold]{study.name}[/bold]: {len(experiments)} experiments, "
                  f"{len(unique_stages(experiments))} stages to train or reuse "
                  f"({n_stage_refs} without sharing); executor {executor.name}")
    jobs = build_jobs(study, experiments, console)
    ctx = _Ctx(study.name, store, console, uuid.uuid4().hex[:16], study.eval, tuple(report_to),
               launcher, train_options=dict(train_options or {}), switch_adapters=switch_adapters)
    store.start_run(ctx.run_id, study.name, executor.name, environment())
    store.add_study(study.name, study.model_dump(mode="json"))
    evals_of = {e.name: {k: j.eval_key for k, j in jobs.items()
                         if isinstance(j, EvalJob) and e.name in j.experiments}
                for e in experiments}
    evals_left = {name: set(keys) for name, keys in evals_of.items()}
    specs = {e.name: e for e in study.experiments}
    by_name = {e.name: e for e in experiments}
    n_done = [0]

    def finish(name: str) -> None:
        """The experiment is complete: its row goes in last."""
        exp = by_name[name]
        store.add_experiment(study.name, name, exp.model, exp.model_key, [s.id for s in exp.stages],
                             specs[name].model_dump(mode="json"), list(evals_of[name].values()),
                             ctx.run_id)
        if json_dir is not None:
            from taxon.study.export import write_experiment_json

            write_experiment_json(store, study.name, name, json_dir)

    def on_done(job) -> None:
        n_done[0] += 1
        console.print(f"[dim]{n_done[0]}/{len(jobs)} jobs done[/dim]")
        if not isinstance(job, EvalJob):
            return
        for name in job.experiments:
            evals_left[name].discard(job.key)
            if not evals_left[name]:
                finish(name)

    try:
        _drive(jobs, ctx, executor, on_done)
    finally:
        executor.shutdown()
    for name, keys in evals_of.items():
        if not keys:  # an experiment with no eval task (main.py --eval_tasks none)
            finish(name)
    if study.adapter_sets:  # per-adapter rows, peft folders by dataset, validation prompts
        adapter_runs.record_adapters(study, experiments, store,
                                     json_dir.parent / "adapters" if json_dir is not None else None)
        adapter_runs.run_validations(study, experiments, store, console, ctx.run_id)
    store.finish_run(ctx.run_id)
    return experiments


def run_models(study_name: str, models: list[str], spec: EvalSpec, store: Path,
               console: Console) -> tuple[list[PlannedExperiment], Store]:
    """`taxon eval` with several models: one zero-stage experiment each, in one study; LoRA
    adapters (stage checkpoints, composites) over one base are evaluated over that base loaded
    once, switching adapters. Returns the experiments and the open store."""
    if len(set(models)) != len(models):
        raise TaxonError(f"--model repeats a model ({', '.join(models)}); give each once")
    study = StudySpec(name=study_name, model=models[0], seed=spec.seed, eval=spec,
                      experiments=tuple(ExperimentSpec(name=m, model=m) for m in models))
    planned = validate.checked_plan(study, for_run=True, console=console, single=True)
    opened = Store(store)
    return run_study(study, opened, console, experiments=planned, switch_adapters=True), opened


def run_single(study_name: str, name: str, model: str, stages: tuple[StageSpec, ...], spec: EvalSpec,
               store: Path, console: Console, train_options: dict | None = None,
               checkpoint_to: Path | None = None) -> tuple[PlannedExperiment, Store]:
    """`main.py`, `taxon train` and `taxon eval`: one experiment run like any study: validated
    before the store is opened or anything loads, stages from the content-addressed cache,
    results keyed by the model's identity. `checkpoint_to`: also copy the last stage's
    checkpoint there. Returns the experiment and the open store."""
    study = StudySpec(name=study_name, model=model, seed=spec.seed, eval=spec,
                      experiments=(ExperimentSpec(name=name, stages=stages),))
    planned = validate.checked_plan(study, for_run=True, console=console, single=True)
    opened = Store(store)
    (exp,) = run_study(study, opened, console, train_options=train_options, experiments=planned)
    if checkpoint_to is not None and exp.stages:
        copy_checkpoint(exp.stages[-1].path, checkpoint_to)
    return exp, opened
