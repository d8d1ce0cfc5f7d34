"""Length-grouped batches: a short stage's batches are grouped, the training set is unchanged,
the order is the seed's and not longest-first."""

from __future__ import annotations

import random

from taxon.length_groups import LengthGroupedBatches, grouped_order


def _padding_share(lengths, order, batch):
    batches = [order[k : k + batch] for k in range(0, len(order), batch)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / padded


def test_a_short_stage_is_grouped_and_keeps_every_example():
    rng = random.Random(0)
    lengths = [rng.randint(40, 130) for _ in range(6 * 16)]  # six steps of 16, as a short SFT stage
    order = grouped_order(lengths, 16, seed=0)
    assert sorted(order) == list(range(len(lengths)))
    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    # Grouped batches waste a small fraction of what random batches of the same data waste.
    assert _padding_share(lengths, order, 16) < 0.25 * _padding_share(lengths, shuffled, 16)


def test_the_order_is_the_seeds_and_not_longest_first():
    rng = random.Random(2)
    lengths = [rng.randint(10, 500) for _ in range(16 * 40)]
    a, b = grouped_order(lengths, 16, seed=0), grouped_order(lengths, 16, seed=0)
    assert a == b
    assert a != grouped_order(lengths, 16, seed=1)
    firsts = [max(lengths[i] for i in a[k : k + 16]) for k in range(0, len(a), 16)]
    assert firsts != sorted(firsts, reverse=True)  # batches are served in a random order
    assert firsts[0] < max(firsts)


def _spread(order, batch):
    spans = [max(order[k : k + batch]) - min(order[k : k + batch]) for k in range(0, len(order), batch)]
    return sum(spans) / len(spans)


def test_the_window_bounds_the_sort_and_epochs_differ():
    lengths = list(range(16 * 120))  # length = index, so a batch's spread of indices is its spread of lengths
    # A window of one batch sorts nothing across batches; fifty batches group tightly.
    assert _spread(grouped_order(lengths, 16, seed=3, window=50), 16) < 0.2 * _spread(
        grouped_order(lengths, 16, seed=3, window=1), 16)
    sampler = LengthGroupedBatches(lengths, 16, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)
