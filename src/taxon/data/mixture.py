"""Turn a stage's datasets and rates into the token sequences it trains on.

Pretraining mixes by tokens (each source contributes its rate of the stage's token budget) and
packs documents into fixed-length blocks; SFT and mixed stages mix by examples (a stage's
`mix_by` says otherwise). Sampling is seeded; a source
smaller than its share is repeated in fresh shuffled passes. A split that an eval task scores on
is refused, so no test item can reach a training text.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from datasets import Dataset

from taxon.config import DataRef, StageSpec
from taxon.data import render
from taxon.data.cards import get_card
from taxon.data.sources import load_rows
from taxon.errors import TaxonError


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt and completion encoded separately, then concatenated: exactly the tokens the
    log-likelihood scorer sees, so training and evaluation cannot disagree at the boundary."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return p, c


def select_rows(rows, ref: DataRef, seed: int, part: str = "train"):
    """The rows of `ref` a stage uses: a `fraction` and a `cap` take a prefix of one seeded order
    (so smaller subsets nest in larger ones), and with `holdout` the first share of that prefix is
    the held-out part (`part="holdout"`, scored as the eval loss) and the rest the training part."""
    if ref.fraction < 1 or ref.cap is not None:
        keep = max(1, math.ceil(ref.fraction * len(rows)))
        keep = min(keep, ref.cap) if ref.cap is not None else keep
        rows = rows.shuffle(seed=seed).select(range(keep))
    if ref.holdout is None:
        if part != "train":
            raise ValueError(f"dataset '{ref.dataset}' has no holdout")
        return rows
    n_out = max(1, round(ref.holdout * len(rows)))
    if n_out >= len(rows):
        raise TaxonError(f"dataset '{ref.dataset}': {len(rows)} rows leave none for training after "
                         f"holding out {ref.holdout:g}; raise the cap or lower the holdout")
    return rows.select(range(n_out) if part == "holdout" else range(n_out, len(rows)))


def _examples(ref: DataRef, objective: str, tokenizer, chat: bool, seed: int,
              max_length: int, held_out: frozenset[str] = frozenset(),
              part: str = "train") -> tuple[list[dict], int]:
    """A source's rows as token sequences, and how many SFT pairs were dropped for exceeding
    `max_length` (truncating them would cut off the completion, the only part with a loss).
    `held_out`: the source's splits that eval tasks score on (never read). `part`: the training
    rows or the stage's own held-out rows (`select_rows`)."""
    if ref.split == "test" or ref.split in held_out:
        raise TaxonError(
            f"stage data '{ref.dataset}' uses split '{ref.split}', which an eval task scores on; "
            "train on a train split so no test item reaches training"
        )
    card = get_card(ref.dataset).for_config(ref.config)
    rows = select_rows(load_rows(ref.dataset, ref.config, ref.split, seed=seed), ref, seed, part)
    out, too_long = [], 0
    as_text = objective == "pretrain" or card.templates.prompt is None
    for row in rows:
        if as_text:
            text = render.as_text(card, row)
            if not text.strip():
                continue
            ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            out.append({"input_ids": ids, "completion_mask": [1] * len(ids)})
        else:
            prompt, completion = render.as_pair(card, row)
            p, c = encode_pair(
                tokenizer,
                render.format_prompt(tokenizer, prompt, chat),
                render.format_completion(tokenizer, completion, chat),
            )
            if len(p) + len(c) > max_length:
                too_long += 1
                continue
            out.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    if not out:
        raise TaxonError(
            f"dataset '{ref.dataset}' split '{ref.split}' has no non-empty rows of at most "
            f"max_length={max_length} tokens; raise the stage's max_length"
        )
    return out, too_long


def _take(pool: list[dict], rng: np.random.Generator, n_examples=None, n_tokens=None) -> list[dict]:
    """Draw from `pool` in shuffled passes until `n_examples` or `n_tokens` are reached."""
    taken, tokens = [], 0
    while True:
        for i in rng.permutation(len(pool)):
            if (n_examples is not None and len(taken) >= n_examples) or (
                n_tokens is not None and tokens >= n_tokens
            ):
                return taken
            taken.append(pool[i])
            tokens += len(pool[i]["input_ids"])


def _allocate(total: int, rates: list[float]) -> list[int]:
    """Split `total` by `rates` into whole counts that sum to `total` (largest remainder)."""
    exact = [r * total for r in rates]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(rates)), key=lambda i: exact[i] - counts[i], reverse=True):
        if sum(counts) == total:
            break
        counts[i] += 1
    return counts


def pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate the examples' tokens (each already ends with EOS) and cut fixed-length blocks;
    the incomplete tail is dropped, so every block has exactly `block` tokens."""
    flat = [t for e in examples for t in e["input_ids"]]
    return [{"input_ids": flat[i : i + block]} for i in range(0, len(flat) - block + 1, block)]


def _budgets(stage: StageSpec, pools: list[list[dict]]) -> list[int]:
    """Each source's share of the stage: tokens when the stage mixes by tokens, else examples.

    The stage needs `steps * batch * accum` training sequences: blocks of `max_length` tokens for
    pretrain (plus one, since packing drops a tail), examples for sft and mixed (a mixed stage's
    text sources count packed blocks). Mixing in the other unit converts that need through each
    source's mean length at the given rates."""
    rates = stage.rates()
    n_seq = stage.steps * stage.batch_size * stage.grad_accum
    parts = list(stage.data) + ([stage.replay] if stage.replay else [])

    def unit_len(ref, pool):  # mean tokens of one training sequence drawn from this source
        if stage.objective == "mixed" and stage.usage(ref) == "text":
            return stage.max_length
        return float(np.mean([len(e["input_ids"]) for e in pool]))

    def mean_len():  # of a sequence drawn from the whole mixture
        return sum(r * unit_len(ref, p) for r, ref, p in zip(rates, parts, pools, strict=True) if r)

    if stage.objective == "pretrain":
        tokens = (n_seq + 1) * stage.max_length
        if stage.by_tokens():
            return _allocate(tokens, rates)
        return _allocate(int(np.ceil(tokens / mean_len())), rates)
    if stage.by_tokens():
        return _allocate(int(np.ceil(n_seq * mean_len())), rates)
    return _allocate(n_seq, rates)


def _mixed_part(stage: StageSpec, ref: DataRef, pool: list[dict], share: int,
                rng: np.random.Generator) -> list[dict]:
    """One source of a mixed stage: text packed into blocks with loss on every token, or pairs
    with loss on the completion only."""
    if stage.usage(ref) == "pair":
        return _take(pool, rng, n_tokens=share) if stage.by_tokens() else _take(pool, rng, n_examples=share)
    need = share if stage.by_tokens() else (share + 1) * stage.max_length
    blocks = pack(_take(pool, rng, n_tokens=need), stage.max_length)
    blocks = blocks if stage.by_tokens() else blocks[:share]
    return [{**b, "completion_mask": [1] * len(b["input_ids"])} for b in blocks]


def build(stage: StageSpec, tokenizer, chat: bool,
          held_out: Callable[[str], set[str]] | None = None) -> tuple[Dataset, dict]:
    """The stage's training examples and a summary per source. `held_out(dataset)`: the splits
    that eval tasks score on, refused here (the caller asks the evals layer, which sits above
    data: train.py passes `evals.tasks.held_out_splits`).

    sft: columns input_ids and completion_mask, steps * batch * accum examples.
    pretrain: input_ids in blocks of exactly max_length tokens, enough for every step.
    mixed: input_ids and completion_mask; text sources as packed blocks (mask all ones), pair
    sources as examples (mask on the completion).
    """
    rng = np.random.default_rng(stage.seed)
    parts = list(stage.data) + ([stage.replay] if stage.replay else [])
    pools, dropped = [], []
    for ref, rate in zip(parts, stage.rates(), strict=True):
        if rate == 0:  # not read at all
            pools.append([])
            dropped.append(0)
            continue
        # A mixed stage reads each source as its `as` says; the others as their objective does.
        how = stage.objective if stage.objective != "mixed" else (
            "pretrain" if stage.usage(ref) == "text" else "sft")
        pool, too_long = _examples(ref, how, tokenizer, chat, stage.seed, stage.max_length,
                                   frozenset(held_out(ref.dataset)) if held_out else frozenset())
        pools.append(pool)
        dropped.append(too_long)
    shares = _budgets(stage, pools)
    chosen: list[dict] = []
    summary = {}
    for ref, rate, share, pool, too_long in zip(parts, stage.rates(), shares, pools, dropped,
                                                strict=True):
        if share == 0:
            continue
        if stage.objective == "mixed":
            got = _mixed_part(stage, ref, pool, share, rng)
        elif stage.by_tokens():
            got = _take(pool, rng, n_tokens=share)
        else:
            got = _take(pool, rng, n_examples=share)
        chosen += got
        summary[f"{ref.dataset}:{ref.config or 'default'}:{ref.split}"] = {
            "rate": rate, "as": stage.usage(ref), "examples": len(got),
            "tokens": sum(len(e["input_ids"]) for e in got),
            "loss_tokens": sum(sum(e["completion_mask"]) if "completion_mask" in e
                               else len(e["input_ids"]) for e in got),
            "pool": len(pool), "dropped_too_long": too_long,
        }
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    if stage.objective == "pretrain":
        chosen = pack(chosen, stage.max_length)
    return Dataset.from_list(chosen), summary


def holdout_set(stage: StageSpec, tokenizer, chat: bool) -> Dataset | None:
    """Every held-out example of the stage's sources with a `holdout` (each once, unsampled), or
    None when no source holds any out. Same rendering and length limit as the training part."""
    out: list[dict] = []
    for ref in stage.data:
        if ref.holdout is None:
            continue
        how = stage.objective if stage.objective != "mixed" else (
            "pretrain" if stage.usage(ref) == "text" else "sft")
        pool, _ = _examples(ref, how, tokenizer, chat, stage.seed, stage.max_length, part="holdout")
        out += pool
    if not out:
        return None
    if stage.objective == "pretrain":
        out = pack(out, stage.max_length)
    return Dataset.from_list(out)
