"""Results tables from the store: each score with its 95% bootstrap interval and, where GPT-4 has a
published score on the task and metric (evals/references.yaml), the percentage of it that the
small model reaches.

One table per output type present (multiple choice, generation, perplexity), one row per
(experiment, task); a table's metric columns are the metrics its tasks report, so each task shows
its own metrics and a task without a metric shows '-'.
"""

from __future__ import annotations

import json

from taxon.evals import references
from taxon.evals.tasks import get_task
from taxon.study.store import Store

COLUMNS = ("accuracy", "macro_f1", "weighted_f1", "ece")  # the multiple-choice metrics
SECTIONS = {"multiple_choice": "Multiple choice", "generate": "Generation",
            "perplexity": "Perplexity"}
NOTES = {
    "multiple_choice": "Multiple choice: each label scored by log-likelihood. ECE: lower is better.",
    "generate": "Generation: greedy; the answer is extracted from the text before the first stop "
                "string. exact_match and token_f1 after SQuAD normalisation (lowercase, no "
                "punctuation or articles); rouge_l: ROUGE-L F1; bleu_n: corpus BLEU-n (sacrebleu, "
                "0-1 scale), its interval from resampled items; numeric_accuracy: the answer "
                "within the task's relative tolerance of the reference number.",
    "perplexity": "Perplexity: `n` counts windows (documents joined with EOS, cut into "
                  "non-overlapping windows of the task's max_length tokens; the interval resamples "
                  "windows); loss in nats per predicted token; lower is better.",
}


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _scalars(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, dict) and "value" in v]


def training_note(store: Store, experiments: list[dict]) -> str:
    """How the experiments' stages were trained: precision and machine of the runs that trained
    them (a reused stage keeps the run that trained it)."""
    kinds = set()
    for exp in {e["name"]: e for e in experiments}.values():
        for sid in json.loads(exp["stages"]):
            stage, res = store.stage(sid), store.stage_resources(sid) or {}
            run = store.run(res.get("run_id"))
            machine = (run or {}).get("environment", {}).get("machine") or "an unrecorded machine"
            bf16 = (stage or {}).get("figures", {}).get("bf16")
            kinds.add(f"{'bf16 autocast' if bf16 else 'fp32'} on {machine}")
    return f"; trained in {'; '.join(sorted(kinds))}" if kinds else ""


def results_table(store: Store, study: str | None = None) -> str:
    """Markdown: per output type, one row per (experiment, task)."""
    rows: dict[str, list[tuple[dict, dict, object]]] = {k: [] for k in SECTIONS}
    machines: set[str] = set()
    apis: set[str] = set()
    for exp in store.experiments(study):
        for r in store.experiment_results(exp):
            task = get_task(r["task"])
            rows[task.output].append((exp, r, task))
            if "api" in r["metrics"].get("settings", {}):  # scored by the API's server, not here
                apis.add(exp["model"])
                continue
            run = store.result_run(r["model_key"], r["eval_key"])
            machines.add((run or {}).get("environment", {}).get("machine") or "an unrecorded machine")
    present = [k for k in SECTIONS if rows[k]] or ["multiple_choice"]
    lines: list[str] = []
    notes: dict[str, str] = {}
    precisions: set[str] = set()
    for output in present:
        columns: list[str] = list(COLUMNS) if output == "multiple_choice" else []
        for _, r, _ in rows[output]:
            columns += [c for c in _scalars(r["metrics"]) if c not in columns]
        extra = ["tokens"] if output == "perplexity" else []
        head = ["experiment", "task", "n", *extra, *columns, "GPT-4 reference", "% of GPT-4"]
        if len(present) > 1:
            lines += [f"**{SECTIONS[output]}**", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for exp, r, task in rows[output]:
            m = r["metrics"]
            if "api" not in m.get("settings", {}):
                precisions.add(m.get("settings", {}).get("precision", "fp32"))
            ref_cell, pct = "-", "-"
            ref = references.target(task.name, m, r["shots"])
            if ref is not None:
                shots_note = f"{ref.shots}-shot" if isinstance(ref.shots, int) else f"shots {ref.shots}"
                ref_cell = f"{ref.model} {ref.metric} {ref.value:.3f} ({shots_note})"
                pct = f"{100 * m[ref.metric]['value'] / ref.value:.0f}%"
                notes[f"{task.name}/{ref.metric}/{ref.shots}"] = (
                    f"{ref.model} on {task.name}: {ref.source}" + (f" ({ref.note})" if ref.note else ""))
            n = f"{r['n']}" + (f" of {r['n_total']}" if r["n"] < r["n_total"] else "")
            shots = f" ({r['shots']}-shot)" if r["shots"] else ""
            tokens = [f"{m.get('tokens', 0):,}"] if extra else []
            row = [exp["name"], task.name + shots, n, *tokens, *(_cell(m.get(c)) for c in columns),
                   ref_cell, pct]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append("Cells: value [95% bootstrap interval over test items, 1,000 resamples]. "
                 "`n` of `N`: a seeded subsample of the test split. "
                 f"Scored in {' and '.join(sorted(precisions)) or 'fp32'}"
                 f"{' (autocast)' if 'bf16' in precisions else ''} on "
                 f"{'; '.join(sorted(machines)) or 'this machine'}"
                 f"{training_note(store, [e for e, _, _ in sum(rows.values(), [])])}. "
                 "Identical numbers are promised per (machine kind, precision)."
                 + (f" {', '.join(sorted(apis))}: scored through the API by its provider's servers."
                    if apis else ""))
    for output in present:
        lines.append(f"- {NOTES[output]}")
    for note in notes.values():
        lines.append(f"- {note}")
    return "\n".join(lines)
