"""The `taxon` command line: verbs only; the work happens in the modules they call."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from taxon.errors import TaxonError, guarded
from taxon.settings import CARDS_DIR_ENV, DATA_DIR_ENV

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Which training recipe lets a small model reach a large model's score.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset cards and rows.")
study_app = typer.Typer(no_args_is_help=True, help="Run a study file.")
app.add_typer(data_app, name="data")
app.add_typer(study_app, name="study")
console = Console()

DEFAULT_STORE = Path("results/taxon.sqlite")
StoreOpt = Annotated[Path, typer.Option("--store", help="SQLite results file.")]


@app.callback()
def _global(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help=f"Local dataset mirror (<org>/<name>/<config>/<split>.jsonl); "
        f"default ${DATA_DIR_ENV}.")] = None,
    cards_dir: Annotated[Path | None, typer.Option(
        "--cards-dir", help=f"Folder of your own dataset cards; default ${CARDS_DIR_ENV}.")] = None,
) -> None:
    if data_dir is not None:
        os.environ[DATA_DIR_ENV] = str(data_dir)
    if cards_dir is not None:
        os.environ[CARDS_DIR_ENV] = str(cards_dir)


@app.command()
def models(
    prepare: Annotated[str | None, typer.Option(help="Convert/build this alias into the cache.")]
    = None,
) -> None:
    """List model aliases and where each resolves now."""
    from taxon import models as m

    if prepare:
        console.print(f"{prepare}: {m.prepare(prepare)}")
        return
    table = Table("alias", "Hub id", "resolves to")
    for row in m.describe_all():
        table.add_row(*row)
    console.print(table)


@data_app.command("list")
def data_list() -> None:
    """Known dataset cards: kind, configs, and where each would load from now."""
    from taxon.data.cards import all_cards
    from taxon.data.sources import where

    table = Table("id", "aliases", "kind", "configs", "splits", "loads from")
    for c in all_cards():
        table.add_row(c.id, ", ".join(c.aliases), c.kind, ", ".join(c.configs),
                      ", ".join(c.for_config(None).available_splits()), where(c))
    console.print(table)


@data_app.command("show")
def data_show(
    dataset: str,
    config: Annotated[str | None, typer.Option(help="Config (default: the card's).")] = None,
    split: Annotated[str, typer.Option(help="Split.")] = "train",
    n: Annotated[int, typer.Option("-n", help="Rows to show.")] = 3,
) -> None:
    """Print a few rows rendered as pretraining text and as SFT (prompt, completion) pairs."""
    from taxon.data import render
    from taxon.data.cards import get_card
    from taxon.data.sources import load_rows

    card = get_card(dataset).for_config(config)
    rows = load_rows(dataset, config, split, limit=n)
    console.print(f"[bold]{card.id}[/bold] ({card.config}, {split}): "
                  f"{card.kind}", highlight=False)
    for i, row in enumerate(rows):
        console.rule(f"row {i}")
        console.print("[cyan]text:[/cyan]", render.as_text(card, row), highlight=False)
        if card.templates.prompt is not None:
            prompt, completion = render.as_pair(card, row)
            console.print("[cyan]prompt:[/cyan]", prompt, highlight=False)
            console.print("[cyan]completion:[/cyan]", repr(completion), highlight=False)


@data_app.command("check")
def data_check(
    datasets: Annotated[list[str] | None, typer.Argument(
        help="Card ids or aliases (default: every card).", show_default=False)] = None,
    config: Annotated[str | None, typer.Option(help="Only this config.")] = None,
    limit: Annotated[int, typer.Option(help="Rows per split on which every template is rendered.")]
    = 2000,
) -> None:
    """Load every split of each card from the mirror (or the Hub) and validate it: declared
    fields, label range, templates on every row checked, empty texts, train/test overlap."""
    from taxon.data import check

    results = check.run(datasets or [], config, limit)
    console.print(check.table(results), highlight=False)
    for line in check.report_lines(results):
        console.print(line, highlight=False, soft_wrap=True)
    failed = [r for r in results if r.failed]
    if failed:
        err = Console(stderr=True)
        for r in failed:
            err.print(r.line(), highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(2)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Alias, Hub id, local folder or checkpoint.")],
    dataset: Annotated[list[str], typer.Option(help="Dataset id; repeat for a mixture.")],
    output: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    objective: Annotated[str, typer.Option(help="pretrain or sft.")] = "sft",
    config: Annotated[list[str] | None, typer.Option(help="Config per dataset.")] = None,
    rate: Annotated[list[float] | None, typer.Option(help="Mixture rate per dataset.")] = None,
    steps: int = 100, batch_size: int = 8, grad_accum: int = 1, lr: float = 2e-4,
    warmup_ratio: float = 0.1, schedule: str = "cosine", max_length: int = 256,
    decay_ratio: Annotated[float | None, typer.Option(help="wsd: cooldown share (default 0.2).")] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tuning.")] = 16,
    lora_alpha: int = 32, lora_dropout: float = 0.05, seed: int = 0,
    packing: Annotated[bool | None, typer.Option(
        help="SFT batches as one padding-free row (default: on CUDA only).")] = None,
) -> None:
    """Train one stage and write a checkpoint that `eval` and later stages can load."""
    from taxon.config import StageSpec, parse
    from taxon.models import resolve_targets
    from taxon.train import train_stage

    configs = config or [None] * len(dataset)
    rates = rate or [None] * len(dataset)
    if len(configs) != len(dataset) or len(rates) != len(dataset):
        raise TaxonError("give one --config and one --rate per --dataset (or none)")
    spec = parse(StageSpec, {
        "objective": objective, "steps": steps, "batch_size": batch_size,
        "grad_accum": grad_accum, "lr": lr, "warmup_ratio": warmup_ratio, "schedule": schedule,
        "decay_ratio": decay_ratio,
        "max_length": max_length, "seed": seed, "packing": packing,
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout} if lora_r else None,
        "data": [{"dataset": d, "config": c, "rate": r}
                 for d, c, r in zip(dataset, configs, rates, strict=True)],
    }, "command line")
    figures = train_stage(resolve_targets(spec, model), model, output)  # type: ignore[arg-type]
    console.print(f"wrote {output}: loss {figures['final_loss']:.3f}, "
                  f"{figures['tokens']} tokens at {figures['tokens_per_s']:.0f} tokens/s, "
                  f"packing efficiency {figures['packing_efficiency']:.1%}")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option(help="Alias, Hub id, local folder or checkpoint.")],
    tasks: Annotated[str, typer.Option(
        help="Comma-separated task names, or 'all': every built-in task (tasks whose data cannot "
        "be loaded are skipped with a line saying why).")] = "fpb",
    shots: Annotated[int | None, typer.Option(help="Few-shot count (default: task's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Seeded subsample of each test set.")] = None,
    seed: int = 0,
    batch_size: int = 16,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Evaluate a model on tasks; results go to the store and a table is printed."""
    from taxon.config import EvalSpec, parse
    from taxon.evals.tasks import parse_task_list
    from taxon.report.tables import results_table
    from taxon.study.run import evaluate_model
    from taxon.study.store import Store

    spec = parse(EvalSpec, {"tasks": tasks.split(","), "shots": shots, "limit": limit,
                            "seed": seed, "batch_size": batch_size}, "command line")
    parse_task_list(spec.tasks)  # unknown task names fail before the model loads
    key = f"model:{model}"
    s = Store(store)
    evaluate_model(model, key, spec, s, console)  # type: ignore[arg-type]
    s.add_experiment("eval", model, model, key, [], {"model": model})
    console.print(results_table(s, "eval"), highlight=False)


@study_app.command("plan")
def study_plan(
    file: Path,
    gpu: Annotated[str, typer.Option(help="GPU for the time estimate (h100, a100, l4, ...).")] = "h100",
    mfu: Annotated[float, typer.Option(help="Model FLOP utilisation assumed on that GPU.")] = 0.3,
    tree: Annotated[bool, typer.Option(help="Print the stage graph.")] = True,
) -> None:
    """Print the experiments, the stage graph, steps with and without reuse and estimated time;
    trains and loads nothing."""
    from taxon.config import load_study
    from taxon.study.plan import plan
    from taxon.study.plan_report import print_plan

    study = load_study(file)
    print_plan(study, plan(study), console, gpu=gpu, mfu=mfu, tree=tree)


@study_app.command("run")
def study_run(
    file: Path,
    store: Annotated[Path | None, typer.Option(
        help="SQLite results file (default results/<study name>.sqlite).")] = None,
    report: Annotated[Path | None, typer.Option(help="Also write the table to this file.")]
    = None,
    executor: Annotated[str, typer.Option(help="local (this machine) or ray.")] = "local",
    workers: Annotated[int, typer.Option(help="Jobs at once (local: worker processes; 1 = in this "
                                         "process).")] = 1,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local "
                                                "one).")] = None,
    gpus: Annotated[float | None, typer.Option(help="GPUs per job on Ray (default: 1 if the "
                                               "cluster has GPUs).")] = None,
    report_to: Annotated[list[str] | None, typer.Option(
        "--report-to", help="Mirror training and eval metrics to mlflow or wandb (offline by "
        "default); repeatable.")] = None,
    json_dir: Annotated[Path | None, typer.Option(help="Folder for one JSON file per experiment "
                                                  "(default results/<study>/json).")] = None,
    launcher: Annotated[str | None, typer.Option(help="Run each stage's training under this "
                                                 "command, e.g. 'accelerate launch --multi_gpu "
                                                 "--num_processes 4' (DDP).")] = None,
) -> None:
    """Train what is missing, evaluate what is missing, print the results table."""
    from taxon.config import load_study
    from taxon.report.tables import results_table
    from taxon.study import executors, tracking
    from taxon.study.run import run_study
    from taxon.study.store import Store

    study = load_study(file)
    tracking.check(tuple(report_to or ()))
    tracking.setup(tuple(report_to or ()), study.name, Path("results") / study.name)
    ex = executors.make(executor, workers, address, gpus)
    s = Store(store or Path("results") / f"{study.name}.sqlite")
    run_study(study, s, console, executor=ex, report_to=tuple(report_to or ()),
              json_dir=json_dir or Path("results") / study.name / "json", launcher=launcher)
    table = results_table(s, study.name)
    console.rule("results")
    console.print(table, highlight=False)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(f"# {study.name}\n\n{table}\n")
        console.print(f"table written to {report}")


@app.command()
def report(
    store: StoreOpt = DEFAULT_STORE,
    study: Annotated[str | None, typer.Option(help="Only this study.")] = None,
    json_dir: Annotated[Path | None, typer.Option(
        "--json", help="Also write one JSON file per experiment into this folder.")] = None,
) -> None:
    """Print the results table of a store."""
    from taxon.report.tables import results_table
    from taxon.study.store import Store

    if not store.is_file():
        raise TaxonError(f"no results store at {store}; run `taxon study run` or `taxon eval` first")
    console.print(results_table(Store(store), study), highlight=False)
    if json_dir is not None:
        from taxon.study.export import export_study

        paths = export_study(Store(store), study, json_dir)
        console.print(f"{len(paths)} experiment JSON files written to {json_dir}")


def main() -> None:
    sys.exit(guarded(app))


if __name__ == "__main__":
    main()
