"""The one log-likelihood scorer: log P(continuation | context) for many requests.

Nothing is encoded twice. The work is a three-level tree, each level one batched forward pass
that continues from the key/value cache of the level above:

1. **Shared prefix.** Contexts are sorted and cut into runs that share a long common prefix (the
   five demonstrations of an MMLU subject, a task's fixed instruction). A prefix is encoded once
   per run; a run grows while the tokens it saves, (contexts - 1) x prefix length, do not shrink.
2. **Context.** Each distinct context's remaining tokens, continuing from its prefix's cache row.
   The logits at its last position score every continuation's first token, so single-token
   labels (" A" .. " D", " positive") need nothing more. A context whose continuations all
   start the same way feeds that one continuation here too, as a plain forward pass would.
3. **Choices.** When a context has several multi-token continuations, its cache row is repeated
   once per distinct continuation and they run as one batch (only their own few tokens).

Every level left-pads its new tokens. A row is then [prefix, padding, new tokens], so the 2-D
attention mask has holes: the model builds its causal mask from it, and explicit position ids
count only real tokens, so padding and cache boundaries change nothing (tests compare against a
plain unpadded forward pass, within 1e-4 nats in fp32). Rows are sorted by length so padding stays
small, and the vocabulary projection runs only at the positions a request reads (`logits_to_keep`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

# A prefix shorter than this is not split off: a separate pass and a cache copy per batch cost
# more than a few tokens saved.
MIN_PREFIX = 8

Tokens = tuple[int, ...]


@dataclass
class _Context:
    ids: Tokens
    requests: list[int] = field(default_factory=list)
    prefix: int = 0  # tokens shared with the other contexts of its run (cached once)
    tail: Tokens = ()  # continuation tokens fed in the context pass (all choices begin with them)
    choices: list[Tokens] = field(default_factory=list)  # distinct inputs for the choice pass

    @property
    def suffix(self) -> Tokens:
        return self.ids[self.prefix :] + self.tail


def left_pad(seqs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists left-padded to the longest, and the mask of their real tokens (the scorer's and
    the generator's one batch layout)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _plan(requests) -> list[_Context]:
    by_ctx: dict[Tokens, _Context] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("empty continuation")
        if not ctx:
            raise ValueError("empty context: give at least one token (e.g. BOS/EOS)")
        key = tuple(ctx)
        by_ctx.setdefault(key, _Context(key)).requests.append(i)
    for c in by_ctx.values():
        inputs = sorted({tuple(requests[i][1][:-1]) for i in c.requests}, key=len, reverse=True)
        # One longest input that all others begin with: no choice pass is needed.
        if all(x == inputs[0][: len(x)] for x in inputs):
            c.tail = inputs[0]
        else:
            c.choices = [x for x in inputs if x]
    return list(by_ctx.values())


def _lcp(a: Tokens, b: Tokens) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _runs(contexts: list[_Context]) -> list[list[_Context]]:
    """Sorted contexts cut into runs sharing a prefix of at least MIN_PREFIX tokens (or runs of
    one, without a prefix); sets each context's `prefix` length. A prefix always leaves at least
    one token of every context to the context pass."""
    contexts = sorted(contexts, key=lambda c: c.ids)
    runs: list[list[_Context]] = []
    i = 0
    while i < len(contexts):
        shared, j = len(contexts[i].ids) - 1, i + 1
        while j < len(contexts):
            nxt = min(shared, _lcp(contexts[j - 1].ids, contexts[j].ids), len(contexts[j].ids) - 1)
            if nxt < MIN_PREFIX or (j - i) * nxt < (j - i - 1) * shared:
                break
            shared, j = nxt, j + 1
        run = contexts[i:j]
        if len(run) > 1:
            for c in run:
                c.prefix = shared
        runs.append(run)
        i = j
    return runs


def _chunks(runs: list[list[_Context]], batch_size: int) -> list[list[list[_Context]]]:
    """Runs grouped so that a chunk's contexts fill at least one batch (small runs share a chunk;
    their prefixes are encoded together). Contexts without a prefix form chunks of their own."""
    plain = [c for r in runs for c in r if not c.prefix]
    chunks, current, size = [], [], 0
    for run in (r for r in runs if r[0].prefix):
        current.append(run)
        size += len(run)
        if size >= batch_size:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks + ([[plain]] if plain else [])


def prefix_chunks(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """`seqs` grouped as the scorer groups its contexts, for another user of the same plan
    (generation): chunks of runs, each run (shared prefix length, indices into `seqs`). A run
    without a prefix has length 0 (all such sequences form one run in the last chunk)."""
    contexts = [_Context(tuple(s)) for s in seqs]
    index = {id(c): k for k, c in enumerate(contexts)}
    return [[(run[0].prefix, [index[id(c)] for c in run]) for run in chunk]
            for chunk in _chunks(_runs(contexts), batch_size)]


def encode_prefixes(model, prefixes: list[Tokens], pad_id: int, bf16: bool = False) -> CacheRows:
    """One left-padded pass over `prefixes`: their cache rows, to continue from with `select`."""
    _, rows = _forward(model, prefixes, pad_id, 1, None, True, bf16)
    return rows  # type: ignore[return-value]


class CacheRows:
    """A batch's cache with its 2-D padding mask and the number of real tokens per row."""

    def __init__(self, cache, mask: torch.Tensor, lengths: torch.Tensor):
        self.cache, self.mask, self.lengths = cache, mask, lengths

    def select(self, idx: list[int]) -> CacheRows:
        """The rows `idx` (repeats allowed) as a new cache; the original stays as it was."""
        if all(i == idx[0] for i in idx):
            # One parent row for the whole batch (a subject's demonstrations): a broadcast view,
            # which the next pass's concatenation materialises once.
            def pick(t):
                return t[idx[0] : idx[0] + 1].expand(len(idx), *t.shape[1:])
        else:
            where = torch.tensor(idx, device=self.mask.device)

            def pick(t):
                return t.index_select(0, where.to(t.device))
        out = DynamicCache()
        layers = []
        for layer in self.cache.layers:
            new = copy.copy(layer)
            if getattr(layer, "keys", None) is not None:
                new.keys, new.values = pick(layer.keys), pick(layer.values)
            layers.append(new)
        out.layers = layers
        return CacheRows(out, pick(self.mask), pick(self.lengths))


def _forward(model, seqs: list[Tokens], pad_id: int, keep: int, past: CacheRows | None, want_cache: bool,
             bf16: bool) -> tuple[torch.Tensor, CacheRows | None]:
    """One pass over `seqs` (left-padded), each continuing its row of `past`. Returns the
    log-probabilities at the last `keep` positions [rows, keep, vocab] (float32, on CPU) and,
    if asked, the rows' cache."""
    device = next(model.parameters()).device
    ids, mask = left_pad(seqs, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask, lengths = mask, mask.sum(-1)
    if past is not None:
        positions = positions + past.lengths.unsqueeze(-1)
        full_mask = torch.cat([past.mask, mask], dim=-1)
        lengths = lengths + past.lengths
    cache = past.cache if past is not None else (DynamicCache() if want_cache else None)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                    use_cache=cache is not None, logits_to_keep=keep)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1).cpu()
    return logprobs, (CacheRows(cache, full_mask, lengths) if want_cache else None)


def _sum_at(logprobs: torch.Tensor, row: int, start: int, tokens: Sequence[int]) -> float:
    """Sum of log P(tokens[j]) read at kept positions start + j of `row`."""
    if not tokens:
        return 0.0
    picked = logprobs[row, start : start + len(tokens)].gather(-1, torch.tensor(tokens).unsqueeze(-1))
    return float(picked.sum())


def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
    bf16: bool = False,
    desc: str = "scoring",
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (both token ids).
    `batch_size` is the number of rows in every forward pass, at every level."""
    contexts = _plan(requests)
    out = [0.0] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True, leave=False)
    for chunk in _chunks(_runs(contexts), batch_size):
        prefixes, parent = None, {}  # parent: id(context) -> its prefix's cache row
        if chunk[0][0].prefix:
            # A chunk holds at most batch_size runs (each of two or more contexts): one pass.
            seqs = [run[0].ids[: run[0].prefix] for run in chunk]
            parent = {id(c): row for row, run in enumerate(chunk) for c in run}
            _, prefixes = _forward(model, seqs, pad_id, 1, None, True, bf16)
        members = sorted((c for run in chunk for c in run), key=lambda c: len(c.suffix), reverse=True)
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            past = prefixes.select([parent[id(c)] for c in batch]) if prefixes is not None else None
            keep = max(len(c.tail) for c in batch) + 1
            need_cache = any(c.choices for c in batch)
            logprobs, rows = _forward(model, [c.suffix for c in batch], pad_id, keep, past, need_cache, bf16)
            choice_reqs = []
            for row, c in enumerate(batch):
                first = keep - len(c.tail) - 1  # kept position of the context's last token
                for i in c.requests:
                    cont = tuple(requests[i][1])
                    if c.choices and len(cont) > 1:
                        out[i] = _sum_at(logprobs, row, first, cont[:1])
                        choice_reqs.append((row, i, cont))
                    else:
                        out[i] = _sum_at(logprobs, row, first, cont)
                        bar.update(1)
            if choice_reqs:
                _score_choices(model, rows, choice_reqs, out, pad_id, batch_size, bf16, bar)
    bar.close()
    return out


def _score_choices(model, rows: CacheRows, choice_reqs, out: list[float], pad_id: int, batch_size: int,
                   bf16: bool, bar) -> None:
    """Second and later tokens of multi-token continuations: each distinct (context row, input)
    continues from the context's cache row; `out` already holds each first token's log-prob."""
    by_input: dict[tuple[int, Tokens], list[tuple[int, Tokens]]] = defaultdict(list)
    for row, i, cont in choice_reqs:
        by_input[(row, cont[:-1])].append((i, cont))
    keys = sorted(by_input, key=lambda k: len(k[1]), reverse=True)
    for start in range(0, len(keys), batch_size):
        batch = keys[start : start + batch_size]
        keep = max(len(x) for _, x in batch)
        logprobs, _ = _forward(model, [x for _, x in batch], pad_id, keep, rows.select([r for r, _ in batch]),
                               False, bf16)
        for b, key in enumerate(batch):
            for i, cont in by_input[key]:
                out[i] += _sum_at(logprobs, b, keep - len(key[1]), cont[1:])
                bar.update(1)
