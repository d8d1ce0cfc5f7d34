"""The report's pictures (matplotlib, no display needed). Each function returns a Figure, or None
when the study has nothing to draw for it (no scaling axis, no LoRA grid, ...)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: works without a display, in CI and over ssh

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from taxon.report.arms import Arm, Scores  # noqa: E402
from taxon.report.compute import Compute  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.titlesize": 10, "svg.hashsalt": "taxon"})


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def heatmap(scores: Scores, tasks: list[str]) -> Figure | None:
    """Arm x task: each task's primary metric, mean over seeds."""
    arms = [a for a in scores.arms if any(scores.score(a, t) for t in tasks)]
    if not arms or not tasks:
        return None
    grid = np.full((len(arms), len(tasks)), np.nan)
    for i, a in enumerate(arms):
        for j, t in enumerate(tasks):
            s = scores.score(a, t)
            if s is not None:
                grid[i, j] = s.mean
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 0.9 + 0.42 * len(arms)), layout="constrained")
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(
        range(len(tasks)),
        [f"{t}\n{scores.score(arms[0], t).metric if scores.score(arms[0], t) else ''}" for t in tasks],
    )
    ax.set_yticks(range(len(arms)), [_short(a.name) for a in arms])
    for i in range(len(arms)):
        for j in range(len(tasks)):
            if not np.isnan(grid[i, j]):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.3f}",
                    ha="center",
                    va="center",
                    color="white" if grid[i, j] < np.nanmean(grid) else "black",
                )
    ax.set_title("Strategy x task (primary metric, mean over seeds)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def scaling(scores: Scores, tasks: list[str]) -> Figure | None:
    """Score against steps or data fraction, one line per series, with 95% intervals."""
    panels = []
    for axis in ("steps", "fraction"):
        series: dict[tuple, list[tuple[float, Arm]]] = {}
        for a in scores.arms:
            if axis in a.axes:
                rest = tuple(sorted((k, str(v)) for k, v in a.axes.items() if k != axis))
                series.setdefault((a.recipe, rest), []).append((float(a.axes[axis]), a))
        series = {k: v for k, v in series.items() if len(v) >= 2}
        for t in tasks:
            if series:
                panels.append((axis, t, series))
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.2), layout="constrained", squeeze=False
    )
    for ax, (axis, task, series) in zip(axes[0], panels, strict=True):
        for (recipe, rest), points in series.items():
            points.sort(key=lambda p: p[0])
            xs, ss = [p[0] for p in points], [scores.score(p[1], task) for p in points]
            keep = [(x, s) for x, s in zip(xs, ss, strict=True) if s is not None]
            if not keep:
                continue
            x = [k[0] for k in keep]
            ax.plot(x, [k[1].mean for k in keep], marker="o", label=_short(f"{recipe} {dict(rest)}", 30))
            ax.fill_between(x, [k[1].low for k in keep], [k[1].high for k in keep], alpha=0.2)
        if axis == "steps":
            ax.set_xscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel(task)
        ax.set_title(f"{task} against {axis} (95% interval)")
        ax.legend(fontsize=7)
    return fig


def forgetting(scores: Scores) -> Figure | None:
    """Domain against general loss, one point per arm (mean over seeds, 95% intervals): lower-left
    is better on both; an arm that moves right forgot general text."""
    pts = []
    for a in scores.arms:
        d, g = scores.score(a, "eval_domain", "loss"), scores.score(a, "eval_general", "loss")
        if d is not None and g is not None:
            pts.append((a, d, g))
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.2), layout="constrained")
    for a, d, g in pts:
        ax.errorbar(
            g.mean,
            d.mean,
            xerr=[[g.mean - g.low], [g.high - g.mean]],
            yerr=[[d.mean - d.low], [d.high - d.mean]],
            fmt="o",
            capsize=2,
        )
        ax.annotate(
            _short(a.name, 28), (g.mean, d.mean), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("eval_general loss (nats/token)")
    ax.set_ylabel("eval_domain loss (nats/token)")
    ax.set_title("Forgetting: domain against general loss")
    return fig


def lora_grid(scores: Scores, tasks: list[str]) -> Figure | None:
    """LoRA rank x alpha (or alpha/r ratio): the first task's primary metric."""
    cells = {}
    for a in scores.arms:
        r = a.axes.get("lora_r")
        alpha = a.axes.get("lora_alpha_ratio", a.axes.get("lora_alpha"))
        if r is not None and alpha is not None and tasks:
            s = scores.score(a, tasks[0])
            if s is not None:
                cells.setdefault((float(r), float(alpha)), []).append(s.mean)
    ranks = sorted({k[0] for k in cells})
    alphas = sorted({k[1] for k in cells})
    if len(ranks) < 2 and len(alphas) < 2:
        return None
    grid = np.full((len(alphas), len(ranks)), np.nan)
    for (r, al), vals in cells.items():
        grid[alphas.index(al), ranks.index(r)] = float(np.mean(vals))
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(ranks), 1.2 + 0.6 * len(alphas)), layout="constrained")
    im = ax.imshow(grid, cmap="magma", aspect="auto", origin="lower")
    ax.set_xticks(range(len(ranks)), [f"{r:g}" for r in ranks])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("alpha / r" if any("lora_alpha_ratio" in a.axes for a in scores.arms) else "alpha")
    ax.set_title(f"LoRA rank x alpha: {tasks[0]}")
    fig.colorbar(im, ax=ax)
    return fig


def pareto(scores: Scores, compute: dict[str, Compute], tasks: list[str]) -> Figure | None:
    """Score against training compute (tokens; log scale), the Pareto front marked."""
    pts = []
    for a in scores.arms:
        c = compute.get(a.name)
        ss = [scores.score(a, t) for t in tasks]
        ss = [s for s in ss if s is not None and s.higher_is_better]
        if c is not None and ss:
            pts.append((max(c.tokens, 1.0), float(np.mean([s.mean for s in ss])), a.name))
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
    front, best = [], -np.inf
    for x, y, _ in sorted(pts):
        if y > best:
            front.append((x, y))
            best = y
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for x, y, name in pts:
        ax.annotate(_short(name, 24), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C3", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (whole chain; 1 = no training)")
    ax.set_ylabel("mean primary metric over tasks")
    ax.set_title("Score against compute")
    ax.legend(fontsize=7)
    return fig


def transfer_matrix(matrix: dict) -> Figure | None:
    """Trained on X (rows), scored on Y (columns); the trained task's cell in bold and outlined.
    Kind `gain` (rq3): the change against the model's zero-shot score, with Holm-adjusted p.
    Kind `score` (adapter sets): each model's own score, the untrained base as the first row."""
    if not matrix or not matrix["trained"]:
        return None
    score = matrix.get("kind") == "score"
    values = matrix["score"] if score else matrix["gain"]
    grid = np.array([[np.nan if g is None else g for g in row] for row in values], dtype=float)
    fig, ax = plt.subplots(
        figsize=(1.8 + 1.2 * len(matrix["tasks"]), 1.2 + 0.45 * len(matrix["trained"])), layout="constrained"
    )
    if score:
        top = np.nanmax(grid) if np.isfinite(grid).any() else 1
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(1.0, top), aspect="auto")
    else:
        lim = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(matrix["tasks"])), matrix["tasks"])
    ax.set_yticks(range(len(matrix["trained"])), [_short(t, 30) for t in matrix["trained"]])
    for i, row in enumerate(values):
        for j, g in enumerate(row):
            if g is None:
                continue
            p = None if score else matrix["p"][i][j]
            star = "*" if p is not None and p < 0.05 else ""
            diag = matrix["tasks"][j] == matrix["diagonal"][i]
            ax.text(j, i, f"{g:.3f}" if score else f"{g:+.3f}{star}", ha="center", va="center", fontsize=8,
                    fontweight="bold" if diag else "normal",
                    color="white" if score and g < 0.6 * max(1.0, np.nanmax(grid)) else "black")
            if diag:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    if score:
        ax.set_xlabel("evaluated on (each task's primary metric, mean over seeds; "
                      "outlined: the adapter's own task)")
    else:
        ax.set_xlabel("evaluated on (gain over the model's zero-shot score; * Holm p < 0.05; "
                      "bold: trained task)")
    ax.set_title(matrix.get("title", "Transfer matrix: trained on X, gain on Y"))
    fig.colorbar(im, ax=ax)
    return fig


def cd_diagram(ranks: dict[str, float], cd: float, title: str) -> Figure:
    """Demšar's critical-difference diagram: arms on the average-rank axis (1 = best); the bar is
    the Nemenyi critical difference, and arms closer than it are joined (not distinguishable)."""
    items = sorted(ranks.items(), key=lambda kv: kv[1])
    k = len(items)
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.32 * k), layout="constrained")
    ax.set_xlim(k + 0.3, 0.7)
    ax.set_ylim(-(k + 1), 1.5)
    ax.hlines(0, 1, k, color="black")
    for r in range(1, k + 1):
        ax.vlines(r, -0.1, 0.1, color="black")
        ax.text(r, 0.25, str(r), ha="center", fontsize=8)
    ax.hlines(1.1, 1, 1 + cd, color="C3", linewidth=2)
    ax.text(1 + cd / 2, 1.25, f"CD = {cd:.2f}", ha="center", fontsize=8, color="C3")
    for i, (name, r) in enumerate(items):
        y = -(i + 1)
        ax.vlines(r, y, 0, color="grey", linewidth=0.6)
        ax.plot(r, 0, "o", color="C0")
        ax.text(
            r,
            y,
            f" {_short(name, 34)} ({r:.2f})",
            va="center",
            fontsize=8,
            ha="left" if r <= (k + 1) / 2 else "right",
        )
    # cliques: maximal runs of arms whose average ranks lie within the CD of each other
    level = 0
    for i in range(k):
        j = max(j for j in range(i, k) if items[j][1] - items[i][1] <= cd)
        if j > i and (i == 0 or items[j][1] - items[i - 1][1] > cd):
            level += 1
            ax.hlines(-0.35 - 0.2 * level, items[i][1], items[j][1], color="black", linewidth=3)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return fig
