"""Length-grouped batches that work in short runs.

A padded batch costs as much as its longest row times its rows. transformers' `group_by_length`
sorts "mega-batches" of 50 batches, but only when the data holds at least four of them
(`len // (4 * batch)`), and it then serves each mega-batch longest first. A taxon stage's data is
exactly steps x batch examples (data.mixture.build), so a short stage had one batch per
mega-batch: no grouping at all (FPB pairs of 63-124 tokens in one batch of 16), and a longer one
would train its first steps on the longest examples only.

Here every window of up to `WINDOW` batches (the whole stage when shorter) is sorted by length and
cut into batches, and the batches are then served in a seeded random order: each batch holds
examples of similar length, the training set is unchanged, and the first steps are a fair
sample of it. Ties and the order both come from the stage's seed, so a resumed run (a wsd
segment) skips to exactly where it left off.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

WINDOW = 50  # batches sorted together; as transformers' mega-batch, to keep some randomness


def grouped_order(lengths: Sequence[int], batch: int, seed: int, window: int = WINDOW) -> list[int]:
    """Example indices in training order: consecutive runs of `batch` are of similar length."""
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=g).tolist()
    span = batch * window
    batches = []
    for start in range(0, len(shuffled), span):
        # Stable sort over a random permutation: equal lengths stay in random order.
        chunk = sorted(shuffled[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


class LengthGroupedBatches(Sampler[int]):
    """A sampler serving `grouped_order`; `set_epoch` (called by accelerate each epoch) gives
    later epochs their own order."""

    def __init__(self, lengths: Sequence[int], batch: int, seed: int):
        self.lengths, self.batch, self.seed, self.epoch = list(lengths), batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.lengths, self.batch, self.seed + self.epoch))
