"""Results tables from the store: each score with its 95% bootstrap interval and, where a
published large-model score exists, the percentage of it that the small model reaches."""

from __future__ import annotations

from taxon.evals.tasks import get_task
from taxon.study.store import Store

COLUMNS = ("accuracy", "macro_f1", "weighted_f1", "ece")


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def results_table(store: Store, study: str | None = None) -> str:
    """Markdown: one row per (experiment, task)."""
    head = ["experiment", "task", "n", *COLUMNS, "large-model reference", "% of reference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: dict[str, str] = {}
    precisions: set[str] = set()
    for exp in store.experiments(study):
        for r in store.results(exp["model_key"]):
            task = get_task(r["task"])
            m = r["metrics"]
            precisions.add(m.get("settings", {}).get("precision", "fp32"))
            ref_cell, pct = "-", "-"
            if task.references:
                ref = task.references[0]
                ref_cell = f"{ref.model} {ref.metric} {ref.value:.3f}"
                if ref.metric in m:
                    pct = f"{100 * m[ref.metric]['value'] / ref.value:.0f}%"
                notes[task.name] = f"{ref.model} on {task.name}: {ref.source}"
            n = f"{r['n']}" + (f" of {r['n_total']}" if r["n"] < r["n_total"] else "")
            shots = f" ({r['shots']}-shot)" if r["shots"] else ""
            row = [exp["name"], task.name + shots, n, *(_cell(m.get(c)) for c in COLUMNS),
                   ref_cell, pct]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Cells: value [95% bootstrap interval over test items, 1,000 resamples]. "
                 "`n` of `N`: a seeded subsample of the test split. ECE: lower is better. "
                 f"Scored in {' and '.join(sorted(precisions)) or 'fp32'}"
                 f"{' (autocast)' if 'bf16' in precisions else ''}.")
    for note in notes.values():
        lines.append(f"- {note}")
    return "\n".join(lines)
