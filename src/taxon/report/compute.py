"""What each arm cost: measured on this machine (steps, tokens, wall time, trainable parameters,
peak memory), and estimated for a GPU (GPU-hours, energy, dollars) under stated assumptions.

An arm's figures are the mean over its seeds of its whole chain of stages, shared stages included
(the price of reproducing the arm alone), plus its evaluations. The GPU estimate is
6 x parameters x tokens at an assumed model FLOP utilisation (`study.cost.gpu_seconds`), the
energy the GPU's board power times a data-centre PUE, and the cost its hourly price (gpus.yaml).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from taxon.report.arms import Arm
from taxon.study.cost import DEFAULT_MFU, gpu_seconds, gpus
from taxon.study.store import Store

GPU = "a100"
PUE = 1.2  # data-centre overhead on the GPU's own power, a common planning figure


@dataclass
class Compute:
    steps: float
    tokens: float
    train_seconds: float
    eval_seconds: float
    trainable_params: int | None
    total_params: int | None
    peak_memory_mb: float | None
    gpu_hours: float
    kwh: float
    usd: float


def assumptions(gpu: str = GPU, mfu: float = DEFAULT_MFU, pue: float = PUE) -> str:
    g = gpus()[gpu]
    return (
        f"GPU estimates assume one {g['name']} ({g['tflops']} TFLOP/s dense bf16) at {mfu:.0%} model "
        f"FLOP utilisation, 6 x parameters x training tokens FLOPs; energy = GPU-hours x "
        f"{g['watts']} W board power x PUE {pue}; cost = GPU-hours x ${g['usd_per_hour']}/h "
        "(edit src/taxon/study/gpus.yaml). Measured figures are this machine's, averaged over "
        "seeds, each arm's whole chain of stages counted (shared stages included)."
    )


def arm_compute(
    store: Store, arm: Arm, gpu: str = GPU, mfu: float = DEFAULT_MFU, pue: float = PUE
) -> Compute:
    per_seed = []
    for exp in arm.experiments:
        steps = tokens = train_s = 0.0
        trainable = total = None
        peaks: list[float] = []
        for sid in json.loads(exp["stages"]):
            stage = store.stage(sid) or {}
            res = store.stage_resources(sid) or {}
            steps += json.loads(stage["spec"]).get("steps", 0) if stage.get("spec") else 0
            tokens += res.get("tokens") or 0
            train_s += res.get("wall_seconds") or 0
            trainable = res.get("trainable_params") or trainable
            total = res.get("total_params") or total
            if res.get("peak_memory_mb"):
                peaks.append(res["peak_memory_mb"])
        evals = [
            r
            for r in store.eval_resources(exp["model_key"])
            if r["eval_key"] in set(json.loads(exp["eval_keys"] or "[]"))
        ]
        eval_s = sum(r.get("wall_seconds") or 0 for r in evals)
        peaks += [r["peak_memory_mb"] for r in evals if r.get("peak_memory_mb")]
        total = total or next((r.get("total_params") for r in evals if r.get("total_params")), None)
        per_seed.append((steps, tokens, train_s, eval_s, trainable, total, max(peaks) if peaks else None))
    cols = list(zip(*per_seed, strict=True))
    steps, tokens, train_s, eval_s = (float(np.mean(c)) for c in cols[:4])
    trainable, total = cols[4][0], cols[5][0]
    peak = max((p for p in cols[6] if p is not None), default=None)
    hours = gpu_seconds(gpu, total, int(tokens), mfu) / 3600 if total and tokens else 0.0
    g = gpus()[gpu]
    return Compute(
        steps,
        tokens,
        train_s,
        eval_s,
        trainable,
        total,
        peak,
        hours,
        hours * g["watts"] / 1000 * pue,
        hours * g["usd_per_hour"],
    )
