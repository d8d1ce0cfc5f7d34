"""The seeds' command line (`python main.py ...`), mapped onto the same specs as study files.

One invocation is one stage (or none, with `--evaluation_only` or `--max_steps 0`) followed by an
evaluation on the tasks that score the trained datasets. Flags keep the seeds' names; every
default is the StageSpec/EvalSpec default unless the help says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from taxon.errors import TaxonError, guarded

if TYPE_CHECKING:
    from taxon.config import StageSpec

DEFAULT_STORE = Path("results/taxon.sqlite")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description="Train one stage on datasets (pretrain or sft), then evaluate "
        "it on the eval tasks of those datasets. The `taxon` command runs whole studies.")
    p.add_argument("--model", required=True,
                   help="Alias (gpt2, smollm2-135m, tiny, ...), Hub id, local folder, or a "
                        "checkpoint written by an earlier run.")
    p.add_argument("--dataset", "--datasets", dest="datasets", nargs="+", default=[],
                   help="Dataset card ids or aliases; several make a mixture.")
    p.add_argument("--dataset_config", "--dataset_configs", dest="configs", nargs="+",
                   help="One config per dataset; None = the card's default config.")
    p.add_argument("--mixture_rates", nargs="+", type=float,
                   help="One rate per dataset, summing to 1 (default: equal shares).")
    p.add_argument("--dataset_as", nargs="+", choices=("text", "pair"),
                   help="--mode mixed: how each dataset is used (text: loss on every token; "
                        "pair: loss on the completion).")
    p.add_argument("--mode", choices=("pretrain", "sft", "mixed"), default="sft")
    p.add_argument("--mix_by", choices=("auto", "tokens", "examples"), default="auto",
                   help="What the rates share out (auto: tokens for pretrain, else examples).")
    p.add_argument("--max_steps", type=int, default=100, help="Training steps; 0 = no training.")
    p.add_argument("--evaluation_only", action="store_true",
                   help="Evaluate --model as it is; train nothing.")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--lr_scheduler_type", default="cosine",
                   choices=("linear", "cosine", "constant", "constant_with_warmup"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank; 0 = full fine-tuning.")
    p.add_argument("--lora_alpha", type=int, help="Default: 2 x lora_r.")
    p.add_argument("--full_finetune", action="store_true", help="Same as --lora_r 0.")
    p.add_argument("--adapter", choices=("merge", "continue"), default="merge",
                   help="When --model is a LoRA checkpoint: merge its adapter and train a new one "
                        "(default) or keep training it.")
    p.add_argument("--output_dir", type=Path,
                   help="Default: ./checkpoints/<model>_<datasets>_<mode>.")
    p.add_argument("--save_steps", type=int,
                   help="Also keep a checkpoint every N steps in output_dir/checkpoint-N.")
    p.add_argument("--save_total_limit", type=int, help="Keep at most this many of those.")
    p.add_argument("--eval_tasks",
                   help="Comma-separated eval tasks (default: every task on a trained dataset); "
                        "'none' skips evaluation.")
    p.add_argument("--eval_limit", type=int, help="Seeded subsample of each task's test items.")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="SQLite results file.")
    p.add_argument("--data_dir", type=Path, help="Local dataset mirror (default $TAXON_DATA_DIR).")
    return p


@dataclass(frozen=True)
class Run:
    """What one invocation does: train `stage` (None: nothing) from `model`, then evaluate."""

    model: str  # what load_model takes; local folders made absolute
    stage: StageSpec | None
    output_dir: Path | None
    tasks: tuple[str, ...]  # eval tasks; empty: no evaluation
    name: str  # the experiment's name in the store


def _per_dataset(values: list | None, n: int, flag: str) -> list:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise TaxonError(f"{flag} has {len(values)} values for {n} dataset(s); give one per "
                         "dataset, in the same order as --datasets")
    return values


def _short(name: str) -> str:
    return Path(name.rstrip("/")).name if Path(name).expanduser().is_dir() else name.split("/")[-1]


def default_output_dir(model: str, datasets: list[str], configs: list, mode: str) -> Path:
    """./checkpoints/<model>_<datasets>_<mode>: the model alias (or its folder's name); each
    dataset's last path component, with its config where one dataset is named twice, joined by '+'."""
    names = [d.split("/")[-1] for d in datasets]
    parts = [n + (f"-{c}" if names.count(n) > 1 and c else "") for n, c in zip(names, configs,
                                                                                 strict=True)]
    return Path("checkpoints") / f"{_short(model)}_{'+'.join(dict.fromkeys(parts))}_{mode}"


def tasks_for(datasets: list[str], configs: list) -> list[str]:
    """Eval tasks whose card is one of the datasets. Where a card's configs are different tasks
    (it has per-config overrides, like GLUE), the task's config must be one of those trained."""
    from taxon.data.cards import get_card
    from taxon.evals.tasks import all_tasks

    wanted: dict[str, set[str]] = {}
    for d, c in zip(datasets, configs, strict=True):
        card = get_card(d)
        wanted.setdefault(card.id, set()).add(card.resolve_config(c))
    out = []
    for task in all_tasks():
        card = get_card(task.dataset)
        if card.id not in wanted:
            continue
        if card.overrides and card.resolve_config(task.config) not in wanted[card.id]:
            continue
        out.append(task.name)
    return out


def plan_run(args: argparse.Namespace) -> Run:
    """Turn parsed flags into a stage spec and an evaluation, refusing bad input in one line."""
    from taxon.config import StageSpec, parse
    from taxon.evals.tasks import parse_task_list
    from taxon.models import resolve_targets

    n = len(args.datasets)
    configs = [None if c in (None, "None", "none", "") else c
               for c in _per_dataset(args.configs, n, "--dataset_configs")]
    rates = _per_dataset(args.mixture_rates, n, "--mixture_rates")
    uses = _per_dataset(args.dataset_as, n, "--dataset_as")
    model = args.model
    if Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    elif model.startswith((".", "/", "~")):
        raise TaxonError(f"--model {args.model}: no such folder; train that checkpoint first or "
                         "fix the path")
    train = not args.evaluation_only and args.max_steps > 0
    if train and not n:
        raise TaxonError("no dataset to train on: pass --dataset (or --evaluation_only)")
    stage = None
    if train:
        r = 0 if args.full_finetune else args.lora_r
        stage = parse(StageSpec, {
            "objective": args.mode, "steps": args.max_steps, "batch_size": args.batch_size,
            "grad_accum": args.gradient_accumulation_steps, "lr": args.learning_rate,
            "warmup_ratio": args.warmup_ratio, "schedule": args.lr_scheduler_type,
            "max_length": args.max_length, "seed": args.seed, "mix_by": args.mix_by,
            "adapter": args.adapter,
            "lora": {"r": r, "alpha": args.lora_alpha or 2 * r} if r else None,
            "data": [{"dataset": d, "config": c, "rate": rt, "as": u}
                     for d, c, rt, u in zip(args.datasets, configs, rates, uses, strict=True)],
        }, "command line")
        stage = resolve_targets(stage, model)
    out = None
    if stage is not None:
        out = args.output_dir or default_output_dir(args.model, args.datasets, configs, args.mode)
        out = out.expanduser().resolve()
        if str(out) == model:
            raise TaxonError(f"--output_dir {out} is the --model checkpoint itself; write the new "
                             "stage to another folder")
    if args.eval_tasks is not None:
        names = [] if args.eval_tasks.strip().lower() == "none" else args.eval_tasks.split(",")
        tasks = tuple(t.name for t in parse_task_list(names)) if names else ()
    else:
        tasks = tuple(tasks_for(args.datasets, configs)) if n else ()
    name = out.name if out is not None else f"{_short(args.model)}_eval"
    return Run(model, stage, out, tasks, name)


def model_key(location: str) -> str:
    """The store's identity of a model: an alias or Hub id by name; a checkpoint by the hash of
    its stage metadata, so retraining into the same folder never reuses the old results."""
    from taxon.config import digest
    from taxon.models import STAGE_META

    meta = Path(location) / STAGE_META
    if meta.is_file():
        return "checkpoint:" + digest(meta.read_text())
    return f"model:{location}"


def execute(run: Run, args: argparse.Namespace, console) -> dict:
    """Train (if asked), then evaluate into the store and print the table."""
    from taxon.config import EvalSpec, parse
    from taxon.report.tables import results_table
    from taxon.study.run import evaluate_model
    from taxon.study.store import Store
    from taxon.train import train_stage

    location, figures = run.model, None
    if run.stage is not None:
        console.print(f"train {run.stage.objective} from {run.model}: {run.stage.steps} steps, "
                      f"{len(run.stage.data)} dataset(s) -> {run.output_dir}", highlight=False)
        figures = train_stage(run.stage, run.model, run.output_dir, desc=run.name,
                              save_steps=args.save_steps, save_total_limit=args.save_total_limit)
        for part, f in figures["mixture"].items():
            console.print(f"  {part}: rate {f['rate']:.2f} as {f['as']}: {f['examples']} "
                          f"sequences, {f['tokens']} tokens ({f['loss_tokens']} with loss)",
                          highlight=False)
        console.print(f"wrote {run.output_dir}: loss {figures['final_loss']:.3f}, "
                      f"{figures['tokens']} tokens at {figures['tokens_per_s']:.0f} tokens/s",
                      highlight=False)
        location = str(run.output_dir)
    if not run.tasks:
        console.print(f"no eval task uses dataset {', '.join(args.datasets) or '(none)'}; "
                      "skipping evaluation (pass --eval_tasks to choose tasks)", highlight=False)
        return {"location": location, "figures": figures, "model_key": None}
    spec = parse(EvalSpec, {"tasks": list(run.tasks), "limit": args.eval_limit,
                            "batch_size": args.eval_batch_size, "seed": args.seed}, "command line")
    key = model_key(location)
    store = Store(args.store)
    console.print(f"evaluate {location} on {', '.join(run.tasks)}", highlight=False)
    evaluate_model(location, key, spec, store, console)  # type: ignore[arg-type]
    store.add_experiment(run.name, run.name, run.model, key, [],
                         {"args": {k: str(v) if isinstance(v, Path) else v
                                   for k, v in vars(args).items()},
                          "stage": run.stage.model_dump(mode="json") if run.stage else None})
    console.print(results_table(store, run.name), highlight=False)
    store.close()
    return {"location": location, "figures": figures, "model_key": key}


def main(argv: list[str] | None = None) -> int:
    """Entry point of main.py: 0 on success, 2 (one line on stderr) on bad input."""
    import os

    from rich.console import Console

    from taxon.settings import DATA_DIR_ENV

    args = parser().parse_args(argv)
    if args.data_dir is not None:
        os.environ[DATA_DIR_ENV] = str(args.data_dir)
    return guarded(lambda: execute(plan_run(args), args, Console(soft_wrap=True)))


if __name__ == "__main__":
    sys.exit(main())

