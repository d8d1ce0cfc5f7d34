"""The one log-likelihood scorer: log P(continuation | context) for many requests.

Requests whose model input is identical share one forward pass: the choices of a multiple-choice
item whose labels are single tokens all read the logits after the same context. Inputs are sorted
by length (longest first) and left-padded with correct position ids, and the vocabulary projection
runs only at continuation positions (`logits_to_keep`), so padding changes nothing and the large
`lm_head` costs a few positions per row instead of all of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
    bf16: bool = False,
    desc: str = "scoring",
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (both token ids)."""
    by_input: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("empty continuation")
        if not ctx:
            raise ValueError("empty context: give at least one token (e.g. BOS/EOS)")
        by_input[tuple(ctx) + tuple(cont[:-1])].append(i)
    inputs = sorted(by_input, key=len, reverse=True)
    out = [0.0] * len(requests)
    device = next(model.parameters()).device
    bar = tqdm(total=len(inputs), desc=desc, unit="seq", dynamic_ncols=True, leave=False)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        width = len(batch[0])
        keep = max(len(requests[i][1]) for key in batch for i in by_input[key])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, key in enumerate(batch):
            ids[row, width - len(key) :] = torch.tensor(key)
            mask[row, width - len(key) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), logits_to_keep=keep, use_cache=False,
            ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, key in enumerate(batch):
            for i in by_input[key]:
                cont = requests[i][1]
                n = len(cont)
                # The last n kept positions predict the n continuation tokens.
                rows = logprobs[row, keep - n :, :]
                out[i] = float(rows.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum())
        bar.update(len(batch))
    bar.close()
    return out
