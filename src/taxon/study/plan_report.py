"""`taxon study plan`: the experiments, the stage graph with its shared prefixes, what reuse
saves, and how long the training should take here and on a named GPU."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from taxon.config import StageSpec, StudySpec
from taxon.schedule import whole_run
from taxon.study import cost
from taxon.study.plan import PlannedExperiment, stage_id


def _data_label(spec: StageSpec) -> str:
    parts = []
    for ref in list(spec.data) + ([spec.replay] if spec.replay else []):
        name = ref.dataset.rsplit("/", 1)[-1] + (f":{ref.config}" if ref.config else "")
        if ref.rate is not None:
            name += f" {ref.rate:g}"
        if ref.fraction < 1:
            name += f" (x{ref.fraction:g} rows)"
        if ref is spec.replay:
            name = "replay " + name
        parts.append(name)
    return " + ".join(parts)


def stage_label(stage) -> str:
    s = stage.spec
    tune = f"LoRA r{s.lora.r}/a{s.lora.alpha:g}" if s.lora else "full"
    note = getattr(stage, "note", "")  # the planner's word on a wsd segment or checkpoint, if any
    return (f"{stage.id[:8]} {s.objective} {s.steps:,} steps, {_data_label(s)}, {tune}, "
            f"lr {s.lr:g}, seed {s.seed}" + (f" [{note}]" if note else ""))


def _ends(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
    return f"  -> {shown}"


def stage_tree(experiments: list[PlannedExperiment]) -> Group:
    """One tree per base model; a node per unique stage; where experiments end, their names. A
    node with several children is a prefix that those experiments share."""
    roots: dict[str, Tree] = {}
    nodes: dict[str, Tree] = {}
    ends: dict[str, list[str]] = {}
    composites: list[PlannedExperiment] = []
    for e in experiments:
        if e.compose is not None:
            composites.append(e)
            continue
        params = cost.model_params(e.model)
        label = f"[bold]model {e.model}[/bold]" + (f" ({params / 1e6:,.0f}M params)" if params else "")
        parent = roots.setdefault(e.model, Tree(label))
        key = f"model:{e.model}"
        for s in e.stages:
            if s.id not in nodes:
                nodes[s.id] = parent.add(Text(stage_label(s)))
            parent, key = nodes[s.id], s.id
        ends.setdefault(key, []).append(e.name)
    for key, names in ends.items():
        node = nodes.get(key) or roots[key.removeprefix("model:")]
        node.label = Text.assemble(
            node.label if isinstance(node.label, Text) else Text.from_markup(str(node.label)),
            Text(_ends(names), style="cyan"))
    # A composite merges the last stages of other experiments: a node under the first member's
    # stage, naming the others, since a tree has one parent per node.
    for e in composites:
        c = e.compose
        label = Text.assemble(
            Text(f"{c.id[:8]} {compose_label(e)} of "
                 f"{', '.join(m.id[:8] for m in c.members)} (merged, nothing trains)"),
            Text(_ends([e.name]), style="cyan"))
        nodes[c.members[0].id].add(label)
    return Group(*roots.values())


def compose_label(e: PlannedExperiment) -> str:
    """`ties 5 adapters, density 0.5`: what a composite experiment merges, and how."""
    spec = e.compose.spec
    extra = [f"density {spec.density:g}"] if spec.density is not None else []
    extra += [f"weights {', '.join(f'{w:g}' for w in spec.weights)}"] if spec.weights else []
    return f"{spec.method} {len(spec.members)} adapters" + (f", {', '.join(extra)}" if extra else "")


def experiments_table(study: StudySpec, experiments: list[PlannedExperiment]) -> Table:
    table = Table("#", "recipe", "model", "stages", "steps", "new steps",
                  title="experiments (new steps: stages no earlier row trains)")
    table.add_column("experiment", overflow="fold")
    fresh = cost.new_steps(experiments)
    recipes = {e.name: e.recipe or "-" for e in study.experiments}
    for i, (e, new) in enumerate(zip(experiments, fresh, strict=True), 1):
        recipe = f"compose: {compose_label(e)}" if e.compose is not None else recipes[e.name]
        # Text, not markup: names like adapter[fpb] are not rich tags
        table.add_row(str(i), Text(recipe), e.model, str(len(e.stages)),
                      f"{sum(s.spec.steps for s in e.stages):,}", f"{new:,}", Text(e.name))
    return table


def checkpoint_table(experiments: list[PlannedExperiment]) -> Table | None:
    """The experiments that became checkpoint evaluations: the model they evaluate is a
    checkpoint a longer run of the plan keeps, so nothing of theirs trains."""
    rows = [(e.name, e.stages[-1]) for e in experiments
            if e.stages and e.stages[-1].kind == "checkpoint"]
    if not rows:
        return None
    table = Table("experiment", "checkpoint", "of the run",
                  title=f"checkpoint evaluations: {len(rows)} of {len(experiments)} experiments "
                        "evaluate a checkpoint kept by a longer run and train nothing")
    table.columns[0].overflow = "fold"
    for name, stage in rows:
        table.add_row(name, f"{stage.id[:8]} at step {stage.spec.steps:,}",
                      f"{stage_id(stage.parent, whole_run(stage.spec))[:8]}, "
                      f"{stage.spec.run_steps:,} steps")
    return table


def _times(c: cost.Cost, gpu: str, mfu: float) -> list[str]:
    measured = cost.measured_throughput()
    gpu_info = cost.gpus()[gpu]
    lines = []
    if measured:
        rates = ", ".join(f"{m.model} {m.tokens_per_s:,.0f} tokens/s ({m.stages} stages)"
                          for m in measured.values())
        lines.append(f"this machine, from the stages already trained in the cache: {rates}")
    else:
        lines.append("this machine: no trained stage in the cache to measure from yet; run a study "
                     "(e.g. `taxon study run examples/quickstart.yaml`) once to calibrate")
    total_here, total_naive_here, total_gpu, total_naive_gpu, unknown = 0.0, 0.0, 0.0, 0.0, []
    for model in sorted(c.naive_tokens):
        tokens, naive = c.tokens[model], c.naive_tokens[model]
        parts = [f"  {model}: {tokens:,} tokens with reuse ({naive:,} naive)"]
        rate = cost.local_rate(model, measured)
        if rate:
            here, naive_here = tokens / rate[0], naive / rate[0]
            total_here += here
            total_naive_here += naive_here
            parts.append(f"here ~{cost.duration(here)} ({cost.duration(naive_here)} naive) at "
                         f"{rate[0]:,.0f} tokens/s, {rate[1]}")
        params = cost.model_params(model)
        if params:
            g, gn = (cost.gpu_seconds(gpu, params, t, mfu) for t in (tokens, naive))
            total_gpu += g
            total_naive_gpu += gn
            parts.append(f"{gpu} ~{cost.duration(g)} ({cost.duration(gn)} naive)")
        else:
            unknown.append(model)
        lines.append("; ".join(parts))
    if total_here:
        lines.append(f"total here: ~{cost.duration(total_here)} with reuse, "
                     f"{cost.duration(total_naive_here)} naive")
    lines.append(f"total on one {gpu_info['name']} (an estimate: 6 x parameters x tokens FLOPs at "
                 f"{mfu:.0%} MFU of {gpu_info['tflops']} TFLOP/s bf16 peak): ~{cost.duration(total_gpu)} "
                 f"with reuse, {cost.duration(total_naive_gpu)} naive")
    if unknown:
        lines.append(f"no parameter count for {', '.join(unknown)} (add `params:` to models.yaml); "
                     "left out of the GPU total")
    lines.append("tokens = steps x batch x accumulation x max_length: exact for packed pretraining, an "
                 "upper bound for SFT; evaluation time is not included")
    return lines


def print_plan(study: StudySpec, experiments: list[PlannedExperiment], console: Console,
               gpu: str = "h100", mfu: float = cost.DEFAULT_MFU, tree: bool = True) -> cost.Cost:
    if gpu not in cost.gpus():  # fail before printing anything
        cost.gpu_seconds(gpu, 1, 1, mfu)
    c = cost.study_cost(experiments)
    models = sorted({e.model for e in experiments})
    console.print(f"study [bold]{study.name}[/bold]: {c.experiments} experiments on "
                  f"{len(models)} model(s) ({', '.join(models)}); eval: {', '.join(study.eval.tasks)}")
    console.print(experiments_table(study, experiments))
    kept = checkpoint_table(experiments)
    if kept is not None:
        console.print(kept)
    if tree:
        console.rule("stage graph")
        console.print(stage_tree(experiments))
    console.rule("cost")
    for line in cost.schedule_rules(cost.unique_stages(experiments)):
        console.print(line, highlight=False)
    kept_by_runs = f" ({c.checkpoints:,} of them checkpoints kept by runs)" if c.checkpoints else ""
    console.print(f"stages: {c.unique_stages:,} to train{kept_by_runs}, {c.stage_refs:,} if every "
                  f"experiment trained its own chain", highlight=False)
    console.print(f"training steps: [bold]{c.steps:,}[/bold] with reuse, {c.naive_steps:,} naive "
                  f"([bold]{c.ratio:.1%}[/bold] of naive)", highlight=False)
    distinct = len({e.model_key for e in experiments})
    console.print(f"models to evaluate: {distinct} distinct of {c.experiments} experiments",
                  highlight=False)
    for line in _times(c, gpu, mfu):
        console.print(line, highlight=False, soft_wrap=True)
    return c
