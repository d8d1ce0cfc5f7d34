"""The generation path on `tiny`: strings out, stop strings honoured, batching changes nothing;
extractors on hand-written strings."""

from __future__ import annotations

import pytest
import torch

from taxon.evals.generation import cut_at_stop, extract, generate, prompt_budget

PROMPTS = [
    "Question: Janet has 3 apples and buys 4 more. How many apples does she have?\nAnswer:",
    "Hi",
    "The company said that net sales fell by 5 % to EUR 12.3 mn in the third quarter, while "
    "operating profit rose.",
    "Context: Revenue was $4.2 billion.\nQuestion: What was revenue?\nAnswer:",
]


def reference_greedy(model, tok, prompt: str, n: int) -> list[int]:
    """Greedy decoding by hand: one unpadded forward pass over the whole sequence per token."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


@pytest.fixture(scope="module")
def unstopped(tiny_model):
    model, tok = tiny_model
    return generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=1)


def test_generation_returns_strings(unstopped):
    assert len(unstopped) == len(PROMPTS)
    for g in unstopped:
        assert isinstance(g.text, str) and g.text
        assert 0 < g.new_tokens <= 24 and not g.truncated


@pytest.mark.parametrize("batch_size", [2, 4])
def test_batched_equals_one_at_a_time(tiny_model, unstopped, batch_size):
    model, tok = tiny_model
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)  # padding happens
    batched = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=batch_size)
    assert [g.text for g in batched] == [g.text for g in unstopped]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in unstopped]


def test_generation_equals_hand_greedy_decoding(tiny_model, unstopped):
    model, tok = tiny_model
    for prompt, g in zip(PROMPTS[:2], unstopped[:2], strict=True):
        ids = reference_greedy(model, tok, prompt, 24)
        assert g.text == tok.decode(ids, skip_special_tokens=True)


def test_stops_at_stop_sequence(tiny_model, unstopped):
    model, tok = tiny_model
    full = unstopped[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a string the model is known to produce
    assert stop.strip() and stop in full
    got = generate(model, tok, PROMPTS[:1], max_new_tokens=24, stop=["@@never@@", stop])[0]
    assert got.text == full[: full.index(stop)]
    assert stop not in got.text
    assert got.new_tokens < unstopped[0].new_tokens  # generation stopped early, not just the text


def test_long_prompts_lose_their_oldest_tokens(tiny_model):
    model, tok = tiny_model
    budget = prompt_budget(model, 8)
    assert budget == model.config.max_position_embeddings - 8
    long = "word " * (budget + 50) + "end"
    g = generate(model, tok, [long, "short"], max_new_tokens=8, batch_size=2)
    assert g[0].truncated and g[0].prompt_tokens == budget
    assert not g[1].truncated


def test_cut_at_stop():
    assert cut_at_stop("18\n\nQuestion: next", ["Question:", "\n\n"]) == "18"
    assert cut_at_stop("abc", []) == "abc"
    assert cut_at_stop("abc", ["", "x"]) == "abc"
    assert cut_at_stop("a Question: b\n\nc", ["\n\n", "Question:"]) == "a "


@pytest.mark.parametrize(("extractor", "text", "expected"), [
    ("last_number", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
    ("last_number", "So the total is 1,234 dollars", "1234"),
    ("last_number", "#### 1,000\nthen 7 more", "1000"),  # the marked answer wins over later ones
    ("last_number", "The change is -3.5 points, not 16-3 = 13.", "13"),
    ("last_number", "He lost -3.5", "-3.5"),
    ("last_number", "16-3", "3"),  # a hyphen between digits is not a minus sign
    ("last_number", "The answer is 42.", "42"),
    ("last_number", "no digits here", ""),
    ("last_number", "#### none\nbut 5 later", "5"),
    ("first_line", "  NVIDIA invented the GPU.  \nQuestion: next", "NVIDIA invented the GPU."),
    ("first_line", "\n\n  second line is first \n", "second line is first"),
    ("first_line", "", ""),
    ("regex:answer is (\\w+)", "The answer is Paris, of course", "Paris"),
    ("regex:\\d+%", "margin rose to 23% from 20%", "23%"),
    ("regex:(yes)|(no)", "I would say no.", "no"),
    ("regex:xyz", "nothing", ""),
])
def test_extractors(extractor, text, expected):
    assert extract(extractor, text) == expected


def test_unknown_extractor_is_refused():
    from taxon.errors import TaxonError
    from taxon.evals.tasks import TaskSpec

    with pytest.raises(ValueError):
        extract("last_word", "x")
    with pytest.raises(Exception, match="unknown extractor"):
        TaskSpec(name="t", dataset="gsm8k", output="generate", extractor="last_word")
    with pytest.raises(Exception, match="bad regular expression"):
        TaskSpec(name="t", dataset="gsm8k", output="generate", extractor="regex:(")
    assert TaxonError  # the CLI turns validation errors into one line via config.parse
