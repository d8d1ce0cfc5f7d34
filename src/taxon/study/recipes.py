"""Named recipes: templates of stages (src/taxon/recipes/*.yaml) whose parameters a study fills.

A template is plain stage YAML in which a string `$name` is replaced by the parameter's value.
Three entry forms besides a plain stage make recipes compose:
  `{include: other_recipe, with: {param: value}}` - the other recipe's stages, so two recipes that
      share a first stage produce the identical spec (and so the identical, shared checkpoint);
  `{for_each: {var: $list, ...}, stages: [...]}` - the entries once per position of the lists;
  `when: $param` on any entry - leave it out when the value is null, 0 or empty.
In `data` and `replay`, `{use: X, rate: r, ...}` stands for the refs X names (a study's named data,
a card id, a ref, or a list of these), with `rate` their group share and the other keys set on
each ref.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from taxon.errors import TaxonError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
REQUIRED = "required"  # a parameter default that the study must replace

Resolver = Callable[[Any], list[dict]]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    summary: str
    params: dict[str, Any] = {}
    stages: list[Any] = []

    def defaults(self) -> dict[str, Any]:
        return dict(self.params)


@cache
def all_recipes() -> dict[str, Recipe]:
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            recipe = Recipe.model_validate(yaml.safe_load(path.read_text()))
        except (yaml.YAMLError, ValidationError) as e:  # a packaging bug, not a user error
            raise RuntimeError(f"recipe file {path} is malformed: {e}") from e
        out[recipe.name] = recipe
    return out


def get_recipe(name: str) -> Recipe:
    recipes = all_recipes()
    if name not in recipes:
        raise TaxonError(f"unknown recipe '{name}'; known recipes: {', '.join(recipes)}")
    return recipes[name]


def _sub(node: Any, env: dict[str, Any]) -> Any:
    if isinstance(node, str) and node.startswith("$") and node[1:] in env:
        return env[node[1:]]
    if isinstance(node, dict):
        return {k: _sub(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_sub(v, env) for v in node]
    return node


def _group(item: Any, resolve: Resolver) -> list[dict]:
    """A `use` entry (or a bare ref) as refs, with its group rate spread by the refs' own rates."""
    if not (isinstance(item, dict) and "use" in item):
        return resolve(item)
    over = {k: v for k, v in item.items() if k != "use"}
    share = over.pop("rate", None)
    refs = [{**r, **over} for r in resolve(item["use"])]
    if share is not None:
        own = [r.get("rate") for r in refs]
        weights = [1 / len(refs)] * len(refs) if None in own else [w / sum(own) for w in own]
        refs = [{**r, "rate": round(share * w, 12)} for r, w in zip(refs, weights, strict=True)]
    return refs


def _finish_stage(stage: dict, resolve: Resolver) -> dict:
    stage = {k: v for k, v in stage.items() if v is not None or k in ("lora", "replay")}
    data = stage.get("data")
    items = data if isinstance(data, list) else [data]
    stage["data"] = [ref for item in items for ref in _group(item, resolve)]
    replay = stage.get("replay")
    if isinstance(replay, dict) and "use" in replay:
        replay = None if not replay.get("rate") or replay["use"] is None else _group(replay, resolve)
        if replay is not None and len(replay) != 1:
            raise TaxonError("replay names more than one dataset; give a single dataset as replay")
        replay = replay[0] if replay else None
    stage["replay"] = replay
    if replay is not None:  # data shares are relative; replay takes its share off the top
        rest = 1 - replay["rate"]
        own = [r.get("rate") for r in stage["data"]]
        weights = [1 / len(own)] * len(own) if None in own else [w / sum(own) for w in own]
        stage["data"] = [{**r, "rate": round(rest * w, 12)}
                         for r, w in zip(stage["data"], weights, strict=True)]
    lora = stage.get("lora")
    if isinstance(lora, dict):
        if not lora.get("r"):  # r 0 (or none): full fine-tuning
            stage["lora"] = None
        else:
            # target_modules null: the model's architecture decides (taxon.models.resolve_targets)
            lora = {k: v for k, v in lora.items() if v is not None}
            if isinstance(lora.get("alpha"), float) and lora["alpha"].is_integer():
                lora["alpha"] = int(lora["alpha"])  # 32.0 and 32 must hash alike
            stage["lora"] = lora
    return stage


def _expand_entries(entries: list, env: dict, resolve: Resolver, where: str) -> list[dict]:
    out: list[dict] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise RuntimeError(f"{where}: a stage template must be a mapping, got {entry!r}")
        if "when" in entry and not _sub(entry["when"], env):
            continue
        entry = {k: v for k, v in entry.items() if k != "when"}
        if "include" in entry:
            given = {k: v for k, v in _sub(entry.get("with", {}), env).items() if v is not None}
            out += expand(entry["include"], given, resolve, where)
        elif "for_each" in entry:
            lists = _sub(entry["for_each"], env)
            lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in lists.items()}
            if len(set(lengths.values())) != 1 or -1 in lengths.values():
                raise TaxonError(f"{where}: {', '.join(lists)} must be lists of one length "
                                 f"(got {lengths}); give one value per phase")
            for i in range(next(iter(lengths.values()))):
                inner = {**env, **{k: v[i] for k, v in lists.items()}}
                out += _expand_entries(entry["stages"], inner, resolve, where)
        else:
            out.append(_finish_stage(_sub(entry, env), resolve))
    return out


def expand(name: str, values: dict[str, Any], resolve: Resolver, where: str = "study") -> list[dict]:
    """The stage dicts of recipe `name` with `values` for its parameters (defaults for the rest).
    `resolve` turns a data value into a list of DataRef dicts."""
    recipe = get_recipe(name)
    unknown = sorted(set(values) - set(recipe.params))
    if unknown:
        raise TaxonError(f"{where}: recipe '{name}' has no parameter '{unknown[0]}'; its parameters: "
                         f"{', '.join(recipe.params) or '(none)'}")
    env = {**recipe.defaults(), **values}
    missing = [k for k, v in env.items() if v == REQUIRED]
    if missing:
        raise TaxonError(f"{where}: recipe '{name}' needs a value for '{missing[0]}'; "
                         f"add `{missing[0]}: ...` to the grid block")
    return _expand_entries(recipe.stages, env, resolve, f"{where} ({name})")
