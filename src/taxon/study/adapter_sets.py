"""A study's `adapter_sets:`: one LoRA adapter per dataset, all from the same base with the same
settings, expanded into experiments the planner and the runner treat like any other.

    adapter_sets:
      - name: adapter                  # experiments adapter[<key>], adapter[base], adapter[multi-task]
        examples: 300                  # N rows per dataset (seeded), 10% of them held out
        holdout: 0.1
        datasets:
          fpb: {dataset: takala/financial_phrasebank, config: sentences_50agree, task: fpb}
          gsm8k: {dataset: openai/gsm8k, task: gsm8k}
        stage: {steps: 40, batch_size: 8, lr: 1.0e-3, max_length: 256, lora: {r: 16, alpha: 32}}

Every adapter is one `sft` stage straight off the study's model (load_model gives each stage a
freshly loaded base, so no adapter sees another's weights), on the dataset's (prompt, completion)
pairs in the model's chat format. The experiments' `axes` name the set, the dataset key and its
eval task (`task`, so rq3 and the transfer matrix find their diagonal).
"""

from __future__ import annotations

from taxon.config import AdapterSetSpec, model_name, parse
from taxon.errors import TaxonError

BASE, MULTI = "base", "multi-task"


def _ref(spec: AdapterSetSpec, key: str, rate: float | None = None) -> dict:
    d = spec.datasets[key]
    ref = {"dataset": d.dataset, "config": d.config, "split": d.split, "cap": spec.examples,
           "holdout": spec.holdout}
    return ref if rate is None else {**ref, "rate": rate}


def _stage(spec: AdapterSetSpec, data: list[dict], seed: int) -> dict:
    return {"objective": "sft", "data": data, "seed": seed, **spec.stage}


def _name(spec: AdapterSetSpec, key: str, seed: int, seeds: list[int] | None) -> str:
    return f"{spec.name}[{key},seed={seed}]" if seeds else f"{spec.name}[{key}]"


def set_experiments(spec: AdapterSetSpec, model: str, seed: int, seeds: list[int] | None) -> list[dict]:
    """The set's experiments: the untrained base, one adapter per dataset and, with `multi_task`,
    one adapter on all the datasets in equal shares; once per seed when the study has `seeds`."""
    base_axes = {"adapter_set": spec.name, "model": model}
    out = [{"name": f"{spec.name}[{BASE}]", "stages": [],
            "axes": {**base_axes, "dataset": BASE}}]
    for s in seeds or [seed]:
        for key, d in spec.datasets.items():
            out.append({"name": _name(spec, key, s, seeds), "recipe": "adapter_set",
                        "stages": [_stage(spec, [_ref(spec, key)], s)],
                        "axes": {**base_axes, "dataset": key, "task": d.task, "seed": s}})
        if spec.multi_task and len(spec.datasets) > 1:
            share = 1 / len(spec.datasets)
            out.append({"name": _name(spec, MULTI, s, seeds), "recipe": "adapter_set",
                        "stages": [_stage(spec, [_ref(spec, k, share) for k in spec.datasets], s)],
                        "axes": {**base_axes, "dataset": MULTI, "seed": s}})
    return out


def expand_sets(data: dict, source: str) -> dict:
    """The study mapping with each `adapter_sets` entry's experiments appended to `experiments`
    (the typed sets stay, for validation prompts and the report)."""
    sets = data.get("adapter_sets") or []
    if not isinstance(sets, list):
        raise TaxonError(f"{source}: `adapter_sets` is a list of sets, each with `datasets:`")
    model = model_name(data.get("model", "smollm2-135m"))
    seed, seeds = data.get("seed", 0), data.get("seeds")
    typed = [parse(AdapterSetSpec, s if isinstance(s, dict) else {"datasets": s},
                   f"{source}: adapter_sets[{i}]") for i, s in enumerate(sets)]
    names = [s.name for s in typed]
    if len(set(names)) != len(names):
        raise TaxonError(f"{source}: two adapter sets share a name; give each a distinct `name:`")
    tasks = (data.get("eval") or {}).get("tasks") if isinstance(data.get("eval"), dict) else None
    for s in typed:
        missing = [d.task for d in s.datasets.values() if tasks is not None and d.task not in tasks]
        if missing:
            raise TaxonError(f"{source}: adapter set '{s.name}' scores on {', '.join(missing)}, which "
                             "`eval.tasks` lacks; add it there (the transfer matrix needs every task)")
    if any(s.validation for s in typed):
        from taxon.evals.validation import all_sets

        all_sets()  # a malformed validation file stops the study here, before anything trains
    generated = [e for s in typed for e in set_experiments(s, model, seed, seeds)]
    explicit = list(data.get("experiments") or [])
    taken = {e.get("name") for e in explicit if isinstance(e, dict)}
    clash = next((e["name"] for e in generated if e["name"] in taken), None)
    if clash:
        raise TaxonError(f"{source}: adapter-set experiment '{clash}' has the name of another "
                         "experiment; rename the set (`name:`) or the experiment")
    return {**data, "experiments": explicit + generated,
            "adapter_sets": [s.model_dump(mode="json") for s in typed]}
