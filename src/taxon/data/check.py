"""`taxon data check`: load what a card names from the current source and see that it holds up.

For each card and each config the source has (the mirror's folders, or every config when rows come
from the Hub), every split is loaded the way training and evaluation load it and checked: the
card's declared fields are columns, labels are in range, every template renders on every row
checked (the first `limit` rows of a split), texts and prompts are not empty, completions are not
empty outside the splits whose answers the Hub hides. Rows of each split whose rendered text also
occurs in the train split are counted (a leak between train and test shows up there).

A card whose dataset is neither in the mirror nor on a reachable Hub is "not available here",
which is a failure only when the card was named explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
from rich.table import Table

from taxon import hub
from taxon.data import render
from taxon.data.cards import Card, all_cards, get_card
from taxon.data.sources import _load_hub_split, has_label, load_rows, mirror_file
from taxon.errors import TaxonError
from taxon.settings import data_dir

LIMIT = 2000  # rows per split on which every template is rendered
OVERLAP_LIMIT = 200_000  # rows per split whose text is compared with train


@dataclass
class SplitCheck:
    config: str
    split: str
    rows: int | None = None  # None: the split is not in the source
    checked: int = 0
    in_train: int | None = None  # rows whose rendered text also occurs in the train split
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class CardCheck:
    card: Card
    source: str = ""  # "mirror", "hub", or "" when neither has the dataset
    named: bool = False  # named on the command line: unavailability is then a failure
    splits: list[SplitCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # about the card, not one split
    notes: list[str] = field(default_factory=list)

    def all_problems(self) -> list[str]:
        out = list(self.problems)
        for s in self.splits:
            out += [f"{s.config}/{s.split}: {p}" for p in s.problems]
        return out

    @property
    def failed(self) -> bool:
        return bool(self.all_problems())

    @property
    def status(self) -> str:
        if not self.source and not self.problems:
            return "not available here"
        return "FAILED" if self.failed else "ok"

    def line(self) -> str:
        """One line for a failing card: what failed first and how much more there is."""
        problems = self.all_problems()
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{self.card.id}: {problems[0]}{more}"


def _mirror_configs(card: Card) -> list[str]:
    root = data_dir()
    folder = root / card.id if root else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and (any(p.glob("*.jsonl")) or any(p.glob("*.parquet"))))


def _hub_split(card: Card, config: str, split: str, limit: int) -> datasets.Dataset:
    """The first `limit` rows of a Hub split, streamed (corpora are far too big to download)."""
    hub_config = None if config == "default" else config
    stream = datasets.load_dataset(card.id, hub_config, split=split, streaming=True)
    rows = list(stream.take(limit))
    if card.label_field:
        rows = [r for r in rows if card.label_field not in r or has_label(card, r)]
    return datasets.Dataset.from_list(rows)


def _render_all(card: Card, template: str, rows: list[dict]) -> tuple[list[str | None], list[str]]:
    """Each row rendered (None where it failed), and the distinct error messages."""
    out: list[str | None] = []
    errors: list[str] = []
    for row in rows:
        try:
            out.append(render.render(card, template, row))
        except Exception as e:  # a template bug or a row that does not fit: report, go on
            out.append(None)
            msg = str(e) if isinstance(e, TaxonError) else f"{type(e).__name__}: {e}"
            if msg not in errors:
                errors.append(msg)
    return out, errors


def _check_rows(card: Card, split: str, rows: datasets.Dataset, limit: int, result: SplitCheck,
                ) -> list[str | None]:
    """Validate one split's rows into `result`; return the rendered texts (for the overlap)."""
    declared = {*card.fields, card.label_field}
    if card.carve:
        declared |= {card.carve.key, card.carve.stratify}
    missing = sorted(declared - {None} - set(rows.column_names))
    if missing:
        result.problems.append(f"missing column(s) {', '.join(missing)} "
                               f"(columns are: {', '.join(rows.column_names)})")
        return []
    n = len(rows)
    result.checked = min(n, limit)
    all_rows = rows.select(range(min(n, max(limit, OVERLAP_LIMIT)))).to_list()
    sample = all_rows[:limit]
    if card.label_field and card.labels:
        n_labels = len(card.labels)
        values = (r[card.label_field] for r in sample)
        bad = [v for v in values if not (isinstance(v, int) and 0 <= v < n_labels)]
        if bad:
            result.problems.append(f"{len(bad)} label(s) outside 0..{n_labels - 1}, "
                                   f"e.g. {bad[0]!r}")
    texts, errors = _render_all(card, card.templates.text, all_rows)
    for msg in errors[:3]:
        result.problems.append(f"template 'text' fails: {msg}")
    empty = sum(1 for t in texts if t is not None and not t.strip())
    if empty:
        if card.kind != "corpus" or empty == len(texts):
            result.problems.append(f"{empty} row(s) render an empty text")
        else:
            result.notes.append(f"{empty} empty text(s) (skipped in training)")
    for name in ("prompt", "completion"):
        template = getattr(card.templates, name)
        if template is None:
            continue
        out, errors = _render_all(card, template, sample)
        for msg in errors[:3]:
            result.problems.append(f"template '{name}' fails: {msg}")
        empty = sum(1 for t in out if t is not None and not t.strip())
        if empty and not (name == "completion" and split in card.unlabelled_splits):
            result.problems.append(f"{empty} row(s) render an empty {name}")
    return texts


def _note_left_out(card: Card, config: str, split: str, kept: int, result: SplitCheck) -> None:
    """Say how many mirror rows loading left out (hidden labels, blank `skip_empty` columns)."""
    dropped = len(_load_hub_split(card, config, split)) - kept
    if not dropped:
        return
    why = " or ".join((["without a label"] if card.label_field else [])
                      + ([f"with an empty {'/'.join(card.skip_empty)}"] if card.skip_empty else []))
    if kept:
        result.notes.append(f"{dropped:,} rows {why} left out")
    else:
        hidden = " (the Hub hides them)" if split in card.unlabelled_splits else ""
        result.notes.append(f"all {dropped:,} rows are {why}{hidden}")


def _train_split(card: Card) -> str | None:
    if card.carve:
        return card.carve.train
    return "train" if "train" in card.splits else None


def _check_config(card: Card, config: str, source: str, limit: int) -> list[SplitCheck]:
    card = card.for_config(config)
    out: list[SplitCheck] = []
    texts: dict[str, list[str | None]] = {}
    for split in card.available_splits():
        result = SplitCheck(config, split)
        out.append(result)
        carved = card.carve is not None and split in (card.carve.train, card.carve.test)
        hub_split = card.carve.source if carved else split
        try:
            if source == "mirror":
                if mirror_file(card, config, hub_split) is None:
                    result.notes.append("not in the mirror")
                    continue
                rows = load_rows(card.id, config, split)
                if (card.label_field or card.skip_empty) and not carved:
                    _note_left_out(card, config, split, len(rows), result)
            else:
                if carved:  # streamed Hub rows cannot be carved; check the split it is cut from
                    if split == card.carve.test:
                        out.pop()
                        continue
                    result.split = hub_split
                rows = _hub_split(card, config, hub_split, limit)
        except Exception as e:  # missing file, bad JSON, a type the loader cannot cast
            result.problems.append(f"cannot load: {e}")
            continue
        result.rows = len(rows)
        if not len(rows):
            if split not in card.unlabelled_splits:
                result.problems.append("no rows")
            continue
        texts[split] = _check_rows(card, split, rows, limit, result)
    train = _train_split(card)
    if train in texts:
        seen = {t for t in texts[train] if t and t.strip()}
        for result in out:
            if result.split != train and result.split in texts:
                result.in_train = sum(1 for t in texts[result.split] if t and t.strip() and t in seen)
    if source == "mirror":
        folder = data_dir() / card.id / config  # type: ignore[operator]
        known = set(card.splits)
        extra = sorted(p.stem for p in folder.iterdir() if p.suffix in (".jsonl", ".parquet")
                       and p.stem not in known)
        if extra and out:
            out[0].notes.append(f"mirror files the card does not name: {', '.join(extra)}")
    return out


def check_card(card: Card, config: str | None = None, limit: int = LIMIT,
               named: bool = False) -> CardCheck:
    result = CardCheck(card, named=named)
    for c in dict.fromkeys([card.config, *card.overrides]):
        templates = card.for_config(c).templates
        for name in ("text", "prompt", "completion"):
            source = getattr(templates, name)
            try:
                if source is not None:
                    render.compile_template(source)
            except Exception as e:
                result.problems.append(f"{c}: template '{name}' does not parse: {e}")
    if result.problems:
        return result
    wanted = [card.resolve_config(config)] if config else list(card.configs)
    here = _mirror_configs(card)
    if here:
        result.source = "mirror"
        extra = sorted(set(here) - set(card.configs))
        if extra:
            result.notes.append(f"mirror has configs the card does not list: {', '.join(extra)}")
        configs = [c for c in wanted if c in here]
        if not configs and named:
            what = f"config {config} is not" if config else "none of the card's configs is"
            result.problems.append(f"{what} in the mirror (it has: {', '.join(here)})")
    elif hub.reachable():
        result.source = "hub"
        result.notes.append(f"streamed from the Hub: the first {limit:,} rows of each split")
        configs = wanted
    else:
        if named:
            where = f"the mirror {data_dir()}" if data_dir() else "no mirror is set (TAXON_DATA_DIR)"
            result.problems.append(f"not available here: not in {where}, and the Hub is not "
                                   "reachable")
        return result
    for c in configs:
        result.splits += _check_config(card, c, result.source, limit)
    return result


def run(names: list[str], config: str | None = None, limit: int = LIMIT) -> list[CardCheck]:
    """Check the named cards (ids or aliases), or every card when none is named."""
    if names:
        cards = []
        for n in names:
            card = get_card(n)
            if card not in cards:
                cards.append(card)
        return [check_card(c, config, limit, named=True) for c in cards]
    cards = all_cards()
    if config:
        cards = [c for c in cards if config in c.configs]
        if not cards:
            raise TaxonError(f"no dataset card has a config '{config}'; see `taxon data list`")
    return [check_card(c, config, limit) for c in cards]


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def table(results: list[CardCheck]) -> Table:
    """One row per card and config: rows per split (and how many also occur in train)."""
    t = Table("dataset", "config", "source", "rows per split (in train)", "status")
    for r in results:
        if not r.splits:
            t.add_row(r.card.id, "", r.source or "-", "", r.status)
            continue
        configs = list(dict.fromkeys(s.config for s in r.splits))
        for c in configs:
            parts = []
            bad = False
            for s in (s for s in r.splits if s.config == c):
                count = "not here" if s.rows is None else _fmt(s.rows)
                if s.in_train:
                    count += f" ({s.in_train:,} in train)"
                parts.append(f"{s.split} {count}")
                bad = bad or bool(s.problems)
            status = "FAILED" if bad or r.problems else "ok"
            t.add_row(r.card.id, c, r.source, ", ".join(parts), status)
    return t


def report_lines(results: list[CardCheck]) -> list[str]:
    """Problems and notes, one per line, for after the table."""
    lines = []
    for r in results:
        for p in r.all_problems():
            lines.append(f"[red]problem[/red] {r.card.id}: {p}")
        notes = list(r.notes) + [f"{s.config}/{s.split}: {n}" for s in r.splits for n in s.notes]
        for n in notes:
            lines.append(f"[dim]note[/dim] {r.card.id}: {n}")
    return lines

