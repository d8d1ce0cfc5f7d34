"""Where rows come from: the Hugging Face Hub, or a local mirror laid out like the Hub.

Mirror layout: `<mirror>/<org>/<name>/<config>/<split>.jsonl` (or `.parquet`), with the Hub's own
column names and label encodings, so both sources give identical rows.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import datasets

from taxon import hub
from taxon.data.cards import Card, get_card
from taxon.errors import TaxonError
from taxon.settings import DATA_DIR_ENV, data_dir

datasets.disable_progress_bars()


def corpus_files(card: Card, split: str) -> list[Path]:
    """The shards of one split of a corpus folder (`taxon corpus build`)."""
    return sorted((Path(card.root) / split).glob("shard-*.jsonl")) if card.root else []


def mirror_file(card: Card, config: str, split: str) -> Path | None:
    if card.root:  # a corpus folder: its first shard says the split is there
        shards = corpus_files(card, split)
        return shards[0] if shards else None
    root = data_dir()
    if root is None:
        return None
    for ext in ("jsonl", "parquet"):
        path = root / card.id / config / f"{split}.{ext}"
        if path.is_file():
            return path
    return None


def where(card: Card, config: str | None = None, split: str | None = None) -> str:
    """Where a split would load from now (for `taxon data list`)."""
    card = card.for_config(config)
    config = card.config
    split = split or card.available_splits()[0]
    hub_split = card.source_split(split)
    path = mirror_file(card, config, hub_split)
    return f"mirror: {path}" if path else f"hub: {card.id} ({config})"


def _load_hub_split(card: Card, config: str, split: str) -> datasets.Dataset:
    if card.root:
        shards = corpus_files(card, split)
        if not shards:
            raise TaxonError(f"corpus {card.root} has no {split} shards; rebuild it with "
                             "`taxon corpus build`")
        return datasets.load_dataset("json", data_files={split: [str(p) for p in shards]}, split=split)
    path = mirror_file(card, config, split)
    if path is not None:
        kind = "json" if path.suffix == ".jsonl" else "parquet"
        return datasets.load_dataset(kind, data_files={split: str(path)}, split=split)
    hub_config = None if config == "default" else config
    try:
        if not hub.reachable():
            raise ConnectionError("Hub unreachable")
        return datasets.load_dataset(card.id, hub_config, split=split)
    except Exception as e:  # the Hub raises many types: offline, missing, gated
        mirror = data_dir()
        hint = (
            f"the mirror {mirror} has no {card.id}/{config}/{split}.jsonl"
            if mirror
            else f"no mirror is set ({DATA_DIR_ENV} or --data-dir)"
        )
        raise TaxonError(
            f"cannot load dataset '{card.id}' config '{config}' split '{split}': "
            f"{e if isinstance(e, ConnectionError) else type(e).__name__}; {hint}. "
            "Connect to the Hugging Face Hub, or set "
            f"{DATA_DIR_ENV} / --data-dir to a folder laid out <org>/<name>/<config>/<split>.jsonl"
        ) from e


def has_label(card: Card, row: dict) -> bool:
    """False for a row whose label the Hub hides (None, or -1 as in GLUE's test splits)."""
    value = row[card.label_field]
    return value is not None and not (isinstance(value, int) and value < 0)


def _test_keys(card: Card, config: str) -> set[str]:
    """The keys (texts) on the test side of a carved split; see `Carve`."""
    c = card.carve
    assert c is not None
    ref = _load_hub_split(card, c.reference_config or config, c.source)
    by_class: dict[object, set[str]] = defaultdict(set)
    for row in ref:
        by_class[row[c.stratify] if c.stratify else None].add(row[c.key])
    test: set[str] = set()
    for keys in by_class.values():
        ranked = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        test.update(ranked[: round(len(ranked) * c.test_fraction)])
    return test


def load_rows(
    dataset: str, config: str | None = None, split: str = "train", limit: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Rows of one split, Hub column names intact. `limit`: a seeded subsample of that size.
    Rows whose label is missing or negative (hidden test labels) are left out, and so are rows
    with an empty value in one of the card's `skip_empty` columns (blank rows some Hub sets have)."""
    card = get_card(dataset).for_config(config)
    config = card.config
    if split not in card.available_splits():
        raise TaxonError(
            f"dataset '{card.id}' has no split '{split}'; choose one of: "
            + ", ".join(card.available_splits())
        )
    if card.carve and split in (card.carve.train, card.carve.test):
        rows = _load_hub_split(card, config, card.carve.source)
        test = _test_keys(card, config)
        want_test = split == card.carve.test
        key = card.carve.key
        rows = rows.filter(lambda r: (r[key] in test) == want_test)
    else:
        rows = _load_hub_split(card, config, split)
    if card.label_field and card.label_field in rows.column_names:
        rows = rows.filter(lambda r: has_label(card, r))
    skip = [c for c in card.skip_empty if c in rows.column_names]
    if skip:
        rows = rows.filter(lambda r: all(r[c] not in (None, "", [], {}) and
                                         (not isinstance(r[c], str) or r[c].strip()) for c in skip))
    if limit is not None and limit < len(rows):
        rows = rows.shuffle(seed=seed).select(range(limit))
    return rows
