"""Dataset cards: YAML files that say where a dataset lives and how to render its rows.

Built-in cards live beside this file in `cards/`; a user's own folder (TAXON_CARDS_DIR or
--cards-dir) is read after them and may add or override cards. Adding a dataset is adding a file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from taxon.config import Spec, load_yaml, parse
from taxon.errors import TaxonError
from taxon.settings import cards_dir

BUILTIN_DIR = Path(__file__).with_name("cards")
Kind = Literal["corpus", "classification", "qa", "math", "code", "ner", "instruction"]


class Carve(Spec):
    """How to cut a test split from a Hub split when the Hub has no test split.

    A row's side is decided by the hash of its `key` field, so every copy of a text lands on the
    same side. With `stratify`, each class is split at `test_fraction` exactly: the keys of a class
    are ranked by hash and the lowest share goes to test. Ranking is done on `reference_config`
    (a config that contains all the others) so nested configs agree on every text's side.
    """

    source: str = "train"  # the Hub split carved up
    train: str = "train"  # the names the two sides get
    test: str = "test"
    test_fraction: float = Field(gt=0, lt=1)
    key: str
    stratify: str | None = None
    reference_config: str | None = None


class Templates(Spec):
    text: str  # the row as pretraining text
    prompt: str | None = None  # the row as an SFT prompt ...
    completion: str | None = None  # ... and its completion


class TemplateOverride(Spec):
    """Templates of one config; the ones not given are the card's own."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None


class Override(Spec):
    """What differs in one config (GLUE's tasks have their own columns and labels). A field that
    is given replaces the card's; `templates` replaces only the templates it names."""

    splits: tuple[str, ...] | None = None
    carve: Carve | None = None
    label_field: str | None = None
    labels: tuple[str, ...] | None = None
    fields: tuple[str, ...] | None = None
    unlabelled_splits: tuple[str, ...] | None = None
    skip_empty: tuple[str, ...] | None = None
    templates: TemplateOverride | None = None


class Card(Spec):
    id: str  # the Hub id
    aliases: tuple[str, ...] = ()
    kind: Kind
    description: str = ""
    license: str = ""
    configs: tuple[str, ...] = ("default",)
    default_config: str | None = None
    splits: tuple[str, ...] = ("train",)  # splits as they exist on the Hub
    carve: Carve | None = None
    label_field: str | None = None
    labels: tuple[str, ...] | None = None  # names of integer labels 0..n-1
    fields: tuple[str, ...] = ()  # columns every row has (Hub names); `taxon data check` checks them
    unlabelled_splits: tuple[str, ...] = ()  # splits whose answers the Hub hides (e.g. GLUE test)
    skip_empty: tuple[str, ...] = ()  # rows with any of these columns empty/null are left out
    templates: Templates
    overrides: dict[str, Override] = {}  # per-config differences; see `for_config`
    path: str = ""  # the file the card came from
    # A corpus folder written by `taxon corpus build`: its rows are the folder's
    # `<split>/shard-*.jsonl` files (set when the card is read from such a folder).
    root: str = ""
    _base: Card | None = PrivateAttr(default=None)  # set on the cards `for_config` returns

    @model_validator(mode="after")
    def _consistent(self) -> Card:
        if self.default_config is not None and self.default_config not in self.configs:
            raise ValueError(f"default_config '{self.default_config}' is not one of configs")
        if (self.labels is None) != (self.label_field is None):
            raise ValueError("labels and label_field go together")
        if self.carve and self.carve.source not in self.splits:
            raise ValueError(f"carve.source '{self.carve.source}' is not one of splits")
        for name in self.overrides:
            if name not in self.configs:
                raise ValueError(f"overrides names config '{name}', which is not one of configs")
            try:
                self.for_config(name)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                raise ValueError(f"overrides.{name}{'.' + where if where else ''}: {msg}") from None
        return self

    def for_config(self, config: str | None) -> Card:
        """The card as it applies to one config: its override (if any) applied, and that config
        as the default. `None` means the card's default config. The result has no overrides of
        its own; calling `for_config` on it again starts from the card it came from."""
        base = self._base or self
        config = base.resolve_config(config)
        over = base.overrides.get(config)
        if over is None and config == base.config:
            return base
        update: dict = {"default_config": config}
        if over is not None:
            update |= {k: getattr(over, k) for k in over.model_fields_set if k != "templates"}
            if over.templates is not None:
                given = over.templates.model_dump(exclude_unset=True)
                update["templates"] = {**base.templates.model_dump(), **given}
        card = Card.model_validate({**base.model_dump(), **update, "overrides": {}})
        card._base = base
        return card

    @property
    def config(self) -> str:
        return self.default_config or self.configs[0]

    def available_splits(self) -> list[str]:
        out = [s for s in self.splits if not (self.carve and s == self.carve.source)]
        if self.carve:
            out += [self.carve.train, self.carve.test]
        return out

    def source_split(self, split: str) -> str:
        """The split rows are read from: a carved train/test split comes from the carve's source."""
        return self.carve.source if self.carve and split in (self.carve.train, self.carve.test) else split

    def resolve_config(self, config: str | None) -> str:
        if config in (None, "None", ""):
            return self.config
        if config not in self.configs:
            raise TaxonError(
                f"dataset '{self.id}' has no config '{config}'; choose one of: "
                + ", ".join(self.configs)
            )
        return config


def _read_card(path: Path) -> Card:
    data = load_yaml(path)
    return parse(Card, {**data, "path": str(path)}, f"dataset card {path}")  # type: ignore[return-value]


def _card_files() -> list[Path]:
    files = sorted(BUILTIN_DIR.glob("*.yaml"))
    user = cards_dir()
    if user is not None:
        if not user.is_dir():
            raise TaxonError(f"cards folder {user} does not exist; fix TAXON_CARDS_DIR/--cards-dir")
        files += sorted(user.glob("*.yaml"))
    return files


@cache
def _registry(files: tuple[Path, ...]) -> dict[str, Card]:
    """Ids and aliases to cards. User cards come last and replace a built-in with the same id;
    the built-in's aliases then name the user's card."""
    by_id: dict[str, Card] = {}
    alias_of: dict[str, str] = {}
    for f in files:
        card = _read_card(f)
        by_id[card.id] = card
        for alias in card.aliases:
            alias_of[alias] = card.id
    return {**{a: by_id[i] for a, i in alias_of.items()}, **by_id}


def all_cards() -> list[Card]:
    seen: dict[str, Card] = {}
    for card in _registry(tuple(_card_files())).values():
        seen[card.id] = card
    return sorted(seen.values(), key=lambda c: c.id)


CORPUS_CARD = "card.yaml"


def corpus_folder(dataset: str) -> Path | None:
    """The folder `dataset` names when it is a corpus built by `taxon corpus build` (a path to a
    folder holding its card), else None."""
    path = Path(dataset).expanduser()
    if ("/" in dataset or dataset.startswith(".")) and (path / CORPUS_CARD).is_file():
        return path.resolve()
    return None


@cache
def _corpus_card(folder: Path, stamp: float) -> Card:
    data = load_yaml(folder / CORPUS_CARD)
    return parse(Card, {**data, "path": str(folder / CORPUS_CARD), "root": str(folder)},
                 f"corpus card {folder / CORPUS_CARD}")  # type: ignore[return-value]


def get_card(dataset: str) -> Card:
    folder = corpus_folder(dataset)
    if folder is not None:
        return _corpus_card(folder, (folder / CORPUS_CARD).stat().st_mtime)
    reg = _registry(tuple(_card_files()))
    if dataset not in reg:
        if "/" in dataset and (dataset.startswith((".", "/", "~")) or Path(dataset).exists()):
            raise TaxonError(f"no corpus at {dataset} (no {CORPUS_CARD} there); build it first "
                             f"with `taxon corpus build SOURCES --out {dataset}`")
        raise TaxonError(
            f"unknown dataset '{dataset}': run `taxon data list` for the known cards, "
            "or add a card for it to your cards folder (TAXON_CARDS_DIR)"
        )
    return reg[dataset]
