"""Stage mixtures: label masking, sizes, rates, seeding, token budgets, refused splits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from taxon.config import DataRef, StageSpec
from taxon.data import mixture, render
from taxon.data.sources import load_rows
from taxon.errors import TaxonError
from taxon.evals.tasks import held_out_splits

WIKI = {"dataset": "wikitext", "config": "wikitext-2-v1", "split": "validation"}


def sft(*data, steps=3, batch_size=2, grad_accum=2, seed=0, **kw):
    return StageSpec(objective="sft", data=tuple(data), steps=steps, batch_size=batch_size,
                     grad_accum=grad_accum, seed=seed, **kw)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def fpb_sft(tiny_tokenizer):
    stage = sft(DataRef(dataset="fpb"), steps=3, batch_size=2, grad_accum=2)
    return stage, *mixture.build(stage, tiny_tokenizer, chat=True)


@pytest.fixture(scope="module")
def fpb_prompts(tiny_tokenizer, fpb_card):
    """Token ids of the chat-formatted prompt of every FPB train/test row -> its label names."""
    out = {}
    for split in ("train", "test"):
        table = {}
        for row in load_rows("fpb", None, split):
            prompt, completion = render.as_pair(fpb_card, row)
            key = tuple(ids(tiny_tokenizer, render.format_prompt(tiny_tokenizer, prompt, True)))
            table.setdefault(key, set()).add(completion)
        out[split] = table
    return out


def test_sft_size_is_steps_times_batch(fpb_sft):
    stage, ds, summary = fpb_sft
    assert len(ds) == stage.steps * stage.batch_size * stage.grad_accum == 12
    assert set(ds.column_names) == {"input_ids", "completion_mask"}
    assert summary["fpb:default:train"]["examples"] == 12


def test_sft_completion_mask_covers_exactly_the_completion(fpb_sft, fpb_prompts, tiny_tokenizer):
    _, ds, _ = fpb_sft
    eos = tiny_tokenizer.eos_token
    for ex in ds:
        input_ids, mask = ex["input_ids"], ex["completion_mask"]
        assert len(mask) == len(input_ids)
        k = mask.index(1)
        assert k > 0
        assert mask == [0] * k + [1] * (len(mask) - k)  # prompt masked out, completion in
        prompt_ids = tuple(input_ids[:k])
        assert prompt_ids in fpb_prompts["train"], "prompt is not a chat-formatted FPB train row"
        assert prompt_ids not in fpb_prompts["test"], "a test row reached training"
        completion = tiny_tokenizer.decode(input_ids[k:])
        expected = {render.format_completion(tiny_tokenizer, c, chat=True)
                    for c in fpb_prompts["train"][prompt_ids]}
        assert completion in expected
        assert completion.endswith(eos)
        assert not completion.startswith(" ")
        assert tiny_tokenizer.decode(input_ids[:k]).endswith("<|im_start|>assistant\n")


def test_sft_base_mode_keeps_leading_space(tiny_tokenizer, fpb_card):
    stage = sft(DataRef(dataset="fpb"), steps=2, batch_size=2, grad_accum=1)
    ds, _ = mixture.build(stage, tiny_tokenizer, chat=False)
    labels = {f" {name}{tiny_tokenizer.eos_token}" for name in fpb_card.labels}
    for ex in ds:
        k = ex["completion_mask"].index(1)
        prompt = tiny_tokenizer.decode(ex["input_ids"][:k])
        assert "<|im_start|>" not in prompt
        assert prompt.endswith("Sentiment:")
        assert tiny_tokenizer.decode(ex["input_ids"][k:]) in labels


def _count_sources(ds, tok):
    counts = {"fpb": 0, "tfns": 0}
    for ex in ds:
        text = tok.decode(ex["input_ids"])
        is_fpb, is_tfns = "\nSentence: " in text, "\nTweet: " in text
        assert is_fpb != is_tfns
        counts["fpb" if is_fpb else "tfns"] += 1
    return counts


@pytest.mark.parametrize(
    "rates,steps,batch_size,grad_accum",
    [((0.75, 0.25), 4, 2, 2), ((0.3, 0.7), 5, 2, 1), ((None, None), 4, 2, 1)],
)
def test_sft_rates_are_respected(tiny_tokenizer, rates, steps, batch_size, grad_accum):
    stage = sft(DataRef(dataset="fpb", rate=rates[0]), DataRef(dataset="tfns", rate=rates[1]),
                steps=steps, batch_size=batch_size, grad_accum=grad_accum)
    ds, _ = mixture.build(stage, tiny_tokenizer, chat=True)
    total = steps * batch_size * grad_accum
    assert len(ds) == total
    shares = [r if r is not None else 0.5 for r in rates]
    assert _count_sources(ds, tiny_tokenizer) == {
        "fpb": round(shares[0] * total), "tfns": round(shares[1] * total)
    }


def test_seed_determines_the_data(tiny_tokenizer):
    def build(seed):
        stage = sft(DataRef(dataset="fpb"), steps=4, batch_size=2, grad_accum=1, seed=seed)
        ds, _ = mixture.build(stage, tiny_tokenizer, chat=True)
        return ds["input_ids"], ds["completion_mask"]

    a, b, c = build(0), build(0), build(1)
    assert a == b
    assert a[0] != c[0]


def test_pretrain_has_enough_tokens(tiny_tokenizer):
    stage = StageSpec(objective="pretrain", data=(DataRef(**WIKI),), steps=2, batch_size=2,
                      grad_accum=2, max_length=64)
    ds, _ = mixture.build(stage, tiny_tokenizer, chat=True)
    assert ds.column_names == ["input_ids"]
    assert len(ds) >= stage.steps * stage.batch_size * stage.grad_accum
    assert {len(x) for x in ds["input_ids"]} == {stage.max_length}
    eos = tiny_tokenizer.eos_token_id
    assert sum(x.count(eos) for x in ds["input_ids"]) > 0  # documents are separated by EOS


def test_pretrain_replay_shares(tiny_tokenizer):
    stage = StageSpec(objective="pretrain", data=(DataRef(dataset="fpb", rate=0.8),),
                      replay=DataRef(**WIKI, rate=0.2), steps=4, batch_size=2, max_length=64)
    _, summary = mixture.build(stage, tiny_tokenizer, chat=True)
    budget = (stage.steps * stage.batch_size * stage.grad_accum + 1) * stage.max_length
    fpb = summary["fpb:default:train"]["tokens"]
    wiki = summary["wikitext:wikitext-2-v1:validation"]["tokens"]
    # Each source stops at the first document that reaches its share of the token budget.
    assert 0.8 * budget <= fpb < 0.8 * budget + 200
    assert 0.2 * budget <= wiki < 0.2 * budget + 2000
    assert wiki < fpb


def test_stage_rates_must_sum_to_one():
    with pytest.raises(ValidationError, match="sum to"):
        StageSpec(objective="sft",
                  data=(DataRef(dataset="fpb", rate=0.5), DataRef(dataset="tfns", rate=0.6)))
    with pytest.raises(ValidationError):
        StageSpec(objective="sft",
                  data=(DataRef(dataset="fpb", rate=1.2), DataRef(dataset="tfns", rate=-0.2)))
    with pytest.raises(ValidationError):
        DataRef(dataset="fpb", rate=-0.1)
    with pytest.raises(ValidationError, match="every dataset"):
        StageSpec(objective="sft", data=(DataRef(dataset="fpb", rate=1.0), DataRef(dataset="tfns")))
    with pytest.raises(ValidationError, match="replay needs a rate"):
        StageSpec(objective="pretrain", data=(DataRef(dataset="fpb"),), replay=DataRef(**WIKI))
    ok = StageSpec(objective="sft",
                   data=(DataRef(dataset="fpb", rate=0.7), DataRef(dataset="tfns", rate=0.3)))
    assert ok.rates() == [0.7, 0.3]


@pytest.mark.parametrize(
    "objective,ref",
    [
        ("sft", DataRef(dataset="fpb", split="test")),
        ("pretrain", DataRef(dataset="fpb", config="sentences_allagree", split="test")),
        ("sft", DataRef(dataset="tfns", split="validation")),
        ("pretrain", DataRef(dataset="glue", config="sst2", split="validation")),
    ],
)
def test_training_on_an_eval_split_is_refused(tiny_tokenizer, objective, ref):
    stage = StageSpec(objective=objective, data=(ref,), steps=1, batch_size=1)
    with pytest.raises(TaxonError, match="eval task"):
        mixture.build(stage, tiny_tokenizer, chat=True, held_out=held_out_splits)


def test_wikitext_validation_is_allowed_as_replay(tiny_tokenizer):
    """No eval task scores wikitext, and the mirror's only general text is its validation split."""
    stage = StageSpec(objective="sft", data=(DataRef(dataset="fpb", rate=0.5),),
                      replay=DataRef(**WIKI, rate=0.5), steps=2, batch_size=2)
    ds, summary = mixture.build(stage, tiny_tokenizer, chat=True)
    assert len(ds) == 4
    assert summary["wikitext:wikitext-2-v1:validation"]["examples"] == 2
