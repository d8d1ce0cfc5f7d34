"""pass@1 for code tasks: each answer put into the task's `program` template and run in the sandbox.

With greedy decoding there is one sample per problem, so pass@1 (Chen et al., 2021) is the share of
problems whose program passes; the per-problem outcome and its reason are kept with the prediction.
"""

from __future__ import annotations

from taxon.data import render
from taxon.evals.sandbox import Limits, Outcome, guards, run_programs
from taxon.evals.tasks import TaskSpec


def programs(task: TaskSpec, card, rows, answers) -> list[str]:
    """The programs to run: the task's template over each row with its answer as `completion`."""
    assert task.program is not None
    return [render.render(card, task.program, {**row, "completion": answer})
            for row, answer in zip(rows, answers, strict=True)]


def execute(task: TaskSpec, card, rows, answers) -> list[Outcome]:
    limits = Limits(timeout=task.timeout, memory_mb=task.memory_mb)
    return run_programs(programs(task, card, rows, answers), limits, desc=f"{task.name} sandbox")


def settings(task: TaskSpec) -> dict:
    """What the results depend on: the limits and which guards held on this machine."""
    return {"timeout_s": task.timeout, "memory_mb": task.memory_mb, "sandbox": guards()}
