"""The batched, deduplicated, left-padded scorer equals a plain forward pass per request."""

from __future__ import annotations

import pytest
import torch

from taxon.evals.scoring import loglikelihoods


def reference_loglikelihood(model, ctx, cont) -> float:
    """log P(cont | ctx): one unpadded forward pass over ctx + cont, no tricks."""
    full = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    # The token at position len(ctx) + j is predicted by the logits at position len(ctx) + j - 1.
    return sum(float(logprobs[len(ctx) + j - 1, tok]) for j, tok in enumerate(cont))


@pytest.fixture(scope="module")
def requests(tiny_model):
    _, tok = tiny_model

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    long_ctx = enc("What is the sentiment of this financial news sentence? Answer negative, "
                   "neutral or positive.\nSentence: Operating profit rose to EUR 13.1 mn from "
                   "EUR 8.7 mn in the corresponding period in 2007.\nSentiment:")
    short_ctx = enc("Sentiment:")
    mid_ctx = enc("The company said that net sales fell by 5 %.")
    reqs = [
        (long_ctx, enc(" positive")),
        (long_ctx, enc(" negative")),
        (long_ctx, enc(" neutral")),  # three choices sharing one context
        (long_ctx, enc(" positive and growing strongly")),  # multi-token continuation
        (short_ctx, enc(" negative")),
        (short_ctx, enc(" not at all clear to anyone")),
        (mid_ctx, enc(" Analysts expected a larger fall.")),
        ([tok.eos_token_id], enc("Hello")),  # one-token context
        (mid_ctx + enc(" Analysts"), enc(" expected")),  # same model input as a request above
        (enc("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), enc("negative<|im_end|>")),
    ]
    assert any(len(c) > 1 for _, c in reqs) and any(len(c) == 1 for _, c in reqs)
    assert len({len(c) for c, _ in reqs}) >= 4  # contexts of different lengths: padding happens
    return reqs


@pytest.fixture(scope="module")
def expected(tiny_model, requests):
    model, _ = tiny_model
    return [reference_loglikelihood(model, c, x) for c, x in requests]


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_loglikelihoods_match_plain_forward(tiny_model, requests, expected, batch_size):
    model, tok = tiny_model
    got = loglikelihoods(model, requests, tok.pad_token_id, batch_size=batch_size)
    assert len(got) == len(requests)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert abs(g - e) < 1e-4, (i, g, e)


def test_loglikelihoods_are_not_trivial(tiny_model, requests, expected):
    # The reference itself must distinguish continuations, or the comparison proves nothing.
    assert all(e < 0 for e in expected)
    assert len({round(e, 3) for e in expected[:3]}) == 3
    assert expected[3] < expected[0]  # more tokens, lower joint probability


def test_padding_token_choice_does_not_matter(tiny_model, requests, expected):
    model, tok = tiny_model
    got = loglikelihoods(model, requests, pad_id=0, batch_size=4)
    for g, e in zip(got, expected, strict=True):
        assert abs(g - e) < 1e-4


def test_empty_requests_are_refused(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError):
        loglikelihoods(model, [([1, 2], [])], tok.pad_token_id)
    with pytest.raises(ValueError):
        loglikelihoods(model, [([], [1, 2])], tok.pad_token_id)
