"""taxon's own greedy loop on `tiny`: rows that end at different steps decode as they do alone, an
ended row leaves the batch (the forward passes shrink), waiting prompts join the rows still
decoding, and a stop string is caught wherever it falls across token boundaries."""

from __future__ import annotations

import pytest
import torch
from test_generation import PROMPTS, reference_greedy

from taxon.evals import generation
from taxon.evals.generation import _lookup, generate
from taxon.evals.grouped_attention import grouped_queries

MAX_NEW = 24


@pytest.fixture(scope="module")
def unstopped(tiny_model):
    model, tok = tiny_model
    return [reference_greedy(model, tok, p, MAX_NEW) for p in PROMPTS]


def staggered_stop(tok, unstopped) -> str:
    """A stop string the first prompt's continuation reaches about halfway, so its row ends while
    the others (which reach it later or never) go on."""
    full = tok.decode(unstopped[0], skip_special_tokens=True)
    return full[len(full) // 2 : len(full) // 2 + 3]


def expected(tok, tokens: list[int], stop: str) -> tuple[str, int]:
    """(text, new_tokens) of a row, by hand: the first prefix of its greedy tokens whose text holds
    the stop string ends it; the text is cut where the stop string starts."""
    for n in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:n], skip_special_tokens=True)
        if stop in text:
            return text[: text.index(stop)], n
    return tok.decode(tokens, skip_special_tokens=True), len(tokens)


def test_rows_ending_at_different_steps_decode_as_alone(tiny_model, unstopped):
    model, tok = tiny_model
    stop = staggered_stop(tok, unstopped)
    want = [expected(tok, tokens, stop) for tokens in unstopped]
    assert len({n for _, n in want}) > 1  # the rows do end at different steps
    for batch_size in (1, 2, 3, len(PROMPTS)):
        got = generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, stop=[stop], batch_size=batch_size)
        assert [(g.text, g.new_tokens) for g in got] == want


def test_ended_rows_leave_the_batch(tiny_model, unstopped):
    model, tok = tiny_model
    stop = staggered_stop(tok, unstopped)
    sizes: list[int] = []

    def record(module, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, stop=[stop], batch_size=len(PROMPTS),
                       share_prefix=False)
    finally:
        hook.remove()
    lengths = [g.new_tokens for g in got]
    assert len(set(lengths)) > 1
    # One pass over the prompts, then steps (each adds one or more tokens to every row that has
    # not ended): the rows only ever shrink, and the last passes run without the rows that ended.
    assert sizes[0] == len(PROMPTS)
    assert all(later <= earlier for earlier, later in zip(sizes, sizes[1:], strict=False))
    assert sizes[-1] < sizes[0]
    assert len(sizes) - 1 < max(lengths)  # guessed tokens were accepted: fewer steps than tokens


def test_waiting_prompts_join_rows_still_decoding(tiny_model, unstopped):
    """With a batch of 2 and 4 prompts, the prompts after the first two join as rows end: a pass
    over joining prompts (several tokens each) is followed by steps with more rows than it had,
    the rows already decoding and the new ones together."""
    model, tok = tiny_model
    stop = staggered_stop(tok, unstopped)
    passes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        passes.append(tuple(kwargs["input_ids"].shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, stop=[stop], batch_size=2,
                       share_prefix=False)
    finally:
        hook.remove()
    assert [(g.text, g.new_tokens) for g in got] == [expected(tok, t, stop) for t in unstopped]
    joins = [k for k, (rows, width) in enumerate(passes) if width > 1]
    assert len(joins) >= 2 and passes[joins[0]][0] == 2  # the first two start together
    later = [k for k in joins[1:] if k + 1 < len(passes)]
    assert any(passes[k + 1][0] > passes[k][0] for k in later)  # joined rows decode beside others
    assert max(rows for rows, _ in passes) <= 2


@pytest.mark.parametrize("span", [2, 4])
def test_stop_string_across_tokens_is_caught(tiny_model, unstopped, span):
    """A stop string from the last character of one generated token to the first character of the
    token `span - 1` later: only the text of several tokens together holds it."""
    model, tok = tiny_model
    tokens = unstopped[0]
    full = tok.decode(tokens, skip_special_tokens=True)

    def chars(n: int) -> int:  # characters the first n tokens decode to
        text = tok.decode(tokens[:n], skip_special_tokens=True)
        assert full.startswith(text)
        return len(text)

    for k in range(len(tokens) - span + 1, 0, -1):
        last = k + span - 2  # the token that completes the stop string
        start, end = chars(k) - 1, chars(last) + 1
        stop = full[start:end]
        if (chars(k - 1) <= start and chars(last + 1) >= end and stop.strip()
                and stop not in full[: end - 1]):
            break
    else:
        pytest.fail("no stop string to cut from the continuation")
    got = generate(model, tok, PROMPTS[:1], max_new_tokens=MAX_NEW, stop=[stop])[0]
    assert (got.text, got.new_tokens) == (full[:start], last + 1)


@pytest.mark.parametrize(("seq", "most", "guess"), [
    ([5, 6, 7, 8, 5, 6, 7], 3, [8, 5, 6]),  # the last 3 tokens seen before: what followed them
    ([1, 2, 9, 1, 2, 3, 1, 2], 2, [3, 1]),  # the latest earlier occurrence wins
    ([4, 9, 9, 1, 4], 4, [9, 9, 1, 4]),  # no 3- or 2-gram seen before: the last token alone
    ([1, 2, 3], 2, []),  # nothing repeats: no guess
    ([7, 7], 5, [7]),  # the guess stops at the end of the sequence
])
def test_lookup_guesses_what_followed_the_latest_match(seq, most, guess):
    assert _lookup(seq, most) == guess


def test_grouped_queries_equal_sdpa_on_a_pass_with_holes(tiny_model):
    """A pass of several tokens per row over a cache with padding and holes: attention with the
    query heads grouped under their key/value head gives transformers' SDPA result."""
    model, _ = tiny_model
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    torch.manual_seed(0)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, 6:8] = 0  # holes (rejected guesses)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for grouped in (False, True):
        with torch.no_grad():
            cache = model(input_ids=ids[:, :9], attention_mask=mask[:, :9], position_ids=positions[:, :9],
                          use_cache=True).past_key_values
            with grouped_queries(model, enabled=grouped):
                out = model(input_ids=ids[:, 9:], attention_mask=mask, position_ids=positions[:, 9:],
                            past_key_values=cache, use_cache=True)
        logits[grouped] = out.logits
    assert model.config._attn_implementation == "sdpa"  # set back after the block
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def test_squeezing_out_padding_and_holes_changes_no_output(tiny_model, unstopped, monkeypatch):
    """With no spare room in the cache buffers, every step gathers each row's real columns to its
    right end (padding and rejected guesses squeezed out): outputs stay those of greedy decoding
    one prompt at a time."""
    model, tok = tiny_model
    stop = staggered_stop(tok, unstopped)
    monkeypatch.setattr(generation._GrowingLayer, "reserve", 0)
    squeezes = []
    make_room = generation._Rows.make_room

    def holes(mask: torch.Tensor) -> int:  # masked columns after a row's first real one
        return int(sum((row[int(row.argmax()) :] == 0).sum() for row in mask))

    def counted(rows, width):
        before = holes(rows.mask)
        make_room(rows, width)
        assert holes(rows.mask) == 0  # squeezed out: every row's real columns at its right end
        squeezes.append(before)

    monkeypatch.setattr(generation._Rows, "make_room", counted)
    got = generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, stop=[stop], batch_size=3, share_prefix=False)
    assert [(g.text, g.new_tokens) for g in got] == [expected(tok, t, stop) for t in unstopped]
    assert any(n > 0 for n in squeezes)  # rejected guesses were squeezed out


def test_make_room_keeps_each_rows_real_columns_in_order():
    """Rows with left padding and holes: after squeezing, each row's real keys and values are the
    same vectors in the same order, at the row's right end, with the mask right-aligned."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0],   # padding, a hole, a rejected guess at the end
                         [1, 1, 1, 0, 0, 1, 1, 1],   # a hole of two
                         [0, 1, 1, 1, 1, 1, 1, 0]])  # padding and a trailing hole
    layers = []
    for _ in range(2):
        layer = DynamicLayer()
        layer.update(torch.randn(3, 2, 8, 4), torch.randn(3, 2, 8, 4))
        layers.append(generation._GrowingLayer.adopt(layer))
    cache = DynamicCache()
    cache.layers = layers
    before = [(layer.keys.clone(), layer.values.clone()) for layer in layers]
    rows = generation._Rows([0, 1, 2], [[], [], []], mask.clone(), torch.zeros(3, 1, dtype=torch.long),
                            cache, [0, 0, 0], [[1], [1], [1]])
    rows.make_room(2)
    real = mask.sum(-1).tolist()
    assert rows.mask.shape[1] == max(real) == 6
    for b, n in enumerate(real):
        assert rows.mask[b].tolist() == [0] * (6 - n) + [1] * n
        for layer, (keys, values) in zip(layers, before, strict=True):
            assert torch.equal(layer.keys[b, :, 6 - n :], keys[b][:, mask[b] == 1])
            assert torch.equal(layer.values[b, :, 6 - n :], values[b][:, mask[b] == 1])
            assert not layer.keys[b, :, : 6 - n].any()
            assert layer.buffers[0].shape[2] >= 6 + 2  # room for the next pass's columns
