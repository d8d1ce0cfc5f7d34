"""Forgetting watched during a stage: domain and general loss at step 0 and every N steps.

Each point is scored with the evaluation scorer (`evals.scoring.loglikelihoods`) on a seeded
sample of perplexity windows, the same windows at every point, and logged with its change from
the stage's start and from the base model: the model the chain's first watched stage started
from (a watched parent passes its base on through its checkpoint's metadata). The general loss's
rise against the base classifies the point (excellent, good, acceptable, "forgetting: stop").
With `stop`, `patience` points in a row beyond `acceptable` end the stage, and the weights of the
last point within the threshold are restored as its output; the stop and its reason are kept in
the stage's figures (so a reused cached stage has them too).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from taxon.config import WatchSpec
from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.sources import load_rows
from taxon.errors import TaxonError
from taxon.evals.evaluate import perplexity_windows
from taxon.evals.scoring import loglikelihoods
from taxon.evals.tasks import TaskSpec, get_task

FORGETTING = "forgetting: stop"


def watch_task(ref: str) -> TaskSpec:
    """A perplexity task by name, or the test split of a corpus folder."""
    task = get_task(ref)
    if task.output != "perplexity":
        raise TaxonError(f"watch task '{ref}' is a {task.output} task; watch a perplexity task "
                         "(eval_domain, eval_general) or a corpus folder")
    return task


def check(spec: WatchSpec) -> None:
    """Validate a watch before anything trains: both tasks resolve and are perplexity tasks."""
    for ref in spec.tasks.values():
        watch_task(ref)


def verdict(change: float, spec: WatchSpec) -> str:
    t = spec.thresholds
    for name, limit in (("excellent", t.excellent), ("good", t.good), ("acceptable", t.acceptable)):
        if change <= limit + 1e-12:
            return name
    return FORGETTING


def _change(now: float, then: float, relative: bool) -> float:
    return (now - then) / then if relative else now - then


class Watcher(TrainerCallback):
    def __init__(self, spec: WatchSpec, tokenizer, context: int | None, bf16: bool,
                 base: dict | None = None):
        self.spec, self.bf16, self.base = spec, bf16, base
        self.pad = tokenizer.pad_token_id
        self.requests = {}
        for key, ref in spec.tasks.items():
            task = watch_task(ref)
            card = get_card(task.dataset).for_config(task.config)
            texts = [render.as_text(card, r) for r in load_rows(task.dataset, task.config, task.split)]
            length = min(x for x in (task.max_length, spec.max_length, context) if x)
            windows = perplexity_windows(tokenizer, texts, length)
            pick = sorted(np.random.default_rng(0).permutation(len(windows))[: spec.limit])
            self.requests[key] = [(windows[i][:1], windows[i][1:]) for i in pick]
        self.log: list[dict] = []
        self.start: dict | None = None
        self.snapshot: dict | None = None
        self.kept_step = 0
        self.bad = 0
        self.stopped: dict | None = None

    def measure(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out = {}
        with torch.no_grad():
            for key, requests in self.requests.items():
                ll = loglikelihoods(model, requests, self.pad, batch_size=4, bf16=self.bf16,
                                    desc=f"watch {key}")
                out[key] = -sum(ll) / sum(len(c) for _, c in requests)
        model.train(was_training)
        return out

    def _point(self, model, step: int) -> dict:
        losses = self.measure(model)
        if self.start is None:
            self.start = losses
            self.base = self.base or losses
        rel = self.spec.relative
        row = {"step": step, "domain": losses["domain"], "general": losses["general"]}
        for key in ("domain", "general"):
            row[f"{key}_vs_start"] = _change(losses[key], self.start[key], rel)
            row[f"{key}_vs_base"] = _change(losses[key], self.base[key], rel)
        row["verdict"] = verdict(row["general_vs_base"], self.spec)
        self.log.append(row)
        fmt = "{:+.1%}" if rel else "{:+.3f}"
        tqdm.write(f"watch step {step}: domain {row['domain']:.3f} ({fmt.format(row['domain_vs_base'])} vs "
                   f"base), general {row['general']:.3f} ({fmt.format(row['general_vs_base'])} vs base): "
                   f"{row['verdict']}")
        return row

    def _keep(self, model, step: int) -> None:
        self.snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.kept_step = step

    def on_train_begin(self, args, state, control, model=None, **kw):
        row = self._point(model, state.global_step)
        self._keep(model, state.global_step)  # the starting point is the fallback
        if row["verdict"] == FORGETTING:
            self.bad = 1

    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        if step % self.spec.every or (self.log and self.log[-1]["step"] == step):
            return
        row = self._point(model, step)
        if row["verdict"] != FORGETTING:
            self.bad = 0
            self._keep(model, step)
            return
        self.bad += 1
        if self.spec.stop and self.bad >= self.spec.patience:
            self.restore(model)
            self.stopped = {"step": step, "kept_step": self.kept_step,
                            "reason": f"general loss {row['general_vs_base']:+.2%} against the base "
                                      f"beyond acceptable ({self.spec.thresholds.acceptable:.2%}) "
                                      f"for {self.bad} points in a row"
                            if self.spec.relative else
                            f"general loss {row['general_vs_base']:+.4f} nats against the base beyond "
                            f"acceptable ({self.spec.thresholds.acceptable}) for {self.bad} points"}
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.stopped is None and self.log and self.log[-1]["step"] != state.global_step:
            self._point(model, state.global_step)  # where the stage ended

    def restore(self, model) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in (self.snapshot or {}).items():
                params[name].copy_(value)

    def figures(self) -> dict:
        """What the stage's metadata keeps: the log, the base, the stop, and the final verdict
        (of the point the stage's output is)."""
        final = next((r for r in self.log if r["step"] == self.kept_step), None) if self.stopped \
            else (self.log[-1] if self.log else None)
        return {"tasks": dict(self.spec.tasks), "limit": self.spec.limit,
                "max_length": self.spec.max_length, "relative": self.spec.relative,
                "base": self.base, "start": self.start, "log": self.log, "stopped": self.stopped,
                "final": final, "verdict": final["verdict"] if final else None}


def inherited_base(parent_meta: dict | None, spec: WatchSpec) -> dict | None:
    """The base losses a watched parent measured with the same tasks and windows, else None
    (this stage's start becomes the base)."""
    watch = ((parent_meta or {}).get("figures") or {}).get("watch")
    if not watch or watch.get("tasks") != dict(spec.tasks) or watch.get("limit") != spec.limit \
            or watch.get("max_length") != spec.max_length:
        return None
    return watch.get("base")
