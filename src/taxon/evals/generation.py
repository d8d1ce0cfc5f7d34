"""The one generation path: batched greedy decoding, cut at stop strings; and answer extractors.

Prompts are tokenised as the scorer tokenises contexts (no special tokens added: a chat template
already holds them) and grouped as the scorer groups contexts (`scoring.prefix_chunks`): prompts
that share a long prefix (few-shot demonstrations, a task's fixed instruction) have it encoded
once, in one pass, and every batch continues from that prefix's cache rows, so only each prompt's
own tokens are encoded. Within a group, prompts are sorted by what remains (longest first) and
left-padded, with an attention mask that hides the padding (a row is [padding, prefix, padding,
own tokens]); position ids come from that mask, so a prompt decodes the same alone, in a batch,
or after a shared prefix (tests compare the three). Decoding is taxon's own greedy loop, not
`model.generate`: one pass encodes a batch's own tokens, then each step feeds one token per live
row. A row ends at EOS, at `max_new_tokens`, or once its generated text holds a stop string (only
the last few tokens, enough to hold the longest stop string, are decoded to check), and leaves the
batch there: its cache rows are dropped, so later steps cost only what the rows still generating
cost. The decoded text is then cut at the first stop string. A prompt longer than the model's
context minus `max_new_tokens` loses its oldest tokens (few-shot demonstrations first), as
lm-evaluation-harness does, before prefixes are looked for; `Generation.truncated` says when.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

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
    eos_ids = _eos_ids(model, tokenizer)
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
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            past = prefixes.select([parent[i] for i in batch]) if prefixes is not None else None
            rows = [encoded[i][shared[i] :] for i in batch]  # the prefix's part is in `past`
            for i, generated in zip(batch, _decode(model, tokenizer, rows, past, pad_id, eos_ids,
                                                   max_new_tokens, stop, bf16), strict=True):
                text = tokenizer.decode(generated, skip_special_tokens=True)
                out[i] = Generation(cut_at_stop(text, stop), len(encoded[i]), len(generated), truncated[i])
            bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def _stop_window(stop: Sequence[str]) -> int:
    """How many trailing tokens can hold any stop string: every token that shares in a stop string
    adds at least one of its bytes (a character split over byte tokens included), and the margin
    keeps a token whose decoded form depends on the one before it (a leading space) off the edge."""
    return max((len(s.encode()) for s in stop), default=0) + 4


def _decode(model, tokenizer, rows: list[list[int]], past: CacheRows | None,
            pad_id: int, eos_ids: list[int], max_new_tokens: int, stop: Sequence[str],
            bf16: bool) -> list[list[int]]:
    """The generated tokens of each row (its tokens after `past`'s prefix), up to its end: EOS (not
    included), the token that completes a stop string (included) or `max_new_tokens`.

    A row is laid out as [padding, prefix, padding, new tokens]: the prefix part is `past`'s own
    padded layout (its keys and values are already in the cache), the new tokens are left-padded
    to the batch's longest and encoded in one pass that keeps only the last position's logits.
    Position ids come from the mask (its running count of real tokens, as `model.generate` derives
    them), so every real token keeps the position it has alone. Each step then feeds one greedy
    token per live row; a row that ends leaves the batch (its inputs, mask, positions and cache
    rows are dropped), since a decode step's cost grows with its rows and a finished row would
    otherwise be carried to the batch's last."""
    if max_new_tokens <= 0:
        return [[] for _ in rows]
    device = next(model.parameters()).device
    ids, mask = left_pad(rows, pad_id, device)
    width = ids.shape[1]
    cache = None  # without a prefix the model makes its own (a config-aware DynamicCache)
    if past is not None:
        mask, cache = torch.cat([past.mask, mask], dim=-1), past.cache
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -width:]
    stop = [s for s in stop if s]
    window, eos = _stop_window(stop), set(eos_ids)
    generated: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))  # the original row of each row of the shrinking batch
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, step_pos = out.past_key_values, positions[:, -1:] + 1  # the last column is real
        while True:
            tokens = out.logits[:, -1].float().argmax(-1).tolist()
            ended, growing = set(), []
            for b, (row, token) in enumerate(zip(live, tokens, strict=True)):
                if token in eos:
                    ended.add(b)
                    continue
                generated[row].append(token)
                if len(generated[row]) >= max_new_tokens:
                    ended.add(b)
                elif stop:
                    growing.append(b)
            if growing:  # only the tail that can hold a stop string, not the whole text each step
                texts = tokenizer.batch_decode([generated[live[b]][-window:] for b in growing],
                                               skip_special_tokens=True)
                ended.update(b for b, t in zip(growing, texts, strict=True) if any(s in t for s in stop))
            keep = [b for b in range(len(live)) if b not in ended]
            if not keep:
                break
            if ended:
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                mask, step_pos = mask.index_select(0, idx), step_pos.index_select(0, idx)
                live, tokens = [live[b] for b in keep], [tokens[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
            out = model(input_ids=torch.tensor(tokens, device=device).unsqueeze(-1), attention_mask=mask,
                        position_ids=step_pos, past_key_values=cache, use_cache=True)
            step_pos = step_pos + 1
    return generated

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
