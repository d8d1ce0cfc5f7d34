"""The `taxon` command line: verbs only; the work happens in the modules they call."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from taxon.config import ComposeSpec, EvalSpec, StageSpec, default, parse
from taxon.endpoints import ENDPOINTS_ENV
from taxon.errors import TaxonError, guarded
from taxon.settings import CARDS_DIR_ENV, DATA_DIR_ENV

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Which training recipe lets a small model reach a large model's score.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset cards and rows.")
study_app = typer.Typer(no_args_is_help=True, help="Run a study file.")
app.add_typer(data_app, name="data")
app.add_typer(study_app, name="study")
adapters_app = typer.Typer(no_args_is_help=True, help="LoRA adapters: merge them into one.")
app.add_typer(adapters_app, name="adapters")
corpus_app = typer.Typer(no_args_is_help=True, help="Build a cleaned domain corpus from text sources.")
app.add_typer(corpus_app, name="corpus")
console = Console()

DEFAULT_STORE = Path("results/taxon.sqlite")
StoreOpt = Annotated[Path, typer.Option("--store", help="SQLite results file.")]


def at_least(value, low, flag: str, strict: bool = False):
    """A numeric option out of range is one line naming the flag (typer's own range errors print
    a usage box instead)."""
    if value is not None and (value <= low if strict else value < low):
        raise TaxonError(f"{flag} {value}: must be {'above' if strict else 'at least'} {low}")
    return value


@app.callback()
def _global(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help=f"Local dataset mirror (<org>/<name>/<config>/<split>.jsonl); "
        f"default ${DATA_DIR_ENV}.")] = None,
    cards_dir: Annotated[Path | None, typer.Option(
        "--cards-dir", help=f"Folder of your own dataset cards; default ${CARDS_DIR_ENV}.")] = None,
    endpoints: Annotated[Path | None, typer.Option(
        "--endpoints", help=f"YAML file of your own API endpoints (added to and overriding the "
        f"shipped ones) for --model api:<endpoint>/<model>; default ${ENDPOINTS_ENV}.")] = None,
) -> None:
    if endpoints is not None:
        os.environ[ENDPOINTS_ENV] = str(endpoints)
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

    at_least(n, 1, "-n")
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

    at_least(limit, 1, "--limit")
    results = check.run(datasets or [], config, limit)
    console.print(check.table(results), highlight=False)
    for line in check.report_lines(results):
        console.print(line, highlight=False, soft_wrap=True, markup=False, emoji=False)
    failed = [r for r in results if r.failed]
    if failed:
        err = Console(stderr=True)
        for r in failed:
            err.print(r.line(), highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(2)


# Each `taxon train` option and the StageSpec field it sets; defaults come from the spec
# (tests/test_flags.py fails if an option or a default drifts).
TRAIN_FLAGS = {
    "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr",
    "warmup_ratio": "warmup_ratio", "schedule": "schedule", "decay_ratio": "decay_ratio",
    "max_length": "max_length", "lora_r": "lora.r", "lora_dropout": "lora.dropout", "seed": "seed",
    "precision": "precision", "mix_by": "mix_by", "adapter": "adapter", "packing": "packing",
}
_D = {flag: default(StageSpec, field) for flag, field in TRAIN_FLAGS.items()}


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Alias, Hub id, local folder or checkpoint.")],
    dataset: Annotated[list[str], typer.Option(help="Dataset id; repeat for a mixture.")],
    output: Annotated[Path, typer.Option(help="Checkpoint folder to write (a copy of the cached "
                                         "stage).")],
    objective: Annotated[str, typer.Option(help="pretrain, sft or mixed.")] = "sft",
    config: Annotated[list[str] | None, typer.Option(help="Config per dataset.")] = None,
    rate: Annotated[list[float] | None, typer.Option(help="Mixture rate per dataset.")] = None,
    as_: Annotated[list[str] | None, typer.Option(
        "--as", help="objective mixed: text or pair, per dataset.")] = None,
    steps: int = _D["steps"], batch_size: int = _D["batch_size"], grad_accum: int = _D["grad_accum"],
    lr: float = _D["lr"], warmup_ratio: float = _D["warmup_ratio"], schedule: str = _D["schedule"],
    max_length: int = _D["max_length"],
    decay_ratio: Annotated[float | None, typer.Option(help="wsd: cooldown share (default 0.2).")]
    = _D["decay_ratio"],
    lora_r: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tuning.")] = _D["lora_r"],
    lora_alpha: Annotated[float | None, typer.Option(help="Default: 2 x lora_r.")] = None,
    lora_dropout: float = _D["lora_dropout"], seed: int = _D["seed"],
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16.")] = _D["precision"],
    mix_by: Annotated[str, typer.Option(help="auto, tokens or examples.")] = _D["mix_by"],
    adapter: Annotated[str, typer.Option(help="On a LoRA parent: merge or continue.")] = _D["adapter"],
    packing: Annotated[bool | None, typer.Option(
        help="SFT batches as one padding-free row (default: on CUDA only).")] = _D["packing"],
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Train one stage (a one-experiment study: validated first, from the stage cache when it
    was trained before) and copy its checkpoint to --output for `eval` and later stages."""
    from taxon.seeds_cli import check_output
    from taxon.study.run import run_single

    n = len(dataset)
    configs, rates, uses = config or [None] * n, rate or [None] * n, as_ or [None] * n
    if not len(configs) == len(rates) == len(uses) == n:
        raise TaxonError("give one --config, --rate and --as per --dataset (or none)")
    spec = parse(StageSpec, {
        "objective": objective, "steps": steps, "batch_size": batch_size,
        "grad_accum": grad_accum, "lr": lr, "warmup_ratio": warmup_ratio, "schedule": schedule,
        "decay_ratio": decay_ratio, "max_length": max_length, "seed": seed, "packing": packing,
        "precision": precision, "mix_by": mix_by, "adapter": adapter,
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout} if lora_r else None,
        "data": [{"dataset": d, "config": c, "rate": r, "as": u}
                 for d, c, r, u in zip(dataset, configs, rates, uses, strict=True)],
    }, "command line")
    output = output.expanduser().resolve()
    check_output(output, "--output")
    exp, s = run_single("train", output.name, model, (spec,), EvalSpec(tasks=()), store,  # type: ignore[arg-type]
                        console, checkpoint_to=output)
    figures = s.stage(exp.stages[-1].id)["figures"]
    console.print(f"wrote {output}: loss {figures['final_loss']:.3f}, "
                  f"{figures['tokens']} tokens at {figures['tokens_per_s']:.0f} tokens/s, "
                  f"packing efficiency {figures['packing_efficiency']:.1%}")


@app.command("eval")
def eval_(
    model: Annotated[list[str], typer.Option(
        help="Alias, Hub id, local folder or checkpoint; repeat it to evaluate several (LoRA "
        "adapters over one base are evaluated over that base loaded once, switching adapters).")],
    tasks: Annotated[str, typer.Option(
        help="Comma-separated task names, or 'all': every built-in task (tasks whose data cannot "
        "be loaded are skipped with a line saying why).")] = "fpb",
    shots: Annotated[int | None, typer.Option(help="Few-shot count (default: task's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Seeded subsample of each test set.")] = None,
    seed: int = default(EvalSpec, "seed"),
    batch_size: int = default(EvalSpec, "batch_size"),
    precision: Annotated[str, typer.Option(help="fp32, bf16 or auto.")] = default(EvalSpec, "precision"),
    api_method: Annotated[str, typer.Option(
        help="API models (--model api:<endpoint>/<model>): how classification tasks are scored: "
        "loglikelihood-echo, top-logprobs, constrained-choice, or auto (the endpoint's "
        "choice_method).")] = default(EvalSpec, "api_method"),
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Evaluate a model on tasks (a zero-stage study); results go to the store, keyed by the
    model's identity (a folder by its stage id or the digest of its weights; an API model by its
    endpoint, name and fingerprint), and a table is printed."""
    from taxon.report.tables import results_table
    from taxon.study.run import run_single

    spec = parse(EvalSpec, {"tasks": tasks.split(","), "shots": shots, "limit": limit,
                            "seed": seed, "batch_size": batch_size, "precision": precision,
                            "api_method": api_method}, "command line")
    if len(model) == 1:
        _, s = run_single("eval", model[0], model[0], (), spec, store, console)  # type: ignore[arg-type]
    else:
        from taxon.study import work
        from taxon.study.run import run_models

        before = len(work.loads)
        _, s = run_models("eval", model, spec, store, console)  # type: ignore[arg-type]
        loaded = work.loads[before:]
        console.print(f"{len(model)} models evaluated; {len(loaded)} loaded from disk"
                      + (f" ({', '.join(loaded)})" if loaded else " (all results were stored)"),
                      highlight=False, soft_wrap=True)
    console.print(results_table(s, "eval"), highlight=False)


@app.command()
def serve(
    models: Annotated[list[str], typer.Argument(
        help="Models to serve: aliases, Hub ids, folders, stage or LoRA checkpoints.",
        show_default=False)],
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")]
    = "127.0.0.1",
    name: Annotated[list[str] | None, typer.Option(
        "--name", help="The name requests use for each model, in order (default: as given).")] = None,
    precision: Annotated[str, typer.Option(help="fp32 or bf16 (autocast).")] = "fp32",
) -> None:
    """Serve models through an OpenAI-compatible API (/v1/models, /v1/completions with echo and
    logprobs, /v1/chat/completions); use them with `taxon eval --model api:local/<name>`."""
    from taxon.serve import serve as run_server

    if not 0 < port < 65536:
        raise TaxonError(f"--port {port}: give a TCP port between 1 and 65535")
    if precision not in ("fp32", "bf16"):
        raise TaxonError(f"--precision {precision}: choose fp32 or bf16")
    run_server(models, name, host, port, precision == "bf16", console)


COMPOSE_HELP = ("peft weighted-adapter method: linear, cat, svd, ties, ties_svd, dare_linear, "
                "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd.")


@adapters_app.command("merge")
def adapters_merge(
    adapters: Annotated[list[Path], typer.Argument(
        help="LoRA checkpoint folders (stage checkpoints or composites) over one base.",
        show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder to write (replaced).")],
    method: Annotated[str, typer.Option(help=COMPOSE_HELP)] = default(ComposeSpec, "method"),
    weights: Annotated[str | None, typer.Option(
        help="Comma-separated weight per adapter (default: 1/n each).")] = None,
    density: Annotated[float | None, typer.Option(
        help="Share of each delta kept (ties, dare_*, magnitude_prune*).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random masks.")] = default(ComposeSpec, "seed"),
    svd_rank: Annotated[int | None, typer.Option(help="Rank of the _svd methods' result.")] = None,
    full: Annotated[bool, typer.Option(help="Write the merged full model (loads without peft) "
                                       "instead of the composite adapter.")] = False,
) -> None:
    """Merge LoRA adapters into one composite adapter (a folder `taxon eval --model` and `taxon
    serve` load like a LoRA checkpoint), or with --full into a merged full model, in fp32."""
    from taxon.compose import write_composite

    try:
        parsed = None if weights is None else [float(w) for w in weights.split(",")]
    except ValueError as e:
        raise TaxonError(f"--weights {weights}: give numbers separated by commas, e.g. 0.5,0.5") from e
    spec = parse(ComposeSpec, {"members": [str(a) for a in adapters], "method": method,
                               "weights": parsed, "density": density, "seed": seed,
                               "svd_rank": svd_rank}, "command line")
    out = out.expanduser().resolve()
    if out in [a.expanduser().resolve() for a in adapters]:
        raise TaxonError(f"--out {out} is one of the adapters; write the composite elsewhere")
    meta = write_composite(list(adapters), spec, out, full=full)  # type: ignore[arg-type]
    kind = "merged full model" if full else f"composite adapter (r={meta['lora_config']['r']})"
    console.print(f"wrote {out}: {kind}, {spec.method} of {len(adapters)} adapters, id {meta['id']}",
                  highlight=False, soft_wrap=True)


@study_app.command("plan")
def study_plan(
    file: Path,
    gpu: Annotated[str, typer.Option(help="GPU for the time estimate (h100, a100, l4, ...).")] = "h100",
    mfu: Annotated[float, typer.Option(help="Model FLOP utilisation assumed on that GPU.")] = 0.3,
    tree: Annotated[bool, typer.Option(help="Print the stage graph.")] = True,
) -> None:
    """Print the experiments, the stage graph, steps with and without reuse and estimated time;
    trains and loads nothing."""
    from taxon.study.load import load_study
    from taxon.study.plan_report import print_plan
    from taxon.study.validate import checked_plan

    at_least(mfu, 0, "--mfu", strict=True)
    if mfu > 1:
        raise TaxonError(f"--mfu {mfu}: a utilisation is a share of the peak, at most 1")
    study = load_study(file)
    print_plan(study, checked_plan(study, for_run=False, console=console), console, gpu=gpu, mfu=mfu,
               tree=tree)


@study_app.command("run")
def study_run(
    file: Path,
    store: Annotated[Path | None, typer.Option(
        help="SQLite results file (default results/<study name>.sqlite).")] = None,
    report: Annotated[Path | None, typer.Option(help="Also copy the report's Markdown to this file.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default results/<study>/report).")]
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
    """Train what is missing, evaluate what is missing, write the report (HTML, Markdown, LaTeX,
    CSV, figures) and print its summary and answers."""
    from taxon.study import executors, tracking
    from taxon.study.load import load_study
    from taxon.study.run import run_study
    from taxon.study.store import Store
    from taxon.study.validate import checked_plan

    study = load_study(file)
    tracking.check(tuple(report_to or ()))
    executors.check(executor, workers, address, gpus)
    experiments = checked_plan(study, for_run=True, console=console)  # before anything is written
    s = Store(store or Path("results") / f"{study.name}.sqlite")
    tracking.setup(tuple(report_to or ()), study.name, Path("results") / study.name)
    ex = executors.make(executor, workers, address, gpus)
    run_study(study, s, console, executor=ex, report_to=tuple(report_to or ()),
              json_dir=json_dir or Path("results") / study.name / "json", launcher=launcher,
              experiments=experiments)
    _write_report(s, study.name, out or Path("results") / study.name / "report", summary_to=report)


def _write_report(store, study: str | None, out: Path, summary_to: Path | None = None) -> None:
    """The study's report: its summary and answers on the console, every format in `out`."""
    from taxon.report.build import answer_lines
    from taxon.report.write import decision_view, report_study, summary_view

    path, rep = report_study(store, study, out)
    console.rule("results")
    view = summary_view(rep.summary)  # Markdown, unwrapped: it pastes into notes as it is
    console.print(view.to_markdown(index=False) if not view.empty else "(no results)",
                  highlight=False, soft_wrap=True, markup=False, emoji=False)
    for note in rep.notes[:1]:
        console.print(note, highlight=False)
    if not rep.decision.empty:  # watched stages: each run against the base, and the choice
        console.rule("decision table")
        console.print(decision_view(rep.decision).to_markdown(index=False), highlight=False,
                      soft_wrap=True, markup=False, emoji=False)
    console.rule("answers")
    for line in answer_lines(rep):  # one line each, unwrapped, so they can be grepped and copied
        console.print(line, highlight=False, soft_wrap=True, markup=False, emoji=False)
    console.print(f"report: {path.resolve()}", highlight=False, soft_wrap=True)
    if summary_to:
        summary_to.parent.mkdir(parents=True, exist_ok=True)
        summary_to.write_text(f"# {study}\n\n" + (out / "report.md").read_text())
        console.print(f"report Markdown also written to {summary_to}")


@corpus_app.command("build")
def corpus_build(
    sources: Annotated[list[str], typer.Argument(
        help="Folders (.txt, .md, .rst, .html, man pages), .jsonl files, "
        "dataset:<card id>[:config[:split]].")],
    out: Annotated[Path, typer.Option(help="Corpus folder to write (replaced if it is a corpus).")],
    tokenizer: Annotated[str, typer.Option(help="Tokenizer (model alias) for token counts.")]
    = "smollm2-135m",
    max_docs: Annotated[int | None, typer.Option(help="At most this many documents per source "
                                                 "(a seeded sample).")] = None,
    language: Annotated[list[str] | None, typer.Option(help="Keep documents in this language "
                                                       "(py3langid code, e.g. en); repeat.")] = None,
    decontaminate: Annotated[bool, typer.Option(help="Remove lines sharing an n-gram with any eval "
                                                "task's test text.")] = True,
    ngram: Annotated[int, typer.Option(help="Decontamination n-gram length in words.")] = 8,
    threshold: Annotated[float, typer.Option(help="Near-duplicate Jaccard similarity.")] = 0.8,
    num_perm: Annotated[int, typer.Option(help="MinHash permutations.")] = 128,
    min_words: Annotated[int, typer.Option(help="Lines with fewer words are dropped.")] = 4,
    min_doc_words: Annotated[int, typer.Option(help="Documents left with fewer words are dropped.")] = 30,
    test_fraction: Annotated[float, typer.Option(help="Share of documents held out as the test split.")]
    = 0.05,
    seed: int = 0,
) -> None:
    """Clean text sources into a corpus a stage can mix: markup and boilerplate stripped, exact
    and near duplicates removed, short and non-text lines dropped, eval-set n-grams removed;
    tokenised into shards; corpus_report.json/.md say what was removed and why, per source."""
    from taxon.data.corpus.build import build
    from taxon.data.corpus.clean import CleanSettings, Contamination
    from taxon.data.corpus.read import parse_source

    at_least(max_docs, 1, "--max-docs")
    at_least(ngram, 2, "--ngram")
    at_least(num_perm, 16, "--num-perm")
    if not 0 < threshold < 1:
        raise TaxonError(f"--threshold {threshold}: must be between 0 and 1")
    parsed = [parse_source(s) for s in sources]
    for p in parsed:
        p.limit = max_docs
    settings = CleanSettings(min_words=min_words, min_doc_words=min_doc_words,
                             languages=tuple(language or ()), ngram=ngram, num_perm=num_perm,
                             threshold=threshold)
    contamination = None
    if decontaminate:
        from taxon.evals.decontaminate import test_texts

        with console.status("reading every eval task's test text"):
            texts, skipped = test_texts()
        contamination = Contamination(ngram)
        for task, t in texts.items():
            contamination.add(task, t)
        for task, why in skipped.items():
            if not why.startswith("same test split"):
                console.print(f"[yellow]decontamination skips {task}[/yellow]: {why}")
    report = build(parsed, out, tokenizer=tokenizer, settings=settings, contamination=contamination,
                   test_fraction=test_fraction, seed=seed)
    table = Table("source", "documents", "kept", "removed (documents)", "removed (lines)")
    for e in report["sources"]:
        table.add_row(e["source"], str(e["documents"]), str(e["kept"]),
                      ", ".join(f"{k} {v}" for k, v in e["removed"].items()) or "-",
                      ", ".join(f"{k} {v}" for k, v in e["lines_removed"].items()) or "-")
    console.print(table)
    nd = report["near_duplicates"]
    console.print(f"near duplicates: MinHash num_perm {nd['num_perm']}, {nd['bands']} bands x "
                  f"{nd['rows']} rows, implied threshold {nd['implied_threshold']} (Jaccard "
                  f"{nd['threshold']} kept as duplicate)")
    for split, t in report["splits"].items():
        console.print(f"{split}: {t['documents']} documents, {t['tokens']:,} tokens")
    console.print(f"wrote {out} (corpus_report.md); use it as data: [{{dataset: {out}, rate: ...}}]")


@app.command()
def report(
    store_path: Annotated[Path | None, typer.Argument(
        metavar="STORE", help="SQLite results file (default results/taxon.sqlite).")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Same as STORE.")] = None,
    study: Annotated[str | None, typer.Option(help="Only this study (default: the store's only "
                                              "study, else every experiment).")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: beside the store, "
                                             "<store>-report/).")] = None,
    json_dir: Annotated[Path | None, typer.Option(
        "--json", help="Also write one JSON file per experiment into this folder.")] = None,
) -> None:
    """Write a store's report: one HTML page (opens offline), Markdown, LaTeX and CSV tables, and
    the figures as PNG and SVG; print the summary and the answers to the research questions."""
    from taxon.study.store import Store

    path = store_path or store or DEFAULT_STORE
    if not path.is_file():
        raise TaxonError(f"no results store at {path}; run `taxon study run` or `taxon eval` first")
    s = Store(path)
    names = s.study_names()
    if study is not None and study not in names:
        raise TaxonError(f"study '{study}' is not in {path} (it has: {', '.join(names) or 'none'}); "
                         "pass one of those to --study")
    if study is None and len(names) == 1:
        study = names[0]
    _write_report(s, study, out or path.with_name(f"{path.stem}-report"))
    if json_dir is not None:
        from taxon.study.export import export_study

        paths = export_study(s, study, json_dir)
        console.print(f"{len(paths)} experiment JSON files written to {json_dir}")


def main(argv: list[str] | None = None) -> None:
    """The `taxon` entry point; exits with 0, or 2 and one line for a mistake the user can fix."""
    sys.exit(guarded(lambda: app(argv)))


if __name__ == "__main__":
    main()
