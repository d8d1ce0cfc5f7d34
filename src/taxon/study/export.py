"""One JSON file per experiment in the seeds' logging schema, built from the store alone:
experiment_id, timestamp, model, training, evaluation, resources, notes."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from taxon.study.store import Store


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def experiment_record(store: Store, study: str, name: str) -> dict:
    exp = next((e for e in store.experiments(study) if e["name"] == name), None)
    if exp is None:
        raise KeyError(f"{study}/{name}")
    stage_ids = json.loads(exp["stages"])
    stages, stage_res = [], []
    for sid in stage_ids:
        row = store.stage(sid) or {}
        spec = json.loads(row["spec"]) if row else {}
        figures = {k: v for k, v in row.get("figures", {}).items() if k != "mixture"}
        stages.append({"id": sid, "parent": row.get("parent"), "objective": spec.get("objective"),
                       "steps": spec.get("steps"), "spec": spec, "figures": figures,
                       "mixture": row.get("figures", {}).get("mixture"), "checkpoint": row.get("path")})
        stage_res.append({"stage_id": sid, **{k: v for k, v in (store.stage_resources(sid) or {}).items()
                                              if k not in ("stage_id", "created")}})
    results = store.experiment_results(exp)
    eval_res = {r["eval_key"]: r for r in store.eval_resources(exp["model_key"])}
    evaluation = {
        r["task"]: {"eval_key": r["eval_key"], "n": r["n"], "n_total": r["n_total"],
                    "shots": r["shots"], "metrics": r["metrics"], "seconds": r["seconds"]}
        for r in results
    }
    eval_rows = [{"task": r["task"], **{k: v for k, v in eval_res.get(r["eval_key"], {}).items()
                                       if k not in ("model_key", "created")}} for r in results]

    def total(rows, key):
        values = [r.get(key) for r in rows if r.get(key) is not None]
        return sum(values) if values else None

    def peak(rows):
        values = [r.get("peak_memory_mb") for r in rows if r.get("peak_memory_mb") is not None]
        return max(values) if values else None

    run = store.run(exp.get("run_id"))
    last = max([exp["created"]] + [r["created"] for r in results])
    return {
        "experiment_id": f"{study}/{name}",
        "timestamp": _iso(last),
        "model": {"name": exp["model"], "key": exp["model_key"],
                  "checkpoint": stages[-1]["checkpoint"] if stages else None,
                  "total_params": next((r.get("total_params") for r in eval_rows
                                        if r.get("total_params")), None),
                  "trainable_params": stage_res[-1].get("trainable_params") if stage_res else 0},
        "training": {"spec": json.loads(exp["spec"]), "stages": stages,
                     "total_steps": sum(s["steps"] or 0 for s in stages)},
        "evaluation": evaluation,
        "resources": {
            "training": {"wall_seconds": total(stage_res, "wall_seconds"),
                         "tokens": total(stage_res, "tokens"), "peak_memory_mb": peak(stage_res),
                         "stages": stage_res},
            "evaluation": {"wall_seconds": total(eval_rows, "wall_seconds"),
                           "tokens": total(eval_rows, "tokens"), "peak_memory_mb": peak(eval_rows),
                           "tasks": eval_rows},
            # the environment of the run that recorded this experiment, not of the store's last run
            "environment": run["environment"] if run else None,
        },
        "notes": [
            "metrics are point values with 95% bootstrap intervals (low, high); every number can be "
            f"recomputed from the per-example predictions in {store.path}",
            "a stage's resources are those of the run that trained it; a reused stage costs nothing",
        ],
    }


def write_experiment_json(store: Store, study: str, name: str, folder: Path) -> Path:
    """Write `<folder>/<experiment>.json` atomically (temp file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".json")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(experiment_record(store, study, name), f, indent=2, default=str)
    os.replace(tmp, dest)
    return dest


def export_study(store: Store, study: str | None, folder: Path) -> list[Path]:
    return [write_experiment_json(store, e["study"], e["name"], folder / e["study"] if study is None
                                  else folder)
            for e in store.experiments(study)]
