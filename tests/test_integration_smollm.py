"""The embedded SmolLM2-135M-Instruct with the mirror's real data: train -> evaluate."""

from __future__ import annotations

import json

from taxon.config import DataRef, LoraSpec, StageSpec
from taxon.evals.evaluate import evaluate_task
from taxon.evals.tasks import get_task
from taxon.models import STAGE_META, load_model, resolve_targets
from taxon.train import train_stage


def test_lora_sft_then_eval_on_smollm(tmp_path, data_dir):
    stage = StageSpec(objective="sft", data=(DataRef(dataset="fpb"),), steps=3, batch_size=4,
                      lr=5e-4, max_length=128, lora=LoraSpec(r=4, alpha=8))
    out = tmp_path / "ckpt"
    figures = train_stage(resolve_targets(stage, "smollm2-135m"), "smollm2-135m", out)
    meta = json.loads((out / STAGE_META).read_text())
    assert meta["lora"] and meta["base"] == "smollm2-135m"
    assert figures["tokens"] > 0 and figures["trainable_params"] < figures["total_params"] / 50

    task = get_task("fpb")
    base_model, tok = load_model("smollm2-135m", device="cpu")
    tuned_model, _ = load_model(str(out), device="cpu")
    base = evaluate_task(base_model, tok, task, limit=16, seed=1)
    tuned = evaluate_task(tuned_model, tok, task, limit=16, seed=1)
    assert base.n == tuned.n == 16 and base.n_total == 970
    assert [p["idx"] for p in base.predictions] == [p["idx"] for p in tuned.predictions]
    diffs = [abs(a - b) for p, q in zip(base.predictions, tuned.predictions, strict=True)
             for a, b in zip(p["scores"], q["scores"], strict=True)]
    assert max(diffs) > 1e-3  # the adapter was applied when loading the checkpoint
    assert 0 <= tuned.metrics["macro_f1"]["value"] <= 1
