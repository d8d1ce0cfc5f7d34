"""Text sources of a corpus, each read into documents with its markup stripped.

A source is a folder (walked for `.txt`, `.md`, `.rst`, `.html`/`.htm` and manual pages, plain
or gzipped), a `.jsonl` file (one document per row, its `text` field), or `dataset:<card id>`
(`dataset:<id>:<config>:<split>`; rows rendered by the card's text template). Markup goes here:
HTML keeps its main content (navigation, headers, footers, sidebars, scripts dropped), manual
pages lose their roff requests and font escapes, Markdown its link and emphasis syntax.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from taxon.errors import TaxonError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm")
_MAN_SUFFIX = re.compile(r"\.[1-9][a-z0-9]*$")


@dataclass
class Doc:
    source: str  # the source as given
    name: str  # file (relative to the source folder) or row index
    text: str


@dataclass
class Source:
    spec: str  # as the user wrote it
    kind: str  # folder | jsonl | dataset
    limit: int | None = None  # at most this many documents (a seeded sample of the files)


def parse_source(spec: str) -> Source:
    """A source as written on the command line; a missing folder or file is one line."""
    if spec.startswith("dataset:"):
        return Source(spec, "dataset")
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, "folder")
    if path.is_file() and path.suffix == ".jsonl":
        return Source(spec, "jsonl")
    if path.exists():
        raise TaxonError(f"corpus source {spec} is neither a folder nor a .jsonl file; pass a "
                         "folder of .txt/.md/.html/man pages, a .jsonl file or dataset:<card id>")
    raise TaxonError(f"corpus source {spec} does not exist; check the path (or write "
                     "dataset:<card id> for a dataset card)")


def _is_man(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return bool(_MAN_SUFFIX.search(name)) and any(p.startswith("man") for p in path.parts[:-1])


def source_files(folder: Path) -> list[Path]:
    """The readable files of a folder, sorted (so a seeded sample is the same on every machine
    with the same files)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.is_symlink() and not p.resolve().is_file():
            continue
        name = p.name.removesuffix(".gz")
        if Path(name).suffix.lower() in TEXT_SUFFIXES or _is_man(p):
            out.append(p)
    return out


def _read_bytes(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return ""
    return data.decode("utf-8", errors="replace")


# --- HTML -----------------------------------------------------------------------------------

_DROP_TAGS = ("script", "style", "nav", "header", "footer", "aside", "noscript", "form", "svg",
              "button", "template", "iframe")
_DROP_CLASSES = ("sphinxsidebar", "related", "footer", "navigation", "nav", "breadcrumb", "sidebar",
                 "menu", "headerlink", "toc", "mobile-nav", "cookie")
_BLOCK = re.compile(r"\n\s*\n+")


def html_to_text(html: str) -> str:
    """The main content of an HTML page as text, one block element per line. Boilerplate that
    markup names (navigation, header, footer, sidebars, scripts) is dropped; a `<main>` or
    `role="main"` element, when present, is all that is kept."""
    import lxml.html

    if not html.strip():
        return ""
    try:
        root = lxml.html.fromstring(html)
    except (ValueError, lxml.etree.ParserError):
        return ""
    main = root.xpath('//*[@role="main"] | //main')
    root = main[0] if main else root
    for el in root.xpath("|".join(f"//{t}" for t in _DROP_TAGS)):
        el.drop_tree()
    for el in list(root.iter()):
        if not isinstance(el.tag, str):
            continue
        classes = (el.get("class") or "").lower().split()
        role = (el.get("role") or "").lower()
        if role == "navigation" or any(c in _DROP_CLASSES for c in classes):
            if el.getparent() is not None:
                el.drop_tree()
    for el in root.iter("br"):
        el.tail = "\n" + (el.tail or "")
    blocks = ("p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "tr",
              "section", "blockquote", "table", "td", "th", "dl", "ul", "ol")
    for el in root.iter(*blocks):
        el.tail = "\n" + (el.tail or "")
        if el.text and el.tag != "pre":
            el.text = el.text
    text = root.text_content()
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


# --- manual pages (roff) --------------------------------------------------------------------

_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|oq|cq|dq)"), '"'),
    (re.compile(r"\\\(\w\w"), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[&/,|^%:]"), ""),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\c$"), ""),
]
_KEEP_ARGS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "IP", "TP", "SM", "SB",
              "UR", "MT", "Nm", "Nd", "Sh", "Ss", "Fl", "Ar", "Xr", "Pa", "Cm", "Dv", "Er",
              "Ev", "Li", "It", "Op", "Em", "Sy", "Ql", "Dq", "Sq", "Va", "Fn", "Fa", "Ft"}


def roff_to_text(src: str) -> str:
    """A manual page's text: requests (`.XX`) dropped except those whose arguments are text
    (headings, fonts, tagged paragraphs), comments and font escapes removed."""
    out: list[str] = []
    for raw in src.splitlines():
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro not in _KEEP_ARGS or not args.strip():
                if macro in ("PP", "LP", "P", "sp", "br", "Pp") and out and out[-1]:
                    out.append("")
                continue
            line = " ".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args))
            if macro in ("SH", "Sh", "SS", "Ss"):
                out.append("")
        for pattern, repl in _ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line.replace("\\\\", "\\").strip())
    return "\n".join(out)


# --- Markdown / reStructuredText ------------------------------------------------------------

_MD = [
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images: their alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links: their text
    (re.compile(r"^\s{0,3}#{1,6}\s*"), ""),  # heading marks
    (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),
    (re.compile(r"`([^`]+)`"), r"\1"),
    (re.compile(r"^\s*[-=~^*#]{4,}\s*$"), ""),  # rules and rST underlines
    (re.compile(r"<[^>]+>"), ""),  # inline HTML
]


def markdown_to_text(src: str) -> str:
    lines = []
    for line in src.splitlines():
        if line.strip().startswith("```"):
            continue
        for pattern, repl in _MD:
            line = pattern.sub(repl, line)
        lines.append(line.rstrip())
    return "\n".join(lines)


def file_text(path: Path) -> str:
    """A file's text with its markup stripped, by its kind."""
    raw = _read_bytes(path)
    suffix = Path(path.name.removesuffix(".gz")).suffix.lower()
    if suffix in (".html", ".htm"):
        return html_to_text(raw)
    if suffix in (".md", ".rst"):
        return markdown_to_text(raw)
    if suffix == ".txt":
        return raw
    return roff_to_text(raw)


def documents(source: Source, seed: int = 0) -> tuple[Iterator[Doc], int]:
    """The source's documents (lazily) and how many there will be."""
    if source.kind == "folder":
        root = Path(source.spec).expanduser()
        files = source_files(root)
        if source.limit is not None and source.limit < len(files):
            import random

            files = sorted(random.Random(seed).sample(files, source.limit))
        return (Doc(source.spec, str(f.relative_to(root)), file_text(f)) for f in files), len(files)
    if source.kind == "jsonl":
        rows = []
        with open(Path(source.spec).expanduser(), encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaxonError(f"{source.spec} line {i + 1} is not JSON ({e.msg}); fix the "
                                     "file (one JSON object with a `text` field per line)") from e
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise TaxonError(f"{source.spec} line {i + 1} has no string `text` field; "
                                     "give every row one")
                rows.append(Doc(source.spec, str(i), row["text"]))
        rows = rows[: source.limit] if source.limit is not None else rows
        return iter(rows), len(rows)
    from taxon.data import render
    from taxon.data.cards import get_card
    from taxon.data.sources import load_rows

    dataset, config, split = (source.spec.removeprefix("dataset:").split(":") + [None, None])[:3]
    card = get_card(dataset).for_config(config)
    rows = load_rows(dataset, config, split or "train", limit=source.limit, seed=seed)
    return (Doc(source.spec, str(i), render.as_text(card, r)) for i, r in enumerate(rows)), len(rows)
