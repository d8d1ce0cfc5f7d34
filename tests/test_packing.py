"""Pretraining packs a stage's documents into blocks of exactly max_length tokens."""

from __future__ import annotations

import itertools

from taxon.config import DataRef, StageSpec
from taxon.data import mixture


def test_pack_cuts_exact_blocks_in_order():
    docs = [{"input_ids": list(range(start, start + n))} for start, n in [(0, 5), (100, 7), (200, 3)]]
    blocks = mixture.pack(docs, 4)
    assert [len(b["input_ids"]) for b in blocks] == [4, 4, 4]  # 15 tokens -> 3 blocks, tail dropped
    flat = list(itertools.chain.from_iterable(d["input_ids"] for d in docs))
    assert list(itertools.chain.from_iterable(b["input_ids"] for b in blocks)) == flat[:12]


def _check(stage, tokenizer):
    ds, summary = mixture.build(stage, tokenizer, chat=True)
    lengths = {len(b) for b in ds["input_ids"]}
    assert lengths == {stage.max_length}
    assert len(ds) >= stage.steps * stage.batch_size * stage.grad_accum
    assert ds.column_names == ["input_ids"]
    return ds, summary


def test_packing_small_stage_with_replay(tiny_tokenizer):
    stage = StageSpec(objective="pretrain", data=(DataRef(dataset="fpb", rate=0.8),),
                      replay=DataRef(dataset="wikitext", config="wikitext-2-v1",
                                     split="validation", rate=0.2),
                      steps=3, batch_size=2, grad_accum=2, max_length=64)
    _check(stage, tiny_tokenizer)


def test_packing_stage_of_more_than_1000_documents(tiny_tokenizer):
    """Thousands of short FPB sentences still give only full blocks (no short block per batch)."""
    stage = StageSpec(objective="pretrain", data=(DataRef(dataset="fpb"),),
                      steps=100, batch_size=8, max_length=64)
    _, summary = _check(stage, tiny_tokenizer)
    assert next(iter(summary.values()))["examples"] > 1000
