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


# --- shared prefixes and multi-token choices: the cache-reusing paths --------------------------------


def random_requests(seed: int, vocab: int):
    """Three "subjects", each a shared prefix (like five demonstrations) and questions with four
    multi-token choices of different lengths; a few unrelated contexts; one context that is a
    prefix of another. Random token ids, so nothing depends on the tokenizer."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    reqs = []
    for _ in range(3):
        prefix = ids(int(torch.randint(20, 60, (1,), generator=g)))
        for _ in range(7):
            ctx = prefix + ids(int(torch.randint(1, 12, (1,), generator=g)))
            for _ in range(4):
                reqs.append((ctx, ids(int(torch.randint(1, 5, (1,), generator=g)))))
    for _ in range(4):
        reqs.append((ids(int(torch.randint(2, 30, (1,), generator=g))), ids(3)))
    reqs.append((reqs[0][0][:-1], reqs[0][0][-1:] + ids(2)))  # a context inside another one
    return reqs


@pytest.fixture(scope="module")
def random_reqs(tiny_model):
    model, tok = tiny_model
    reqs = random_requests(0, len(tok))
    return reqs, [reference_loglikelihood(model, c, x) for c, x in reqs]


@pytest.mark.parametrize(("batch_size", "pad"), [(1, None), (3, None), (16, None), (5, 0)])
def test_prefix_and_choice_caches_match_plain_forward(tiny_model, random_reqs, batch_size, pad):
    model, tok = tiny_model
    reqs, expected = random_reqs
    got = loglikelihoods(model, reqs, tok.pad_token_id if pad is None else pad, batch_size=batch_size)
    worst = max(abs(g - e) for g, e in zip(got, expected, strict=True))
    assert worst < 1e-4, worst


def test_runs_share_each_subjects_prefix():
    from taxon.evals.scoring import _plan, _runs

    reqs = random_requests(1, 1000)
    runs = _runs(_plan(reqs))
    with_prefix = [r for r in runs if r[0].prefix]
    # Seven questions per subject; the context nested in another joins its subject.
    assert sorted(len(r) for r in with_prefix) == [7, 7, 8]
    assert sum(len(r) for r in runs) == len({tuple(c) for c, _ in reqs})
    for run in with_prefix:
        # The run's prefix is its contexts' whole common prefix, less any token that would leave
        # the shortest context nothing of its own to encode.
        common = 0
        while all(len(c.ids) > common and c.ids[common] == run[0].ids[common] for c in run):
            common += 1
        assert run[0].prefix == min(common, min(len(c.ids) for c in run) - 1) >= 20
        assert all(c.prefix == run[0].prefix for c in run)


class TokenCounter:
    """Counts the token positions (padding included) the model's embedding layer receives."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.n += args[0].numel()


def test_shared_work_is_done_once(tiny_model, tiny_tokenizer):
    """MMLU-like: five long demonstrations shared by 12 questions, four single-token choices
    each. The scorer feeds the demonstrations once, not 48 (or 12) times."""
    model, tok = tiny_model

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    demos = "".join(f"Question {k}: what is {k} + {k}? A. {k} B. {2 * k} C. 0 D. 1\nAnswer: B\n\n"
                    for k in range(5))
    reqs = []
    for q in range(12):
        ctx = enc(demos + f"Question: what is {q} + {q + 1}? A. 1 B. 2 C. {2 * q + 1} D. 3\nAnswer:")
        reqs += [(ctx, enc(f" {letter}")) for letter in "ABCD"]
    counter = TokenCounter(model)
    try:
        got = loglikelihoods(model, reqs, tok.pad_token_id, batch_size=4)
    finally:
        counter.handle.remove()
    naive = sum(len(c) for c, _ in reqs[::4])  # one pass per question, as the old scorer did
    assert counter.n < naive / 3, (counter.n, naive)
    for i in (0, 5, 47):
        assert abs(got[i] - reference_loglikelihood(model, *reqs[i])) < 1e-4
