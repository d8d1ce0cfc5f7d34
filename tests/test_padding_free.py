"""Padding-free SFT batches: packed examples stay apart, and training is the padded training."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from taxon.config import DataRef, LoraSpec, StageSpec
from taxon.data import mixture, render
from taxon.models import resolve_targets
from taxon.padding_free import TokenCounter, applies
from taxon.train import train_stage

FPB = DataRef(dataset="takala/financial_phrasebank", config="sentences_50agree")


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    stage = StageSpec(objective="sft", data=(FPB,), steps=1, batch_size=3, max_length=128)
    ds, _ = mixture.build(stage, tiny_tokenizer, render.uses_chat(tiny_tokenizer, None))
    rows = [ds[i] for i in range(3)]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # unequal lengths, so a padded batch pads
    return rows


def _logits(model, **batch):
    # use_cache=False as in training: with a cache, transformers does not look for packed rows.
    with torch.no_grad():
        return model(**batch, use_cache=False).logits[0]


def test_packed_example_logits_equal_its_logits_alone(tiny_model, examples):
    model, tokenizer = tiny_model
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collate([{"input_ids": e["input_ids"]} for e in examples])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    packed = _logits(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    start = 0
    for e in examples:
        n = len(e["input_ids"])
        alone = _logits(model, input_ids=torch.tensor([e["input_ids"]]))
        torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=0)
        start += n
    # The same row with positions running on: the later examples now see the earlier ones.
    leaky = _logits(model, input_ids=batch["input_ids"])
    n0 = len(examples[0]["input_ids"])
    assert (leaky[n0:] - packed[n0:]).abs().max() > 1e-3


def test_token_counter_measures_padding(tiny_tokenizer, examples):
    pad = tiny_tokenizer.pad_token_id
    rows = [{"input_ids": e["input_ids"]} for e in examples]
    lengths = [len(e["input_ids"]) for e in examples]
    padded = TokenCounter(DataCollatorForLanguageModeling(pad_token_id=pad))
    padded(rows)
    padded(rows)  # collated ahead by the loader, never trained on
    assert padded.efficiency(1) == pytest.approx(sum(lengths) / (3 * max(lengths)))
    assert padded.efficiency(1) < 1
    flat = TokenCounter(DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True))
    flat(rows)
    assert flat.efficiency(1) == 1.0


def _stage(packing: bool) -> StageSpec:
    # fp32 so the two layouts can agree to rounding; accumulation checks the loss weighting.
    spec = StageSpec(objective="sft", data=(FPB,), steps=3, batch_size=4, grad_accum=2, lr=5e-3,
                     warmup_ratio=0.0, max_length=128, lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                     precision="fp32", packing=packing)
    return resolve_targets(spec, "tiny")


def test_padding_free_training_equals_padded_training(tmp_path, data_dir):
    """Same examples per step, same order, same loss weighting: the losses of every step agree,
    including after the updates, while only the padded run processes padding."""
    assert applies(_stage(True)) and not applies(_stage(False))
    packed = train_stage(_stage(True), "tiny", tmp_path / "packed", desc="test-packed")
    padded = train_stage(_stage(False), "tiny", tmp_path / "padded", desc="test-padded")
    assert packed["tokens"] == padded["tokens"]
    assert packed["packing_efficiency"] == 1.0
    assert padded["packing_efficiency"] < 1.0
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-4)
    assert packed["final_loss"] == pytest.approx(padded["final_loss"], rel=1e-4)


def test_pretraining_blocks_are_full(tmp_path, data_dir):
    stage = StageSpec(objective="pretrain", data=(FPB,), steps=1, batch_size=2, max_length=64,
                      lora=None)
    assert not applies(stage)  # one row of full blocks would only cost attention
    assert not applies(stage.model_copy(update={"packing": True}))
    figures = train_stage(stage, "tiny", tmp_path / "pre", desc="test-pretrain-blocks")
    assert figures["packing_efficiency"] == 1.0


def test_labelled_loss_equals_the_models_own_loss(tiny_model, examples):
    """The CPU loss (logits of labelled positions only) is the full-logits loss, on a padded
    batch and on a padding-free row, and the two layouts agree."""
    from taxon.labelled_loss import labelled_loss

    model, tokenizer = tiny_model
    rows = [{"input_ids": e["input_ids"],
             "labels": [t if m else -100 for t, m in zip(e["input_ids"], e["completion_mask"], strict=True)]}
            for e in examples]
    losses = []
    for free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=free)(rows)
        with torch.no_grad():
            ours = labelled_loss(model, batch)
            full = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                     "position_ids", "labels")},
                         use_cache=False).loss
        torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
        losses.append(ours)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_packing_default_is_padding_free_only_on_cuda():
    """auto: on CPU sdpa attends over the whole packed row, which measured slower than padding."""
    import torch

    stage = _stage(True).model_copy(update={"packing": None})
    assert applies(stage) == torch.cuda.is_available()
    assert "packing" not in stage.canonical()  # auto leaves stage identities as they were
