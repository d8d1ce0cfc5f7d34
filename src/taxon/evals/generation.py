"""The one generation path: batched greedy decoding, cut at stop strings; and answer extractors.

Prompts are tokenised as the scorer tokenises contexts (no special tokens added: a chat template
already holds them), sorted by length (longest first) and left-padded, with an attention mask
that hides the padding; `generate` derives position ids from that mask, so a prompt decodes the
same alone or in a batch. A row stops at EOS, at `max_new_tokens`, or once its generated text
holds a stop string; the decoded text is then cut at the first stop string. A prompt longer than
the model's context minus `max_new_tokens` loses its oldest tokens (few-shot demonstrations
first), as lm-evaluation-harness does; `Generation.truncated` says when.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from taxon.evals.metrics import NUMBER


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
    batch_size: int = 16, bf16: bool = False, desc: str = "generating",
) -> list[Generation]:
    """Greedy continuations of `prompts`, in order."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    budget = prompt_budget(model, max_new_tokens)
    truncated = [budget is not None and len(ids) > budget for ids in encoded]
    encoded = [ids[-budget:] if cut else ids for ids, cut in zip(encoded, truncated, strict=True)]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("empty prompt: give at least one token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    out: list[Generation | None] = [None] * len(encoded)
    bar = tqdm(total=len(order), desc=desc, unit="seq", dynamic_ncols=True, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(encoded[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, width)] if stop else [])
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            seqs = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad_id, eos_token_id=eos_ids, stopping_criteria=criteria,
            )
        for i, generated in zip(batch, seqs[:, width:].tolist(), strict=True):
            # Up to the first EOS: what follows it is padding of a row that finished early.
            end = next((k for k, t in enumerate(generated) if t in eos_ids), len(generated))
            text = tokenizer.decode(generated[:end], skip_special_tokens=True)
            out[i] = Generation(cut_at_stop(text, stop), len(encoded[i]), end, truncated[i])
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


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
