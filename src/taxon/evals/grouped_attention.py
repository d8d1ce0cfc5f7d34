"""Attention for a decode pass of several tokens per row, without repeating keys and values.

With grouped-query attention (smollm2, Qwen2: fewer key/value heads than query heads) and a mask,
transformers' SDPA path copies every key/value head once per query head it serves (`repeat_kv`)
when a pass has more than one query token: the whole cache, three times over for smollm2-135m, on
every layer of every pass. For one query token it instead groups the query heads under their
key/value head. This does the same for any number of query tokens: the query heads that share a
key/value head become rows of one attention over it, with the mask repeated per head (masks are
small; caches are not). Used by the decode loop's passes that check guessed tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "taxon_grouped_sdpa"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    if rep == 1 or q_len == 1 or attention_mask is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    q = query.reshape(rows, kv_heads, rep * q_len, dim)  # head h reads key/value head h // rep
    mask = attention_mask.expand(rows, 1, q_len, -1).repeat(1, 1, rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(rows, heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def grouped_queries(model, enabled: bool = True):
    """The model's SDPA attention set to this module's for the block (and set back after); a
    model on another attention implementation is left as it is."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before != "sdpa":
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
