"""Everything a study names, checked before anything trains: every model, dataset, config, split
and eval task of every experiment. All problems are reported at once, each naming its experiment
and stage, so a typo in the last experiment costs seconds, not the hours the first ones train.

`study plan` reports data that is not available on this machine as a note (the plan is still
useful); `study run` (and `main.py`, `taxon train`, `taxon eval`, which run one-experiment studies)
refuses it, since the stage or evaluation that needs it would fail half-way through the study.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from taxon import hub, watch
from taxon.config import DataRef, StudySpec
from taxon.data.cards import get_card
from taxon.data.sources import mirror_file
from taxon.endpoints import api_model, is_api
from taxon.errors import TaxonError
from taxon.evals.tasks import held_out_splits, missing_data, parse_task_list
from taxon.identity import api_method, model_identity
from taxon.models import resolve, resolve_targets
from taxon.study.load import arm_of
from taxon.study.plan import PlannedExperiment, plan

SHOWN = 3  # experiments named per problem shared by many


def _data_problem(ref: DataRef) -> tuple[str | None, str | None]:
    """(error, unavailable): what is wrong with one dataset reference, and whether its rows cannot
    be loaded on this machine."""
    card = get_card(ref.dataset)
    config = card.resolve_config(ref.config)
    card = card.for_config(config)
    splits = card.available_splits()
    if ref.split not in splits:
        return (f"dataset '{card.id}' config '{config}' has no split '{ref.split}'; choose one of: "
                f"{', '.join(splits)}"), None
    if ref.split == "test" or ref.split in held_out_splits(ref.dataset):
        return (f"dataset '{card.id}' split '{ref.split}' is scored by an eval task; train on a "
                "train split so no test item reaches training"), None
    source = card.source_split(ref.split)
    if mirror_file(card, config, source) is None and not hub.reachable():
        return None, (f"dataset '{card.id}' ({config}/{source}) is neither in the mirror nor on a "
                      "reachable Hub; set TAXON_DATA_DIR to a mirror that has it, or connect")
    return None, None


def _model_problem(name: str) -> tuple[str | None, str | None]:
    model_identity(name)  # an unknown alias, or a folder without weights, raises
    if is_api(name):  # the name, the key and the model checked (and the server asked)
        return None, None
    r = resolve(name)
    if r.source != "hub" or hub.reachable():
        return None, None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(r.location, "config.json"), str):
        return None, None
    return None, (f"model '{name}' ({r.location}) is not in the local Hugging Face cache and the Hub "
                  "is unreachable; connect, or pass a local folder")


def _collect(study: StudySpec, for_run: bool) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """problem -> experiments it concerns, for errors and for notes (unavailable data)."""
    errors: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}

    def check(where: str, fn: Callable[[], tuple[str | None, str | None] | None]) -> None:
        try:
            error, note = fn() or (None, None)
        except TaxonError as e:
            error, note = str(e), None
        if error:
            errors.setdefault(error, []).append(where)
        if note:
            (errors if for_run else notes).setdefault(note, []).append(where)

    models: dict[str, list[str]] = {}
    for exp in study.experiments:
        models.setdefault(exp.model or study.model, []).append(f"experiment '{exp.name}'")
        if is_api(exp.model or study.model) and exp.stages:
            check(f"experiment '{exp.name}'", lambda: (
                "a model behind an API cannot be trained; give it no stages (a zero-shot "
                "baseline) or train a local model", None))
        for j, stage in enumerate(exp.stages, 1):
            where = f"experiment '{exp.name}' stage {j}"
            for ref in (*stage.data, *([stage.replay] if stage.replay else [])):
                check(where, lambda ref=ref: _data_problem(ref))
    known = set()
    for name, wheres in models.items():
        n_errors = len(errors)
        for where in wheres:
            check(where, lambda name=name: _model_problem(name))
        if len(errors) == n_errors:
            known.add(name)
    for exp in study.experiments:  # LoRA targets need the architecture of a model that resolved
        model = exp.model or study.model
        for j, stage in enumerate(exp.stages, 1):
            if (model in known and not is_api(model) and stage.lora is not None
                    and stage.lora.target_modules is None):
                check(f"experiment '{exp.name}' stage {j}",
                      lambda stage=stage, model=model: (resolve_targets(stage, model) and None, None))
            if stage.watch is not None:  # watch tasks resolve and are perplexity tasks
                check(f"experiment '{exp.name}' stage {j}",
                      lambda stage=stage: (watch.check(stage.watch) or None, None))
    for exp in study.experiments:
        if exp.compose is not None:
            check(f"experiment '{exp.name}'",
                  lambda exp=exp: (_compose_problem(study, exp, known), None))
    for name in study.eval.tasks if list(study.eval.tasks) != ["all"] else ():
        check("eval", lambda name=name: (None, _task_unavailable(name)))
    arms = list(dict.fromkeys(arm_of(e.name) for e in study.experiments))
    for i, q in enumerate(study.questions, 1):
        for name in q.compare:
            if name not in arms:
                errors.setdefault(f"no arm named '{name}' (arms: {', '.join(arms)}); use an experiment "
                                  "name without its seed=", []).append(f"question {q.id or i}")
        for task in q.tasks:
            if task not in study.eval.tasks and list(study.eval.tasks) != ["all"]:
                errors.setdefault(f"task '{task}' is not evaluated (eval.tasks: "
                                  f"{', '.join(study.eval.tasks)}); add it there or leave it out",
                                  []).append(f"question {q.id or i}")
    apis = [name for name in known if is_api(name)]
    if apis and for_run and not errors:
        for name in study.eval.tasks if list(study.eval.tasks) != ["all"] else ():
            for model in apis:
                check(f"model '{model}'",
                      lambda name=name, model=model: _api_problem(model, name, study.eval))
    return errors, notes


def _adapter_base(model: str, stages) -> tuple:
    """What a chain's final LoRA adapter applies to: the model and the stages before the stage
    that created the adapter (a run of `adapter: continue` stages keeps training one adapter)."""
    j = len(stages) - 1
    while j > 0 and stages[j].adapter == "continue":
        j -= 1
    return model, tuple(s.canonical() for s in stages[:j])


def _compose_problem(study: StudySpec, exp, known: set[str]) -> str | None:
    """A composite's members: experiments of the study that end in a LoRA stage, over one base,
    with LoRA settings the method can merge; its baseline an arm of the study."""
    from taxon.compose import SAME_RANK

    spec = exp.compose
    by_name = {e.name: e for e in study.experiments}
    for m in spec.members:
        member = by_name.get(m)
        if member is None:
            return (f"compose member '{m}' is not an experiment of the study (experiments: "
                    f"{', '.join(by_name)}); name an experiment that trains a LoRA adapter")
        if member.compose is not None:
            return f"compose member '{m}' is itself a composite; name the experiments it merges instead"
        if not member.stages or member.stages[-1].lora is None:
            last = "trains nothing" if not member.stages else "ends in full fine-tuning (lora: null)"
            return (f"compose member '{m}' {last}; a member's last stage must train a LoRA adapter")
    members = [by_name[m] for m in spec.members]
    models = [m.model or study.model for m in members]
    bases = {_adapter_base(model, m.stages) for model, m in zip(models, members, strict=True)}
    if len(bases) > 1:
        return (f"compose members {', '.join(spec.members)} are adapters over different bases "
                f"(models {', '.join(dict.fromkeys(models))}, or different stages before the "
                "adapter); compose adapters trained from the same model and parent stages")
    if all(model in known for model in models):
        loras = [resolve_targets(m.stages[-1], model).lora for model, m in zip(models, members, strict=True)]
        if len({tuple(sorted(lora.target_modules)) for lora in loras}) > 1:
            return (f"compose members {', '.join(spec.members)} adapt different modules; train them "
                    "with the same lora.target_modules")
        if spec.method in SAME_RANK and len({lora.r for lora in loras}) > 1:
            return (f"compose method {spec.method} needs members of one LoRA rank, got r="
                    f"{', '.join(str(lora.r) for lora in loras)}; use method cat or svd, or train "
                    "the members with one r")
    arms = {arm_of(e.name) for e in study.experiments} | set(by_name)
    if spec.baseline is not None and spec.baseline not in arms:
        return (f"compose baseline '{spec.baseline}' is not an experiment of the study; name the "
                "multi-task experiment trained on all the members' data")
    return None


def _api_problem(model: str, task_name: str, spec) -> tuple[str | None, None]:
    """A task an API model cannot be scored on (perplexity), or a log-likelihood method the server
    does not support (its echo checked once, through the request cache)."""
    (task,) = parse_task_list([task_name])
    if api_method(task, spec, model) == "loglikelihood-echo":
        from taxon.evals.api import Client

        client = Client(api_model(model))
        try:
            client.check_echo()
        finally:
            client.close()
    return None, None


def _task_unavailable(name: str) -> str | None:
    (task,) = parse_task_list([name])  # an unknown task raises
    reason = missing_data(task)
    return None if reason is None else (f"eval task '{task.name}': {reason}; set TAXON_DATA_DIR to a "
                                        "mirror that has it, or leave the task out")


def _lines(found: dict[str, list[str]]) -> list[str]:
    out = []
    for problem, wheres in found.items():
        wheres = list(dict.fromkeys(wheres))
        more = f" and {len(wheres) - SHOWN} more" if len(wheres) > SHOWN else ""
        out.append(f"{', '.join(wheres[:SHOWN])}{more}: {problem}")
    return out


def checked_plan(study: StudySpec, for_run: bool, console: Console | None = None,
                 single: bool = False) -> list[PlannedExperiment]:
    """The study's plan once every experiment checks out; otherwise a TaxonError listing every
    problem (one line each), before anything is loaded or trained. `single`: a one-experiment
    study from a command line, whose problems need no experiment or stage named."""
    errors, notes = _collect(study, for_run)
    if errors and single:
        raise TaxonError("\n".join(errors))
    if errors:
        lines = _lines(errors)
        if len(lines) == 1:
            raise TaxonError(f"study '{study.name}', {lines[0]}")
        head = f"study '{study.name}' has {len(lines)} problems; nothing was loaded or trained:"
        raise TaxonError("\n".join([head, *(f"  {line}" for line in lines)]))
    if console is not None:
        for line in _lines(notes):
            console.print(f"[yellow]not available here[/yellow]: {escape(line)}", highlight=False)
    return plan(study)
