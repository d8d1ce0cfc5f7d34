"""The training loss from the logits of the labelled positions only.

TRL's SFTTrainer takes the loss from a fused LM head. On CUDA its Triton kernel projects only the
positions that have a label; elsewhere it scores every position (prompt and padding included) and
adds entropy and top-1 accuracy over the whole vocabulary at each, for its logs. On a CPU that is
most of an SFT step of a small model: the 49k-token LM head is a fifth of SmolLM2-135M's
multiply-adds, and an FPB pair has 2-3 labelled tokens out of ~90. Off CUDA, taxon asks the model
for the logits of the labelled positions alone (`logits_to_keep` as a mask) and divides the same
sum of token losses by the same count, so nothing but the cost changes.

A padded SFT batch of templated pairs repeats its prompt's opening in every row (the system
prompt, the task's instruction: about half of an FPB pair). Off CUDA, that shared prefix is
encoded once, its key/value cache broadcast to every row, and only the rows' own tokens run per
row; gradients flow back through the shared cache (summed over rows by the broadcast), so loss and
gradients equal the per-row computation (tests/test_shared_prefix.py). The one difference: dropout
(LoRA's, GPT-2's own) draws one mask for the shared prefix instead of one per row.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from trl import SFTTrainer

from taxon.length_groups import LengthGroupedBatches

# A shared prefix shorter than this is not split off: a second forward pass costs more than a few
# tokens saved.
MIN_SHARED = 8


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: torch.Tensor) -> int:
    """Length of the token prefix every row of a right-padded batch shares, ending before the first
    position whose logits are needed; 0 when too short to be worth a pass of its own."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    if attention_mask is not None:
        same &= attention_mask.bool().all(dim=0)
    same &= ~keep.any(dim=0)
    same[-1] = False  # every row keeps at least one token of its own
    p = int(same.long().cumprod(0).sum())
    return p if p >= MIN_SHARED else 0


def _forward(model, rest: dict, keep: torch.Tensor):
    """Logits at the kept positions, encoding the batch's shared prefix once where it has one."""
    ids, mask = rest["input_ids"], rest.get("attention_mask")
    p = shared_prefix(ids, mask, keep) if set(rest) <= {"input_ids", "attention_mask"} else 0
    if not p:
        return model(**rest, use_cache=False, logits_to_keep=keep).logits
    b, length = ids.shape
    head = model(input_ids=ids[:1, :p], use_cache=True, past_key_values=DynamicCache())
    cache = head.past_key_values
    for layer in cache.layers:  # a broadcast view: each row reads the prefix, gradients sum
        layer.keys, layer.values = layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1)
    positions = torch.arange(p, length, device=ids.device).expand(b, -1)
    full_mask = mask if mask is not None else torch.ones_like(ids)
    return model(input_ids=ids[:, p:], attention_mask=full_mask, position_ids=positions,
                 past_key_values=cache, use_cache=True, logits_to_keep=keep[:, p:]).logits


def labelled_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Sum of next-token losses over labels != -100, divided by `num_items_in_batch` (the count
    over all micro-batches of the step) or, without it, by this batch's count."""
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position t predicts label t+1
    targets = labels[:, 1:][keep[:, :-1]]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    logits = _forward(model, rest, keep)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    count = targets.numel() if num_items_in_batch is None else num_items_in_batch
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


class LabelledLossTrainer(SFTTrainer):
    """SFTTrainer whose loss, off CUDA, projects only the labelled positions (no entropy or
    token-accuracy logs there); on CUDA it is TRL's fused head unchanged. With
    `train_sampling_strategy="group_by_length"` its batches come from `taxon.length_groups`,
    seeded by `data_seed`, instead of transformers' mega-batches (which do not group short runs)."""

    def _get_train_sampler(self, train_dataset=None):
        data = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "input_ids" not in getattr(
                data, "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # The global micro-batch: under DDP accelerate hands each process its slice of it.
        batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthGroupedBatches([len(x) for x in data["input_ids"]], batch, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or inputs["input_ids"].device.type == "cuda":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = labelled_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages the gradients
        return loss
