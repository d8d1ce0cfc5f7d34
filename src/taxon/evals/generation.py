"""The one generation path: batched greedy decoding, cut at stop strings; and answer extractors.

Prompts are tokenised as the scorer tokenises contexts (no special tokens added: a chat template
already holds them) and grouped as the scorer groups contexts (`scoring.prefix_chunks`): prompts
that share a long prefix (few-shot demonstrations, a task's fixed instruction) have it encoded
once, in one pass, and every batch continues from that prefix's cache rows, so only each prompt's
own tokens are encoded. Within a group, prompts are sorted by what remains (longest first) and
left-padded, with an attention mask that hides the padding (a row is [padding, prefix, padding,
own tokens]); position ids come from that mask, so a prompt decodes the same alone, in a batch,
or after a shared prefix (tests compare the three). Decoding is taxon's own greedy loop, not
`model.generate`: one pass encodes the joining rows' own tokens, then each step feeds every live
row's latest token and a few guessed ones, looked up where the text so far repeated itself or its
prompt (prompt-lookup decoding), keeping the guesses the model's own greedy choice confirms: the
same tokens as one per step, in fewer passes. A row ends at EOS, at `max_new_tokens`, or once
its generated text holds a stop string, and leaves the batch there; the next prompts join the
rows still decoding (continuous batching), so the batch stays full instead of running down to its
longest row. The cache grows in place rather than by concatenation. The decoded text is then cut
at the first stop string. A prompt longer than the model's context minus `max_new_tokens` loses
its oldest tokens (few-shot demonstrations first), as lm-evaluation-harness does, before prefixes
are looked for; `Generation.truncated` says when.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from taxon.evals.grouped_attention import grouped_queries
from taxon.evals.metrics import NUMBER
from taxon.evals.scoring import CacheRows, encode_prefixes, left_pad, prefix_chunks


@dataclass(frozen=True)
class Generation:
    text: str  # the decoded continuation, cut at the first stop string
    prompt_tokens: int  # prompt length as fed to the model (after any truncation)
    new_tokens: int  # tokens generated before EOS or the stop
    truncated: bool  # the prompt was cut on the left to fit the context


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            end = min(end, i)
    return text[:end]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_budget(model, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit before `max_new_tokens` in the model's context (None: no limit)."""
    n = getattr(model.config, "max_position_embeddings", None)
    return None if n is None else max(1, n - max_new_tokens)


def generate(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
    batch_size: int = 16, bf16: bool = False, desc: str = "generating", share_prefix: bool = True,
) -> list[Generation]:
    """Greedy continuations of `prompts`, in order. `share_prefix=False` encodes every prompt in
    full (the plain path, kept to check the shared one against)."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    budget = prompt_budget(model, max_new_tokens)
    truncated = [budget is not None and len(ids) > budget for ids in encoded]
    encoded = [ids[-budget:] if cut else ids for ids, cut in zip(encoded, truncated, strict=True)]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("empty prompt: give at least one token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rule = _Ending(tokenizer, _eos_ids(model, tokenizer), max_new_tokens, stop)
    chunks = (prefix_chunks(encoded, batch_size) if share_prefix
              else [[(0, list(range(len(encoded))))]])
    out: list[Generation | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, unit="seq", dynamic_ncols=True, leave=False)
    for chunk in chunks:
        prefixes, parent = None, {}  # parent: item -> its prefix's cache row
        if chunk[0][0]:
            seqs = [tuple(encoded[members[0]][:p]) for p, members in chunk]
            prefixes = encode_prefixes(model, seqs, pad_id, bf16)
            parent = {i: row for row, (_, members) in enumerate(chunk) for i in members}
        shared = {i: p for p, members in chunk for i in members}
        items = sorted((i for _, members in chunk for i in members),
                       key=lambda i: len(encoded[i]) - shared[i], reverse=True)
        # (item, own tokens, whole prompt): the prefix's part is in its cache row; drafts are
        # looked up in the whole prompt
        queue = [(i, encoded[i][shared[i] :], encoded[i]) for i in items]

        def past(batch: list[int], prefixes=prefixes, parent=parent) -> CacheRows | None:
            return prefixes.select([parent[i] for i in batch]) if prefixes is not None else None

        for i, generated in _decode(model, queue, past, pad_id, rule, batch_size, bf16):
            text = tokenizer.decode(generated, skip_special_tokens=True)
            out[i] = Generation(cut_at_stop(text, stop), len(encoded[i]), len(generated), truncated[i])
            bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


class _Ending:
    """When a row's generation ends: EOS (not kept), `max_new_tokens`, or a stop string in its text
    (the token that completes it is kept). Only the last few tokens, enough to hold the longest
    stop string, are decoded to check: every token that shares in a stop string adds at least one
    of its bytes (a character split over byte tokens included), and the margin keeps a token whose
    decoded form depends on the one before it (a leading space) off the edge."""

    def __init__(self, tokenizer, eos_ids: list[int], max_new_tokens: int, stop: Sequence[str]):
        self.tokenizer, self.eos, self.max_new_tokens = tokenizer, set(eos_ids), max_new_tokens
        self.stop = [s for s in stop if s]
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 4

    def add(self, generated: list[list[int]], tokens: list[int]) -> set[int]:
        """Appends each row's next token (unless it is EOS); the rows that have ended."""
        ended, growing = set(), []
        for row, token in enumerate(tokens):
            if token in self.eos:
                ended.add(row)
                continue
            generated[row].append(token)
            if len(generated[row]) >= self.max_new_tokens:
                ended.add(row)
            elif self.stop:
                growing.append(row)
        if growing:  # only the tail that can hold a stop string, not the whole text each step
            texts = self.tokenizer.batch_decode([generated[r][-self.window :] for r in growing],
                                                skip_special_tokens=True)
            ended.update(r for r, t in zip(growing, texts, strict=True) if any(s in t for s in self.stop))
        return ended


class _GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are views of the first columns of a larger buffer, so a
    decode step writes its token's keys and values in place. `DynamicLayer` concatenates instead:
    a copy of every layer's whole cache per step, about a quarter of a decode step of smollm2-135m
    on a CPU (the weights are read once per step whatever the rows; the copy grows with them)."""

    reserve = 32  # columns of room added when the buffer is (re)made
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # [rows, heads, capacity, dim]

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> _GrowingLayer:
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new.buffers = None
        return new

    def _in_buffer(self) -> bool:
        b = self.buffers
        return (b is not None and b[0].shape[0] == self.keys.shape[0]
                and b[0].data_ptr() == self.keys.data_ptr())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, w = self.keys.shape[-2], key_states.shape[-2]
        if not self._in_buffer() or n + w > self.buffers[0].shape[-2]:
            def room(t: torch.Tensor) -> torch.Tensor:
                b = t.new_empty(t.shape[0], t.shape[1], n + w + self.reserve, t.shape[3])
                b[:, :, :n] = t
                return b
            self.buffers = (room(self.keys), room(self.values))
        keys, values = self.buffers
        keys[:, :, n : n + w], values[:, :, n : n + w] = key_states, value_states
        self.hold(keys, values, n + w)
        return self.keys, self.values

    def hold(self, keys: torch.Tensor, values: torch.Tensor, n: int) -> None:
        """Buffers whose first `n` columns are the cache."""
        self.buffers = (keys, values)
        self.keys, self.values = keys[:, :, :n], values[:, :, :n]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self._in_buffer():
            return super().batch_select_indices(indices)
        keys, values = self.buffers
        self.hold(keys.index_select(0, indices), values.index_select(0, indices), self.keys.shape[-2])


def _mergeable(cache) -> bool:
    """Whether every layer holds all of its rows' columns (no sliding window: `_start` makes every
    such layer a `_GrowingLayer`), so the columns line up with the 2-D mask, rows of two caches
    can be put side by side and rejected guesses can stay as holes."""
    return all(type(layer) is _GrowingLayer for layer in cache.layers)


@dataclass
class _Rows:
    """Rows being decoded: their items, tokens so far, 2-D mask (every row right-aligned: the last
    column is each row's latest token), next position ids and cache. A row is laid out as
    [padding, prefix, padding, own tokens, generated tokens]."""

    items: list[int]
    generated: list[list[int]]
    mask: torch.Tensor
    positions: torch.Tensor  # [rows, 1]: the position id of each row's next token
    cache: object
    tokens: list[int]  # each row's latest token, fed by the next step
    prompts: list[list[int]]  # each row's whole prompt (drafts are looked up in it)

    def keep(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.positions = self.mask.index_select(0, idx), self.positions.index_select(0, idx)
        self.items = [self.items[b] for b in keep]
        self.generated = [self.generated[b] for b in keep]
        self.tokens = [self.tokens[b] for b in keep]
        self.prompts = [self.prompts[b] for b in keep]
        # Columns that no row still reads (the padding of a long row that left) are dropped.
        start = int(self.mask.any(0).int().argmax())
        if start >= 16 and _mergeable(self.cache):
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def make_room(self, width: int) -> None:
        """Room for `width` more columns. When the buffers are full, each row's real columns are
        gathered to its right end (padding and the holes of rejected guesses squeezed out) into
        new buffers, instead of copying them, holes and all, into larger ones. Keys already hold
        their positions (rotary embeddings are applied before caching), so where a column sits
        changes nothing but the float order of the attention's sums, as padding does."""
        if not _mergeable(self.cache):
            return
        layer = self.cache.layers[0]
        if layer._in_buffer() and self.mask.shape[1] + width <= layer.buffers[0].shape[2]:
            return
        real = self.mask.sum(-1)
        kept = int(real.max())
        columns = torch.arange(kept, device=self.mask.device)
        mask = (columns >= kept - real.unsqueeze(-1)).to(self.mask.dtype)  # right-aligned
        # Row b's k-th real column goes to column kept - real[b] + k; padding reads column 0.
        order = torch.argsort(self.mask, dim=-1, stable=True)[:, -kept:]
        source = order.masked_fill(mask == 0, 0)
        for layer in self.cache.layers:
            room = kept + max(width, layer.reserve)
            held = []
            for t in (layer.keys, layer.values):
                out = t.new_zeros(t.shape[0], t.shape[1], room, t.shape[3])
                index = source[:, None, :, None].expand(t.shape[0], t.shape[1], kept, t.shape[3])
                out[:, :, :kept] = t.gather(2, index) * mask[:, None, :, None].to(t.dtype)
                held.append(out)
            layer.hold(*held, kept)
        self.mask = mask

    def extend(self, other: _Rows) -> None:
        """`other`'s rows after these, each side's columns left-padded to the longer's (keys and
        values of zeros, masked)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def side_by_side(a: torch.Tensor, b: torch.Tensor, dim: int, room: int = 0) -> torch.Tensor:
            shape = list(a.shape)
            shape[0], shape[dim] = a.shape[0] + b.shape[0], width + room
            out = a.new_empty(shape)  # written once: no padded copies of either side first
            for rows, t in ((slice(0, a.shape[0]), a), (slice(a.shape[0], None), b)):
                pad = width - t.shape[dim]
                out[rows].narrow(dim, 0, pad).zero_()
                out[rows].narrow(dim, pad, t.shape[dim]).copy_(t)
            return out

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.hold(side_by_side(mine.keys, theirs.keys, 2, mine.reserve),
                      side_by_side(mine.values, theirs.values, 2, mine.reserve), width)
        self.mask = side_by_side(self.mask, other.mask, 1)
        self.positions = torch.cat([self.positions, other.positions])
        self.items += other.items
        self.generated += other.generated
        self.tokens += other.tokens
        self.prompts += other.prompts


def _decode(model, queue: list[tuple[int, list[int], list[int]]], past, pad_id: int, rule: _Ending,
            batch_size: int, bf16: bool):
    """Yields (item, generated tokens) for every (item, own tokens, whole prompt) of `queue` as its
    row ends; `past(items)` gives those items' prefix cache rows (or None).

    Up to `batch_size` rows decode together. Rows join by one pass over their own tokens,
    left-padded to the longest, continuing from their prefix's cache rows and keeping only the last
    position's logits. Position ids come from the mask (its running count of real tokens, as
    `model.generate` derives them), so every real token keeps the position it has alone. Each step
    (`_step`) then feeds every row's latest greedy token and its guesses. A row that ends leaves
    the batch (its inputs, mask, positions and cache rows are dropped), and once a quarter of the
    batch is free the next items join the rows still decoding (in passes of at most
    PREFILL_TOKENS), their cache and mask left-padded to a common width: a step reads
    all the weights whatever its rows, so a batch kept full, rather than run down to its longest
    row, is what makes items/s. Models with sliding-window layers (Gemma 2 and 3), whose cache
    does not line up with the mask, start a new batch only when the last one has ended."""
    if rule.max_new_tokens <= 0:
        for i, *_ in queue:
            yield i, []
        return
    device = next(model.parameters()).device
    rows: _Rows | None = None
    with (torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
          _vocab_in_slices(model, enabled=device.type == "cpu" and not bf16)):
        while queue or rows is not None:
            live = 0 if rows is None else len(rows.items)
            free = batch_size - live
            if queue and (live == 0 or (free >= max(1, batch_size // 4) and _mergeable(rows.cache))):
                joined, queue = queue[:free], queue[free:]
                groups = _prefill_groups(joined)
                for k, group in enumerate(groups):
                    if rows is not None and not _mergeable(rows.cache):  # the rest wait their turn
                        queue = [entry for g in groups[k:] for entry in g] + queue
                        break
                    new = _start(model, group, past([i for i, *_ in group]), pad_id, device)
                    yield from _advance(new, rule, [[t] for t in new.tokens])
                    if new.items:
                        if rows is None or not rows.items:
                            rows = new
                        else:
                            rows.extend(new)
            if rows is None or not rows.items:
                rows = None
                continue
            yield from _advance(rows, rule, _step(model, rows, pad_id, device))
            if not rows.items:
                rows = None


VOCAB_SLICE = 1024  # rows of the vocabulary projection per matrix product


@contextmanager
def _vocab_in_slices(model, enabled: bool):
    """The vocabulary projection computed in slices of its rows, for the block. A decode pass has
    a few rows, and MKL's product of a few rows with a large matrix (smollm2-135m's 49,152 x 576)
    runs on one core far below the memory bandwidth: 34-53 ms at 3-8 rows where 1,024-row slices
    take 21-27 ms (AVX2, fp32), a fifth of a decode step. Every logit is the same dot product
    either way (identical to the bit there; the generation tests compare outputs with and without
    it). A head that is not a plain `Linear` (a LoRA layer on it) is left as it is."""
    head = model.get_output_embeddings() if enabled else None
    if type(head) is not torch.nn.Linear:
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], head.out_features)
        for i in range(0, head.out_features, VOCAB_SLICE):
            bias = None if head.bias is None else head.bias[i : i + VOCAB_SLICE]
            out[..., i : i + VOCAB_SLICE] = F.linear(x, head.weight[i : i + VOCAB_SLICE], bias)
        return out

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


PREFILL_TOKENS = 2048  # most padded tokens in one pass over joining rows


def _prefill_groups(joined: list[tuple[int, list[int], list[int]]]) -> list[list]:
    """The joining rows (longest own tokens first) in groups of at most PREFILL_TOKENS padded
    tokens (one row at least). A pass over many long rows holds each layer's attention scores and
    MLP activations for all of them at once; that, not the cache, set the loop's peak memory, and
    such a pass is bound by arithmetic, not by reading the weights, so smaller passes cost little."""
    groups: list[list] = []
    for entry in joined:
        if groups and (len(groups[-1]) + 1) * len(groups[-1][0][1]) <= PREFILL_TOKENS:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups


def _start(model, joined: list[tuple[int, list[int], list[int]]], past: CacheRows | None, pad_id: int,
           device) -> _Rows:
    """One pass over the joining rows' own tokens; their first greedy tokens."""
    ids, mask = left_pad([own for _, own, _ in joined], pad_id, device)
    width = ids.shape[1]
    cache = None  # without a prefix the model makes its own (a config-aware DynamicCache)
    if past is not None:
        mask, cache = torch.cat([past.mask, mask], dim=-1), past.cache
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -width:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.layers = [_GrowingLayer.adopt(layer) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return _Rows([i for i, *_ in joined], [[] for _ in joined], mask, positions[:, -1:] + 1, cache,
                 out.logits[:, -1].float().argmax(-1).tolist(), [prompt for *_, prompt in joined])


DRAFT = 4  # most draft tokens a row feeds beside its next token
DRAFT_NGRAM = 3  # longest n-gram looked up (down to 1)


def _lookup(seq: list[int], most: int) -> list[int]:
    """Up to `most` tokens that followed the latest earlier occurrence of the last n tokens of
    `seq` (n = DRAFT_NGRAM down to 1): the guess of prompt-lookup decoding. Greedy text often
    repeats its prompt (entity names copied from the sentence, numbers from the question) or
    itself (a list that loops until the token limit)."""
    for n in range(DRAFT_NGRAM, 0, -1):
        if len(seq) <= n:
            continue
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start : start + n] == tail:
                return seq[start + n : start + n + most]
    return []


def _step(model, rows: _Rows, pad_id: int, device) -> list[list[int]]:
    """One forward pass: each row's latest token, then up to DRAFT guessed tokens (`_lookup`);
    each row's new greedy tokens.

    The model's greedy token after the latest token is always new; each guess that equals the
    model's greedy token at the position before it is accepted, and the model's token after the
    last accepted guess is new too. So a row gains 1 to DRAFT + 1 tokens per pass, and they are
    the tokens one-at-a-time greedy decoding gives: a guess is only ever checked, never kept
    unchecked. The keys and values of the rejected guesses stay in the cache as masked columns
    (holes, like padding) and positions skip them. A pass reads every weight once whatever its
    width, and decode passes of a small model on a CPU are bound by that read, so checking a few
    tokens costs far less than feeding them one per pass."""
    # Holes need every layer to hold all its columns: no guesses with sliding-window layers.
    draft = DRAFT if _mergeable(rows.cache) else 0
    guesses = [_lookup(prompt + gen, draft) if draft else []
               for prompt, gen in zip(rows.prompts, rows.generated, strict=True)]
    width = 1 + max(len(g) for g in guesses)
    ids = torch.tensor([[t, *g] + [pad_id] * (width - 1 - len(g))
                        for t, g in zip(rows.tokens, guesses, strict=True)], device=device)
    rows.make_room(width)
    before = rows.mask.shape[1]
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows.items), width))], dim=-1)
    positions = rows.positions + torch.arange(width, device=device)
    with grouped_queries(model, enabled=width > 1):
        out = model(input_ids=ids, attention_mask=rows.mask, position_ids=positions,
                    past_key_values=rows.cache, use_cache=True)
    greedy = out.logits.float().argmax(-1).tolist()
    new, accepted = [], []
    for g, best in zip(guesses, greedy, strict=True):
        n = 0
        while n < len(g) and g[n] == best[n]:
            n += 1
        new.append(best[: n + 1])
        accepted.append(n)
    if width > 1:  # the columns past each row's accepted guesses are holes
        taken = torch.tensor(accepted, device=device).unsqueeze(-1)
        columns = torch.arange(width, device=device)
        rows.mask[:, before:] = (columns <= taken).to(rows.mask.dtype)
    rows.positions = rows.positions + 1 + torch.tensor(accepted, device=device).unsqueeze(-1)
    rows.tokens = [n[-1] for n in new]
    return new


def _advance(rows: _Rows, rule: _Ending, new: list[list[int]]):
    """Adds each row's new tokens in order until it ends; yields the rows that ended and drops
    them from `rows`."""
    ended: set[int] = set()
    for j in range(max(len(n) for n in new)):
        on = [b for b, n in enumerate(new) if j < len(n) and b not in ended]
        ended.update(on[k] for k in rule.add([rows.generated[b] for b in on], [new[b][j] for b in on]))
    for b in sorted(ended):
        yield rows.items[b], rows.generated[b]
    if ended:
        keep = [b for b in range(len(rows.items)) if b not in ended]
        if keep:
            rows.keep(keep)
        else:
            rows.items = []

# --- extractors: the answer inside a generated (or reference) text ------------------------------


def _clean_number(s: str) -> str:
    return s.replace(",", "")


def extract(extractor: str, text: str) -> str:
    """`first_line`: the first non-blank line, stripped. `last_number`: the number after '####'
    when there is one (GSM8K's answer marker), else the last number in the text, commas removed.
    `function_body`: the text up to the first line that starts at column 0 (the body of the
    function the prompt opened ends there; HumanEval's stop sequences end it the same way), blank
    lines at its end dropped. `regex:<pattern>`: the first match's first non-empty group (or the
    whole match), stripped. An empty string when nothing is found."""
    if extractor == "first_line":
        return next((line.strip() for line in text.splitlines() if line.strip()), "")
    if extractor == "last_number":
        if "####" in text:
            m = NUMBER.search(text.split("####", 1)[1])
            if m:
                return _clean_number(m.group())
        found = NUMBER.findall(text)
        return _clean_number(found[-1]) if found else ""
    if extractor == "function_body":
        lines = text.split("\n")
        end = next((k for k, line in enumerate(lines) if k and line[:1] not in ("", " ", "\t")),
                   len(lines))
        return "\n".join(lines[:end]).rstrip() + "\n"
    if extractor.startswith("regex:"):
        m = re.search(extractor[len("regex:") :], text)
        if m is None:
            return ""
        groups = [g for g in m.groups() if g]
        return (groups[0] if groups else m.group(0)).strip()
    raise ValueError(f"unknown extractor '{extractor}'")
