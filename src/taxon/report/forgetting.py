"""Forgetting in a study of watched stages: the decision table (each run's domain and general
change against the base model, its verdict, whether and why it stopped) and the plot of domain
against general loss over the steps, one line per experiment, the base marked.

Both read the store only: experiments' stage chains (`experiments`, `stages`) and each watched
stage's points (`watch` table; the same log is in the stage's figures).
"""

from __future__ import annotations

import json


def _chains(store, study: str | None) -> list[tuple[str, list[dict]]]:
    """(experiment name, its stages' rows in order) for the study's experiments."""
    out = []
    for exp in store.experiments(study):
        stages = [store.stage(sid) for sid in json.loads(exp["stages"])]
        out.append((exp["name"], [s for s in stages if s is not None]))
    return out


def _watch(stage: dict) -> dict | None:
    return (stage.get("figures") or {}).get("watch")


def decision_table(store, study: str | None = None) -> list[dict]:
    """One row per experiment whose last stage was watched, after a `base` row (the model the
    first watched stage started from): experiment, stage id, steps trained, domain and general
    loss of the stage's output, their change against the base (fractions when the watch is
    relative, else nats), verdict (excellent, good, acceptable, "forgetting: stop"), stopped
    (bool), why (the stop's reason, or ""), relative (bool), and choice: True for the run the
    table recommends, the lowest domain loss among runs whose verdict is not forgetting."""
    rows: list[dict] = []
    base_row = None
    for name, stages in _chains(store, study):
        watched = [s for s in stages if _watch(s)]
        if not stages or not _watch(stages[-1]):
            continue
        w = _watch(stages[-1])
        final = w.get("final") or (w["log"][-1] if w.get("log") else None)
        if final is None:
            continue
        if base_row is None and w.get("base"):
            base_row = {"experiment": "base", "stage": watched[0]["parent"], "steps": 0,
                        "domain_loss": w["base"]["domain"], "general_loss": w["base"]["general"],
                        "domain_vs_base": 0.0, "general_vs_base": 0.0, "verdict": "base",
                        "stopped": False, "why": "", "relative": w.get("relative", True)}
        stop = w.get("stopped")
        rows.append({"experiment": name, "stage": stages[-1]["id"], "steps": final["step"],
                     "domain_loss": final["domain"], "general_loss": final["general"],
                     "domain_vs_base": final["domain_vs_base"],
                     "general_vs_base": final["general_vs_base"], "verdict": final["verdict"],
                     "stopped": stop is not None,
                     "why": "" if stop is None else f"stopped at step {stop['step']}, kept step "
                                                    f"{stop['kept_step']}: {stop['reason']}",
                     "relative": w.get("relative", True)})
    fit = [r for r in rows if r["verdict"] != "forgetting: stop"]
    best = min(fit, key=lambda r: r["domain_loss"]) if fit else None
    for r in rows:
        r["choice"] = r is best
    if base_row:
        base_row["choice"] = False
    return ([base_row] if base_row else []) + rows


def trajectories(store, study: str | None = None) -> dict[str, list[dict]]:
    """Per experiment, the points of its watched stages in chain order, with `x` the step
    counted from the first watched stage's start."""
    out = {}
    for name, stages in _chains(store, study):
        points, offset = [], 0
        for s in stages:
            w = _watch(s)
            if not w:
                continue
            log = w.get("log") or []
            for r in log:
                points.append({**r, "x": offset + r["step"], "stage": s["id"]})
            stop = w.get("stopped")
            offset += stop["kept_step"] if stop else (log[-1]["step"] if log else 0)
        if points:
            out[name] = points
    return out


def forgetting_figure(store, study: str | None = None):
    """Domain loss against general loss over the steps (left: the path each experiment takes,
    base marked; right: both changes against the base by step, with the acceptable threshold
    when the study has one), or None when no stage was watched."""
    paths = trajectories(store, study)
    if not paths:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    base = None
    for name, pts in paths.items():
        line, = ax.plot([p["domain"] for p in pts], [p["general"] for p in pts], marker=".",
                        label=name)
        ax.plot(pts[-1]["domain"], pts[-1]["general"], "o", color=line.get_color())
        bx.plot([p["x"] for p in pts], [p["domain_vs_base"] for p in pts], color=line.get_color(),
                label=f"{name}: domain")
        bx.plot([p["x"] for p in pts], [p["general_vs_base"] for p in pts], "--",
                color=line.get_color(), label=f"{name}: general")
        if base is None and pts[0]["domain_vs_base"] == 0 and pts[0]["general_vs_base"] == 0:
            base = pts[0]
    if base is not None:
        ax.plot(base["domain"], base["general"], "k*", markersize=14, label="base", zorder=5)
    ax.set_xlabel("domain loss (nats/token)")
    ax.set_ylabel("general loss (nats/token)")
    ax.set_title("domain against general loss over steps")
    ax.legend(fontsize=7)
    bx.axhline(0, color="k", lw=0.8)
    bx.set_xlabel("steps since the base")
    bx.set_ylabel("change against the base")
    bx.set_title("domain (solid) and general (dashed) change")
    bx.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
