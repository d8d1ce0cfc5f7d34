"""Generation that encodes a shared prompt prefix once: greedy outputs equal the plain path (every
prompt encoded in full) and one-prompt-at-a-time decoding, for each architecture family the seeds
name; stop strings, EOS and truncation behave as on the plain path."""

from __future__ import annotations

import pytest
from test_generation import reference_greedy

from taxon.evals.generation import generate, prompt_budget
from taxon.evals.scoring import prefix_chunks
from taxon.models import load_model

DEMOS = (
    "Question: Janet has 3 apples and buys 4 more. How many apples does she have?\n"
    "Answer: 3 + 4 = 7. #### 7\n\n"
    "Question: A train travels 60 km in 1 hour. How far in 3 hours?\nAnswer: 60 * 3 = 180. #### 180\n\n"
)
QUESTIONS = [  # suffixes of different lengths: the rows of a batch pad between prefix and suffix
    "Question: What is two plus two?\nAnswer:",
    "Question: Hi\nAnswer:",
    "Question: The company said that net sales fell by 5 % to EUR 12.3 mn in the third quarter, while "
    "operating profit rose. By how much did sales fall?\nAnswer:",
    "Question: x\nAnswer:",
    "Question: Revenue was $4.2 billion. What was revenue?\nAnswer:",
]
UNRELATED = ["An unrelated prompt", "Another unrelated prompt, longer than that"]
PROMPTS = [DEMOS + q for q in QUESTIONS] + UNRELATED


def texts(gens):
    return [(g.text, g.new_tokens, g.prompt_tokens, g.truncated) for g in gens]


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt2", "tiny-qwen2"])
def loaded(request, data_dir):
    return load_model(request.param, device="cpu")


def test_prompts_share_a_prefix(tiny_tokenizer):
    encoded = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    chunks = prefix_chunks(encoded, batch_size=2)
    runs = [run for chunk in chunks for run in chunk]
    shared = [run for run in runs if run[0]]
    assert len(shared) == 1 and sorted(shared[0][1]) == list(range(len(QUESTIONS)))
    demo_tokens = len(tiny_tokenizer(DEMOS, add_special_tokens=False)["input_ids"])
    assert shared[0][0] >= demo_tokens - 1  # the demonstrations (a token may merge across the seam)
    assert {i for run in runs if not run[0] for i in run[1]} == {5, 6}


@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_shared_prefix_equals_plain_path(loaded, batch_size):
    model, tok = loaded
    plain = generate(model, tok, PROMPTS, max_new_tokens=20, batch_size=batch_size, share_prefix=False)
    shared = generate(model, tok, PROMPTS, max_new_tokens=20, batch_size=batch_size)
    assert texts(shared) == texts(plain)


def test_shared_prefix_equals_hand_greedy_decoding(loaded):
    """Against a decode that needs no cache, mask or padding: one full forward pass per token."""
    model, tok = loaded
    shared = generate(model, tok, PROMPTS[:4], max_new_tokens=12, batch_size=4)
    for prompt, g in zip(PROMPTS[:4], shared, strict=True):
        assert g.text == tok.decode(reference_greedy(model, tok, prompt, 12), skip_special_tokens=True)


def test_shared_prefix_equals_one_at_a_time(loaded):
    model, tok = loaded
    alone = [generate(model, tok, [p], max_new_tokens=20, batch_size=1, share_prefix=False)[0]
             for p in PROMPTS]
    assert texts(generate(model, tok, PROMPTS, max_new_tokens=20, batch_size=4)) == texts(alone)


def test_shared_prefix_stops_each_row_at_its_stop_string(tiny_model):
    model, tok = tiny_model
    full = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=4)
    text = full[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a string the model is known to produce
    assert stop.strip() and stop in text
    plain = generate(model, tok, PROMPTS, max_new_tokens=24, stop=[stop], batch_size=4, share_prefix=False)
    shared = generate(model, tok, PROMPTS, max_new_tokens=24, stop=[stop], batch_size=4)
    assert texts(shared) == texts(plain)
    assert shared[0].text == text[: text.index(stop)]
    assert shared[0].new_tokens < full[0].new_tokens  # that row stopped early, not only its text


def test_truncated_prompts_with_a_shared_prefix(tiny_model):
    """Prompts over the budget lose their oldest tokens first; what they still share is shared."""
    model, tok = tiny_model
    budget = prompt_budget(model, 8)
    long = "word " * (budget + 20)
    prompts = [long + q for q in QUESTIONS[:3]] + [DEMOS + QUESTIONS[3], "short"]
    plain = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, share_prefix=False)
    shared = generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    assert texts(shared) == texts(plain)
    assert [g.truncated for g in shared] == [True, True, True, False, False]
    assert all(g.prompt_tokens == budget for g in shared[:3])


OTHER_DEMOS = ("Sentence: Net sales rose 5 % in the quarter.\nSentiment: positive\n\n"
               "Sentence: The company cut 200 jobs.\nSentiment: negative\n\n")


@pytest.mark.parametrize("name", ["smollm2-135m", "tiny-gpt2", "tiny-gemma3"])
def test_two_prefixes_in_one_batch(name, data_dir):
    """Rows of one batch continuing two different prefixes (each row gets its own prefix's cache
    rows) decode as every prompt encoded in full. The random tiny models repeat one token whatever
    the prompt; smollm2-135m's rows all differ, so a row that read the other prefix would show."""
    model, tok = load_model(name, device="cpu")
    prompts = [demos + q for q in QUESTIONS[:4] for demos in (DEMOS, OTHER_DEMOS)]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [len([run for run in chunk if run[0]]) for chunk in prefix_chunks(encoded, 8)] == [2]
    plain = generate(model, tok, prompts, max_new_tokens=16, batch_size=8, share_prefix=False)
    assert texts(generate(model, tok, prompts, max_new_tokens=16, batch_size=8)) == texts(plain)
    if name == "smollm2-135m":
        assert len({g.text for g in plain}) == len(prompts)
