"""The report's view of a study's adapter sets: the transfer matrix (every model of the set on
every task, the untrained base as the first row, each adapter's own task marked), the adapters'
figures (train and eval loss, time, size, trainable parameters) and the validation prompts'
checks (how many passed, per model and dataset, and every answer with its reason)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from taxon.report.arms import Arm, Scores
from taxon.study.adapter_sets import BASE, MULTI
from taxon.study.store import Store

OWN = "◆"  # marks a cell where the adapter is scored on its own task


@dataclass
class SetView:
    name: str
    matrix: dict  # plots.transfer_matrix's input, kind "score": rows base first
    transfer: pd.DataFrame  # the matrix as a table: score (change against the base); own task marked
    adapters: pd.DataFrame
    validation: pd.DataFrame  # passed/total per model and dataset
    answers: pd.DataFrame = field(default_factory=pd.DataFrame)  # every validation answer


def _rows(scores: Scores, spec: dict) -> list[tuple[Arm, dict]]:
    """The set's arms, base first, then the datasets in the set's order, then the multi-task one."""
    order = [BASE, *spec["datasets"], MULTI]
    found = [(a, a.axes) for a in scores.arms if a.axes.get("adapter_set") == spec["name"]]
    return sorted(found, key=lambda r: order.index(r[1]["dataset"])
                  if r[1]["dataset"] in order else len(order))


def _label(axes: dict) -> str:
    return {BASE: "base (untrained)", MULTI: "multi-task adapter"}.get(axes["dataset"], axes["dataset"])


def transfer(scores: Scores, spec: dict, tasks: list[str]) -> tuple[dict, pd.DataFrame]:
    """Each model's primary metric (mean over seeds) on each task; the base row first."""
    own = [d["task"] for d in spec["datasets"].values()]
    columns = own + [t for t in tasks if t not in own]
    rows = _rows(scores, spec)
    matrix = {"kind": "score", "trained": [], "tasks": columns, "score": [], "diagonal": [],
              "title": f"Transfer matrix of adapter set '{spec['name']}'"}
    base = next((a for a, ax in rows if ax["dataset"] == BASE), None)
    table = []
    for arm, axes in rows:
        means, cells = [], {"model": _label(axes), "experiment": arm.name}
        for t in columns:
            s = scores.score(arm, t)
            b = scores.score(base, t) if base is not None and arm is not base else None
            means.append(None if s is None else s.mean)
            text = "-" if s is None else f"{s.mean:.3f}"
            if s is not None and b is not None:
                text += f" ({s.mean - b.mean:+.3f})"
            if axes.get("task") == t:
                text = f"{OWN} {text}"
            cells[f"{t} ({s.metric})" if s is not None else t] = text
        matrix["trained"].append(_label(axes))
        matrix["diagonal"].append(axes.get("task"))
        matrix["score"].append(means)
        table.append(cells)
    return matrix, pd.DataFrame(table)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def adapters(store: Store, study: str | None, name: str) -> pd.DataFrame:
    rows = [r for r in store.adapters(study) if r["adapter_set"] == name]
    return pd.DataFrame([{
        "adapter": r["dataset"], "experiment": r["experiment"],
        "train loss": _round(r["train_loss"], 3), "eval loss": _round(r["eval_loss"], 3),
        "train s": _round(r["train_seconds"], 1), "size": _size(r["weights_bytes"]),
        "trainable params": r["trainable_params"], "train rows": r["train_examples"],
        "held-out rows": r["eval_examples"], "folder": r["folder"],
    } for r in rows])


def validation(store: Store, scores: Scores, spec: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Passed/total per model (rows) and dataset (columns), and every answer checked."""
    counts, answers = [], []
    for arm, axes in _rows(scores, spec):
        row = {"model": _label(axes)}
        for exp in arm.experiments:
            for v in store.validations(exp["model_key"]):
                key = next((k for k, d in spec["datasets"].items() if _same(d["dataset"], v["dataset"])),
                           v["dataset"])
                got = row.get(key, "0/0").split("/")
                row[key] = f"{int(got[0]) + v['passed']}/{int(got[1]) + 1}"
                answers.append({"model": _label(axes), "experiment": exp["name"], "dataset": key,
                                "prompt": v["idx"], "check": v["kind"], "expect": json.dumps(v["expect"]),
                                "passed": v["passed"], "reason": v["detail"],
                                "answer": v["answer"].strip()[:200]})
        if len(row) > 1:
            counts.append(row)
    table = pd.DataFrame(counts)
    if not table.empty:  # datasets in the set's order
        table = table[["model", *[k for k in spec["datasets"] if k in table], *[
            c for c in table if c != "model" and c not in spec["datasets"]]]].fillna("-")
    return table, pd.DataFrame(answers)


def _same(dataset: str, card_id: str) -> bool:
    from taxon.data.cards import get_card

    return get_card(dataset).id == card_id


def views(store: Store, scores: Scores, study: str | None, tasks: list[str]) -> list[SetView]:
    """One view per adapter set the study declared (none for other studies)."""
    spec = store.study_spec(study) if study else None
    out = []
    for s in (spec or {}).get("adapter_sets") or []:
        matrix, table = transfer(scores, s, tasks)
        counts, answers = validation(store, scores, s)
        out.append(SetView(s["name"], matrix, table, adapters(store, study, s["name"]), counts, answers))
    return out
