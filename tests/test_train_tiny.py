"""Training stages on the tiny model: LoRA SFT, full pretraining, and a chain of stages."""

from __future__ import annotations

import json

import pytest
import torch

from taxon.config import DataRef, LoraSpec, StageSpec
from taxon.models import STAGE_META, load_model, resolve_targets
from taxon.train import train_stage

PROBE = "What is the sentiment of this financial news sentence?\nSentence: Sales rose.\nSentiment:"

SFT_STAGE = resolve_targets(StageSpec(
    objective="sft", data=(DataRef(dataset="fpb"),), steps=3, batch_size=2, lr=5e-3,
    warmup_ratio=0.0, max_length=128, lora=LoraSpec(r=4, alpha=8, dropout=0.0),
), "tiny")
PRETRAIN_STAGE = StageSpec(
    objective="pretrain",
    data=(DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation"),),
    steps=2, batch_size=2, lr=1e-3, warmup_ratio=0.0, max_length=64, lora=None,
)


def logits(model, tokenizer, text=PROBE):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits[0].float().cpu()


@pytest.fixture(scope="module")
def base_logits(tiny_model):
    return logits(*tiny_model)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("stages") / "sft"
    figures = train_stage(SFT_STAGE, "tiny", out, desc="test-sft")
    return out, figures


def test_lora_sft_stage_writes_checkpoint(sft_checkpoint):
    out, figures = sft_checkpoint
    files = {p.name for p in out.iterdir()}
    assert "adapter_config.json" in files
    assert "adapter_model.safetensors" in files
    assert "model.safetensors" not in files  # only the adapter, not a full copy
    assert not list(out.parent.glob("sft.tmp*"))  # the temporary folder was renamed away
    meta = json.loads((out / STAGE_META).read_text())
    assert meta["base"] == "tiny"
    assert meta["lora"] is True
    assert StageSpec.model_validate(meta["spec"]) == SFT_STAGE
    assert meta["figures"]["mixture"]["fpb:default:train"]["examples"] == 3 * 2
    assert figures["tokens"] > 0
    assert figures["final_loss"] is not None and figures["final_loss"] > 0
    assert 0 < figures["trainable_params"] < figures["total_params"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_lora_checkpoint_loads_and_differs_from_base(sft_checkpoint, base_logits):
    out, _ = sft_checkpoint
    model, tokenizer = load_model(str(out), device="cpu")
    assert not hasattr(model, "peft_config") or not model.peft_config  # merged, plain model
    tuned = logits(model, tokenizer)
    assert tuned.shape == base_logits.shape
    assert torch.isfinite(tuned).all()
    assert (tuned - base_logits).abs().max() > 1e-3


def test_full_pretrain_stage_and_chain(sft_checkpoint, tmp_path, base_logits):
    """Integration: a full fine-tuning pretrain stage from tiny, then an SFT stage whose base is
    the first stage's checkpoint folder; both load back and change the model."""
    full = tmp_path / "pretrain"
    figures = train_stage(PRETRAIN_STAGE, "tiny", full, desc="test-pretrain")
    files = {p.name for p in full.iterdir()}
    assert {"config.json", "model.safetensors", STAGE_META} <= files
    assert "adapter_config.json" not in files
    meta = json.loads((full / STAGE_META).read_text())
    assert meta["lora"] is False and meta["base"] == "tiny"
    assert figures["trainable_params"] == figures["total_params"]
    # Packed blocks of max_length tokens (at most one of them the partial last block).
    blocks = PRETRAIN_STAGE.steps * PRETRAIN_STAGE.batch_size
    assert (blocks - 1) * 64 < figures["tokens"] <= blocks * 64
    model, tokenizer = load_model(str(full), device="cpu")
    pre = logits(model, tokenizer)
    assert (pre - base_logits).abs().max() > 1e-3

    # A second stage starting from the first stage's checkpoint folder (itself a LoRA stage).
    sft_out, _ = sft_checkpoint
    chained = tmp_path / "chained"
    train_stage(SFT_STAGE, str(sft_out), chained, desc="test-chain")
    meta = json.loads((chained / STAGE_META).read_text())
    assert meta["base"] == str(sft_out)
    model, tokenizer = load_model(str(chained), device="cpu")
    after = logits(model, tokenizer)
    first, _ = load_model(str(sft_out), device="cpu")
    before = logits(first, tokenizer)
    assert (after - before).abs().max() > 1e-3
