"""The one generation path: batched greedy decoding, cut at stop strings; and answer extractors.

Prompts are tokenised as the scorer tokenises contexts (no special tokens added: a chat template
already holds them) and grouped as the scorer groups contexts (`scoring.prefix_chunks`): prompts
that share a long prefix (few-shot demonstrations, a task's fixed instruction) have it encoded
once, in one pass, and every batch continues from that prefix's cache rows, so only each prompt's
own tokens are encoded. Within a group, prompts are sorted by what remains (longest first) and
left-padded, with an attention mask that hides the padding (a row is [padding, prefix, padding,
own tokens]); `generate` derives position ids from that mask, so a prompt decodes the same alone,
in a batch, or after a shared prefix (tests compare the three). A row stops at EOS, at
`max_new_tokens`, or once its generated text holds a stop string (a batch ends when all its rows
have); the decoded text is then cut at the first stop string. A prompt longer than the model's
context minus `max_new_tokens` loses its oldest tokens (few-shot demonstrations first), as
lm-evaluation-harness does, before prefixes are looked for; `Generation.truncated` says when.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from taxon.evals.metrics import NUMBER
from taxon.evals.scoring import CacheRows, encode_prefixes, prefix_chunks


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


class _StopStrings(StoppingCriteria):
    """Stop a row once the text it generated (after column `start`) contains a stop string.
    Only generated text is checked, never the prompt or a string spanning the boundary."""

    def __init__(self, tokenizer, stop: Sequence[str], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, [s for s in stop if s], start

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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
            rows = [(encoded[i][: shared[i]], encoded[i][shared[i] :]) for i in batch]
            for i, generated in zip(batch, _decode(model, tokenizer, rows, past, pad_id, eos_ids,
                                                   max_new_tokens, stop, bf16), strict=True):
                # Up to the first EOS: what follows it is padding of a row that finished early.
                end = next((k for k, t in enumerate(generated) if t in eos_ids), len(generated))
                text = tokenizer.decode(generated[:end], skip_special_tokens=True)
                out[i] = Generation(cut_at_stop(text, stop), len(encoded[i]), end, truncated[i])
            bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def _decode(model, tokenizer, rows: list[tuple[list[int], list[int]]], past: CacheRows | None,
            pad_id: int, eos_ids: list[int], max_new_tokens: int, stop: Sequence[str],
            bf16: bool) -> list[list[int]]:
    """The generated tokens of each (cached prefix, new tokens) row. A row is laid out as
    [padding, prefix, padding, new tokens]: the prefix part is `past`'s own padded layout (its
    keys and values are already in the cache, so `generate` feeds only what follows), the new
    tokens are left-padded to the batch's longest. `generate` derives position ids from the mask
    (its running count of real tokens), so every real token keeps the position it has alone."""
    device = next(model.parameters()).device
    width = max(len(new) for _, new in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (_, new) in enumerate(rows):
        ids[row, width - len(new) :] = torch.tensor(new)
        mask[row, width - len(new) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = None
    if past is not None:
        # The prefix's own tokens in front (as `past.mask` lays them out), so input_ids hold
        # the whole prompt for anything that reads them (logits processors, stop criteria).
        head = torch.full(past.mask.shape, pad_id, dtype=torch.long, device=device)
        for row, (prefix, _) in enumerate(rows):
            head[row, head.shape[1] - len(prefix) :] = torch.tensor(prefix)
        ids, mask, cache = torch.cat([head, ids], dim=-1), torch.cat([past.mask, mask], dim=-1), past.cache
    start = ids.shape[1]
    criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, start)] if stop else [])
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        seqs = model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=cache,
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=pad_id, eos_token_id=eos_ids, stopping_criteria=criteria,
        )
    return seqs[:, start:].tolist()


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
