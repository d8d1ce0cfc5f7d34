"""SFT batches encode their shared prompt prefix once (labelled_loss): the loss and every LoRA
gradient equal the per-row computation, for each architecture family the seeds name."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from taxon import labelled_loss as ll
from taxon.config import DataRef, StageSpec
from taxon.data import mixture, render
from taxon.models import load_model, lora_targets

FPB = DataRef(dataset="takala/financial_phrasebank", config="sentences_50agree")


def _batch(tokenizer, n=6):
    stage = StageSpec(objective="sft", data=(FPB,), steps=1, batch_size=n, max_length=128)
    ds, _ = mixture.build(stage, tokenizer, render.uses_chat(tokenizer, None))
    rows = [
        {
            "input_ids": ds[i]["input_ids"],  # labels on the completion only, as SFTTrainer builds them
            "labels": [
                t if m else -100 for t, m in zip(ds[i]["input_ids"], ds[i]["completion_mask"], strict=True)
            ],
        }
        for i in range(n)
    ]
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id or 0)
    batch = collate(rows)
    assert (batch["labels"] != -100).sum() < (batch["attention_mask"] == 1).sum()  # prompts unlabelled
    return batch


@pytest.mark.parametrize("alias", ["tiny", "tiny-gpt2", "tiny-qwen2"])
def test_shared_prefix_loss_and_gradients_equal_per_row(alias, data_dir):
    model, tokenizer = load_model(alias, device="cpu")
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora_targets(alias)))
    )
    for name, p in model.named_parameters():  # LoRA B starts at 0: give it values so grads flow everywhere
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    for m in model.modules():  # GPT-2 has dropout: draws differ between any two passes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = _batch(tokenizer)
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    p = ll.shared_prefix(batch["input_ids"], batch["attention_mask"], keep)
    assert p >= ll.MIN_SHARED, "the FPB template's opening should be shared by every row"

    def run(shared: bool):
        model.zero_grad()
        old = ll.MIN_SHARED
        ll.MIN_SHARED = old if shared else 10**9
        try:
            loss = ll.labelled_loss(model, dict(batch))
        finally:
            ll.MIN_SHARED = old
        loss.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}
        return loss.detach(), grads

    loss_shared, g_shared = run(True)
    loss_plain, g_plain = run(False)
    torch.testing.assert_close(loss_shared, loss_plain, atol=1e-5, rtol=1e-5)
    assert g_shared.keys() == g_plain.keys() and g_shared
    for name in g_plain:
        torch.testing.assert_close(g_shared[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_no_shared_prefix_without_a_common_opening():
    ids = torch.tensor([[1] * 10 + [2, 3], [1] * 3 + [5] * 9])
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, -2] = True
    assert ll.shared_prefix(ids, torch.ones_like(ids), keep) == 0  # 3 shared tokens: not worth it
    ids[1, :10] = 1
    assert ll.shared_prefix(ids, torch.ones_like(ids), keep) == 10
    keep[0, 4] = True  # a label inside the opening: the prefix stops before it
    assert ll.shared_prefix(ids, torch.ones_like(ids), keep) == 0
