"""Padding-free SFT batches and the packing-efficiency figure.

With `packing`, TRL's collator (`padding_free=True`) concatenates the examples of a micro-batch into
one row with position ids restarting at 0 for each, and no attention mask. transformers reads the
restarts (`masking_utils.find_packed_sequence_indices`) and gives sdpa/eager a block-diagonal causal
mask; flash-attention gets the same boundaries as `cu_seq_lens`. The collator also drops the label of
each example's first token, which no model could predict from the previous example; in a padded row
that label falls off by the shift anyway, so the loss is the same sum over the same tokens.
The examples per step, their order and the loss weighting are those of padded batches.
"""

from __future__ import annotations

from taxon.config import StageSpec


def applies(stage: StageSpec) -> bool:
    """Pretraining blocks are full already (mixture.pack); one row of them would only make the
    attention quadratic in batch * max_length instead of max_length."""
    if stage.objective == "pretrain":
        return False
    if stage.packing is None:  # auto: see StageSpec.packing
        import torch

        return torch.cuda.is_available()
    return stage.packing


class TokenCounter:
    """Wraps a data collator and records, per micro-batch, the examples' own tokens and the tokens
    the model processes (padding included)."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        real = sum(len(e["input_ids"]) for e in examples)
        self.batches.append((real, int(batch["input_ids"].numel())))
        return batch

    def efficiency(self, micro_batches: int) -> float | None:
        """Non-padding share of the tokens processed over the first `micro_batches` batches (the
        data loader may have collated one batch ahead that was never trained on)."""
        used = self.batches[:micro_batches]
        processed = sum(p for _, p in used)
        return sum(r for r, _ in used) / processed if processed else None
