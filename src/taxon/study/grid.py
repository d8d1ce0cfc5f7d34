"""A study's `grid:` blocks: named recipes over axes, expanded into experiments.

    data:                      # named data: a card id, a ref, or a list of refs (a mixture)
      fpb: {dataset: takala/financial_phrasebank, config: sentences_50agree}
    grid:
      - recipe: [direct_finetuning, sequential]   # any key may be a list: an axis
        model: [qwen2-0.5b, gpt2-medium]          # default: the study's model
        seed: [0, 1, 2]                           # default: the study's seed
        task: [fpb, tfns]                         # recipe parameters
        lora_alpha_ratio: [0.5, 1, 2]             # lora_alpha = ratio * lora_r
        overrides: {pretrain: {max_length: 512}}  # stage fields, by objective (or `all`)

A block is the product of its axes; each recipe of a block takes the parameters it has and ignores
the others, so one block can cross every strategy with every model. A key no recipe of the block
has is an error. Experiment names are the recipe (or the block's `name`) and the values of the axes
that vary in the block, e.g. `direct_finetuning[qwen2-0.5b,task=fpb,seed=2]`.
"""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from taxon.config import digest
from taxon.errors import TaxonError
from taxon.study.recipes import expand, get_recipe

BLOCK_KEYS = ("recipe", "name", "model", "seed", "overrides", "lora_alpha_ratio")
MODELS_FILE = Path(__file__).resolve().parents[1] / "models.yaml"


@cache
def model_table() -> dict[str, dict]:
    """models.yaml read directly: planning must not import torch."""
    return yaml.safe_load(MODELS_FILE.read_text())


def _axis(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _short(value: Any) -> str:
    """A value as it reads in an experiment name: 10000 -> 10k, 3e-05 -> 3e-5."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        for unit, size in (("M", 1_000_000), ("k", 1000)):
            if value >= size and value % (size // 10) == 0:
                return f"{value / size:g}{unit}"
        return str(value)
    if isinstance(value, float):
        return f"{value:g}".replace("e-0", "e-").replace("e+0", "e")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return "+".join(_short(v) for v in value)
    return "data-" + digest(yaml.safe_dump(value, sort_keys=True), length=6)


class DataNames:
    """Turns a data value (a name under `data:`, a card id, a ref, a list) into DataRef dicts."""

    def __init__(self, named: dict[str, Any], where: str):
        self.named, self.where = named, where

    def __call__(self, value: Any, _seen: tuple = ()) -> list[dict]:
        if isinstance(value, list):
            return [r for v in value for r in self(v, _seen)]
        if isinstance(value, dict):
            if "dataset" not in value:
                raise TaxonError(f"{self.where}: data entry {value} has no `dataset`; "
                                 "write {dataset: <card id>, ...}")
            return [dict(value)]
        if isinstance(value, str):
            if value in self.named:
                if value in _seen:
                    raise TaxonError(f"{self.where}: data name '{value}' refers to itself")
                return self(self.named[value], (*_seen, value))
            from taxon.data.cards import get_card

            try:
                card = get_card(value)
            except TaxonError as e:
                raise TaxonError(f"{self.where}: '{value}' is neither a name under `data:` nor a "
                                 "known dataset card; add it under `data:` or run `taxon data list`") from e
            return [{"dataset": card.id}]  # one spelling per card, so equal stages hash alike
        raise TaxonError(f"{self.where}: data value {value!r} must be a name, a card id or "
                         "{dataset: ...}")


def _apply_overrides(stage: dict, overrides: dict) -> dict:
    for key in ("all", stage["objective"]):
        stage = {**stage, **(overrides.get(key) or {})}
    return stage


def _expand_block(block: dict, index: int, study: dict, names: DataNames) -> list[dict]:
    where = f"grid block {index}"
    if not isinstance(block, dict) or "recipe" not in block:
        raise TaxonError(f"{where}: needs `recipe:` (one of the named recipes, or a list)")
    recipes = [get_recipe(r) for r in _axis(block["recipe"])]
    params = {k: _axis(v) for k, v in block.items() if k not in ("recipe", "name", "overrides")}
    for key, values in params.items():
        if not values:
            raise TaxonError(f"{where}: axis '{key}' is an empty list; give at least one value")
        if key not in BLOCK_KEYS and not any(key in r.params for r in recipes):
            known = sorted({p for r in recipes for p in r.params} | set(BLOCK_KEYS) - {"recipe"})
            raise TaxonError(f"{where}: unknown axis '{key}' (no recipe of the block "
                             f"{', '.join(r.name for r in recipes)} has it); known: {', '.join(known)}")
    overrides = block.get("overrides") or {}
    if not isinstance(overrides, dict) or not set(overrides) <= {"all", "pretrain", "sft", "mixed"}:
        raise TaxonError(f"{where}: `overrides` maps all/pretrain/sft/mixed to stage fields")
    out = []
    for recipe in recipes:
        used = [k for k in params if k in recipe.params or k in ("model", "seed", "lora_alpha_ratio")]
        used.sort(key=lambda k: {"model": 0, "seed": 2}.get(k, 1))  # names read model, ..., seed
        if not recipe.stages:  # nothing trained: seeds and ratios change nothing
            used = [k for k in used if k not in ("seed", "lora_alpha_ratio")]
        prefix = ".".join(([block["name"]] if "name" in block else [])
                          + ([recipe.name] if len(recipes) > 1 or "name" not in block else []))
        for combo in itertools.product(*(params[k] for k in used)):
            values = dict(zip(used, combo, strict=True))
            model = values.pop("model", study.get("model", "smollm2-135m"))
            seed = values.pop("seed", study.get("seed", 0))
            ratio = values.pop("lora_alpha_ratio", None)
            if ratio is not None:
                values["lora_alpha"] = ratio * values.get("lora_r", recipe.params.get("lora_r", 16))
            stages = [_apply_overrides({**s, "seed": seed}, overrides)
                      for s in expand(recipe.name, values, names, where)]
            label = [("model" if k == "model" else k, v) for k, v in zip(used, combo, strict=True)
                     if len(params[k]) > 1]
            labels = [_short(v) if k == "model" else f"{k}={_short(v)}" for k, v in label]
            name = _name(prefix, labels)
            out.append({
                "name": name, "prefix": prefix, "labels": labels, "model": model,
                "recipe": recipe.name, "stages": stages,
                "axes": {"model": model, "seed": seed, **({"lora_alpha_ratio": ratio} if ratio else {}),
                         **{k: _short(v) for k, v in values.items()}},
            })
    return out


def _name(prefix: str, labels: list[str]) -> str:
    """`recipe[axis=value,...]`: readable, and safe as a file name."""
    return f"{prefix}[{','.join(labels)}]" if labels else prefix


def _disambiguate(experiments: list[dict]) -> None:
    """Experiments of one name get the axis values that tell them apart; identical ones are an error."""
    by_name: dict[str, list[dict]] = {}
    for e in experiments:
        by_name.setdefault(e["name"], []).append(e)
    for name, group in by_name.items():
        if len(group) == 1:
            continue
        keys = sorted({k for e in group for k in e["axes"]})
        differ = [k for k in keys if len({str(e["axes"].get(k)) for e in group}) > 1]
        if not differ:
            raise TaxonError(f"two grid experiments are both '{name}' with the same values; give "
                             "one of their blocks a distinct `name:` or remove the repeat")
        for e in group:
            e["name"] = _name(e["prefix"], e["labels"] + [f"{k}={e['axes'].get(k)}" for k in differ])


def expand_study(data: dict, source: str) -> dict:
    """The study mapping with its `grid` blocks expanded and appended to `experiments`."""
    data = dict(data)
    named = data.pop("data", None) or {}
    blocks = data.pop("grid", None) or []
    if not isinstance(named, dict):
        raise TaxonError(f"{source}: `data` maps names to datasets (a card id, a ref or a list)")
    if not isinstance(blocks, list):
        raise TaxonError(f"{source}: `grid` is a list of blocks, each with a `recipe`")
    names = DataNames(named, source)
    generated = []
    try:
        for i, block in enumerate(blocks, 1):
            generated += _expand_block(block, i, data, names)
    except TaxonError as e:
        raise TaxonError(f"{source}: {e}" if not str(e).startswith(source) else str(e)) from e
    _disambiguate(generated)
    explicit = list(data.get("experiments") or [])
    taken = {e.get("name") for e in explicit if isinstance(e, dict)}
    clash = next((e["name"] for e in generated if e["name"] in taken), None)
    if clash:
        raise TaxonError(f"{source}: grid experiment '{clash}' has the name of an experiment under "
                         "`experiments:`; rename one (a block's `name:` sets the prefix)")
    data["experiments"] = explicit + [{k: v for k, v in e.items() if k not in ("prefix", "labels")}
                                      for e in generated]
    return data
