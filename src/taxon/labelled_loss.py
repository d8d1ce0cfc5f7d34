"""The training loss from the logits of the labelled positions only.

TRL's SFTTrainer takes the loss from a fused LM head. On CUDA its Triton kernel projects only the
positions that have a label; elsewhere it scores every position (prompt and padding included) and
adds entropy and top-1 accuracy over the whole vocabulary at each, for its logs. On a CPU that is
most of an SFT step of a small model: the 49k-token LM head is a fifth of SmolLM2-135M's
multiply-adds, and an FPB pair has 2-3 labelled tokens out of ~90. Off CUDA, taxon asks the model
for the logits of the labelled positions alone (`logits_to_keep` as a mask) and divides the same
sum of token losses by the same count, so nothing but the cost changes.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer


def labelled_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Sum of next-token losses over labels != -100, divided by `num_items_in_batch` (the count
    over all micro-batches of the step) or, without it, by this batch's count."""
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position t predicts label t+1
    targets = labels[:, 1:][keep[:, :-1]]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**rest, use_cache=False, logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    count = targets.numel() if num_items_in_batch is None else num_items_in_batch
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


class LabelledLossTrainer(SFTTrainer):
    """SFTTrainer whose loss, off CUDA, projects only the labelled positions (no entropy or
    token-accuracy logs there); on CUDA it is TRL's fused head unchanged."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or inputs["input_ids"].device.type == "cuda":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = labelled_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages the gradients
        return loss
