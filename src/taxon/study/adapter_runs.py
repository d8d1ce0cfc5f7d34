"""After a study's jobs: each adapter set's adapters recorded in the store (train and eval loss,
time, size, trainable parameters), copied out as peft folders named by dataset, and every model
of the set (the base, each adapter, the multi-task one) answering every dataset's validation
prompts with automatic checks (evals/validation). Answers already stored for the same model and
the same prompts are reused, like every other result."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from taxon.config import AdapterSetSpec, StudySpec
from taxon.evals import validation
from taxon.models import copy_checkpoint, load_model, use_bf16
from taxon.study.plan import PlannedExperiment
from taxon.study.store import Store


def members(study: StudySpec, experiments: list[PlannedExperiment],
            aset: AdapterSetSpec) -> list[tuple[PlannedExperiment, dict]]:
    """The set's planned experiments with their axes (dataset key, task, seed), base first."""
    axes = {e.name: e.axes or {} for e in study.experiments}
    return [(e, axes[e.name]) for e in experiments if axes[e.name].get("adapter_set") == aset.name]


def folder_name(axes: dict, seeded: bool) -> str:
    return f"{axes['dataset']}.seed{axes['seed']}" if seeded else str(axes["dataset"])


def record_adapters(study: StudySpec, experiments: list[PlannedExperiment], store: Store,
                    out: Path | None) -> list[dict]:
    """One `adapters` row per trained adapter; with `out`, its peft folder copied to
    `out/<set>/<dataset key>` (`.seed<s>` added when the study has several seeds)."""
    rows = []
    seeded = study.seeds is not None
    for aset in study.adapter_sets:
        for exp, axes in members(study, experiments, aset):
            if not exp.stages:
                continue
            stage = exp.stages[-1]
            figures = (store.stage(stage.id) or {}).get("figures", {})
            folder = None
            if out is not None:
                folder = copy_checkpoint(stage.path, (out / aset.name / folder_name(axes, seeded)).resolve())
            row = {"study": study.name, "adapter_set": aset.name, "dataset": axes["dataset"],
                   "experiment": exp.name, "stage_id": stage.id,
                   "folder": str(folder or stage.path), "train_loss": figures.get("train_loss"),
                   "eval_loss": figures.get("eval_loss"), "train_seconds": figures.get("train_seconds"),
                   "weights_bytes": figures.get("weights_bytes"),
                   "trainable_params": figures.get("trainable_params"),
                   "train_examples": sum(m.get("pool", 0) for m in figures.get("mixture", {}).values()),
                   "eval_examples": figures.get("eval_examples")}
            store.add_adapter(row)
            rows.append(row)
    return rows


def run_validations(study: StudySpec, experiments: list[PlannedExperiment], store: Store,
                    console: Console, run_id: str | None = None) -> int:
    """Each model of each set with `validation` on every dataset's validation prompts; returns
    how many (model, dataset) pairs were checked now (stored ones are reused)."""
    done = 0
    bf16 = use_bf16(study.eval.precision)
    for aset in study.adapter_sets:
        if not aset.validation:
            continue
        sets = []
        for key, d in aset.datasets.items():
            vset = validation.for_dataset(d.dataset)
            if vset is None:
                console.print(f"[yellow]adapter set {aset.name}: dataset {key} has no validation "
                              f"prompts (add src/taxon/evals/validation/<card>.yaml)[/yellow]")
            else:
                sets.append(vset)
        seen: set[str] = set()
        for exp, _ in members(study, experiments, aset):
            if exp.model_key in seen:
                continue
            seen.add(exp.model_key)
            todo = [v for v in sets if not store.has_validation(exp.model_key, v.key())]
            if not todo:
                continue
            model, tokenizer = load_model(exp.location)
            for vset in todo:
                rows = validation.run_set(model, tokenizer, vset, bf16=bf16)
                store.add_validation(exp.model_key, vset.key(), vset.dataset, rows, run_id)
                passed = sum(r["passed"] for r in rows)
                console.print(f"  {escape(exp.name)} / validation {vset.dataset}: {passed}/{len(rows)} "
                              "checks passed", highlight=False)
                done += 1
            del model
    return done
