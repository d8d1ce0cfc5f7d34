"""Rendering rows of the FPB card as text, as SFT pairs, and as (chat) prompts."""

from __future__ import annotations

import pytest

from taxon.data import render
from taxon.errors import TaxonError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # SmolLM2's ChatML markers (tiny borrows them)


def test_fpb_row_as_text_and_pair(fpb_card, fpb_rows):
    assert fpb_card.labels == ("negative", "neutral", "positive")
    rows = fpb_rows["sentences_50agree"]
    seen_labels = set()
    for row in rows[:50] + rows[-50:]:
        assert render.as_text(fpb_card, row) == row["sentence"]
        prompt, completion = render.as_pair(fpb_card, row)
        assert completion == " " + fpb_card.labels[row["label"]]
        assert row["sentence"] in prompt
        assert prompt.startswith("What is the sentiment of this financial news sentence?")
        assert prompt.endswith(f"Sentence: {row['sentence']}\nSentiment:")
        seen_labels.add(row["label"])
    assert seen_labels == {0, 1, 2}


@pytest.mark.parametrize("label,name", [(0, "negative"), (1, "neutral"), (2, "positive")])
def test_completion_uses_card_label_names(fpb_card, label, name):
    _, completion = render.as_pair(fpb_card, {"sentence": "Profit rose.", "label": label})
    assert completion == f" {name}"


def test_missing_column_is_a_taxon_error(fpb_card):
    with pytest.raises(TaxonError, match="template"):
        render.as_text(fpb_card, {"text": "no sentence column", "label": 0})


def test_uses_chat(tiny_tokenizer):
    assert render.uses_chat(tiny_tokenizer, None) is True
    assert render.uses_chat(tiny_tokenizer, False) is False
    assert render.uses_chat(tiny_tokenizer, True) is True


def test_chat_prompt_wraps_prompt_in_template(fpb_card, tiny_tokenizer):
    prompt, _ = render.as_pair(fpb_card, {"sentence": "Operating profit fell.", "label": 0})
    text = render.format_prompt(tiny_tokenizer, prompt, chat=True)
    assert f"{IM_START}user\n{prompt}{IM_END}\n" in text
    assert text.endswith(f"{IM_START}assistant\n")
    assert text.count(f"{IM_START}user") == 1
    assert text.count(f"{IM_START}assistant") == 1
    # The base-model form is the prompt itself.
    assert render.format_prompt(tiny_tokenizer, prompt, chat=False) == prompt


def test_format_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token
    assert eos == IM_END
    assert render.format_completion(tok, " positive", chat=True) == "positive" + eos
    assert render.format_completion(tok, " positive", chat=False) == " positive" + eos
    assert render.format_completion(tok, " positive", chat=True, end=False) == "positive"
    assert render.format_completion(tok, " positive", chat=False, end=False) == " positive"


def _demos(card):
    rows = [
        {"sentence": "Sales grew strongly in the quarter.", "label": 2},
        {"sentence": "The company cut 300 jobs.", "label": 0},
    ]
    return [render.as_pair(card, r) for r in rows]


def test_few_shot_base(fpb_card, tiny_tokenizer):
    demos = _demos(fpb_card)
    prompt, _ = render.as_pair(fpb_card, {"sentence": "The board met on Monday.", "label": 1})
    text = render.format_prompt(tiny_tokenizer, prompt, chat=False, demos=demos)
    (p1, c1), (p2, c2) = demos
    assert text == f"{p1}{c1}\n\n{p2}{c2}\n\n{prompt}"
    assert text.index(p1) < text.index(p2) < text.index(prompt)
    assert text.endswith(prompt)


def test_few_shot_chat(fpb_card, tiny_tokenizer):
    demos = _demos(fpb_card)
    prompt, _ = render.as_pair(fpb_card, {"sentence": "The board met on Monday.", "label": 1})
    text = render.format_prompt(tiny_tokenizer, prompt, chat=True, demos=demos)
    (p1, c1), (p2, c2) = demos
    turns = [
        f"{IM_START}user\n{p1}{IM_END}\n",
        f"{IM_START}assistant\n{c1.lstrip()}{IM_END}\n",
        f"{IM_START}user\n{p2}{IM_END}\n",
        f"{IM_START}assistant\n{c2.lstrip()}{IM_END}\n",
        f"{IM_START}user\n{prompt}{IM_END}\n",
    ]
    positions = [text.index(t) for t in turns]
    assert positions == sorted(positions)
    assert text.endswith(f"{IM_START}assistant\n")
    assert text.count(f"{IM_START}user") == 3
    # Demonstration answers are stripped of the base-model leading space, as completions are.
    assert f"{IM_START}assistant\n positive" not in text
