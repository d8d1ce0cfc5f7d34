"""`taxon corpus build`: text sources into a cleaned, deduplicated, decontaminated corpus that a
stage mixes like any dataset (`data: [{dataset: <corpus folder>, rate: 0.7}]`).

The folder it writes:

    card.yaml              a dataset card (kind corpus, splits train and test, field `text`)
    train/shard-NNNNN.jsonl, test/shard-NNNNN.jsonl
                           {"text", "source", "name", "tokens"} per document; a document goes to
                           test by the hash of its text (`test_fraction`), never to both
    manifest.json          tokenizer, shards with documents and tokens, the content digest that
                           stage identities include
    corpus_report.json, corpus_report.md
                           per source: documents and lines removed, by reason

Everything is written to a temporary sibling folder and renamed into place at the end, so a
failed or interrupted build leaves nothing that looks like a corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from taxon.data.corpus.clean import (
    CleanSettings,
    Contamination,
    Deduplicator,
    boilerplate_lines,
    collapse,
    language,
    line_reason,
    words,
)
from taxon.data.corpus.read import Source, documents
from taxon.errors import TaxonError

MANIFEST = "manifest.json"
CARD = "card.yaml"
REPORT = "corpus_report.json"


def is_corpus(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and (folder / CARD).is_file()


def _test_side(text: str, fraction: float) -> bool:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return h / 0x100000000 < fraction


def _clean_source(source: Source, s: CleanSettings, dedup: Deduplicator,
                  contamination: Contamination | None, seed: int, progress: bool):
    """The source's kept documents and its report entry."""
    it, n = documents(source, seed)
    docs = list(tqdm(it, total=n, desc=f"read {source.spec}", unit="doc", disable=not progress))
    boiler = boilerplate_lines([d.text for d in docs], s)
    removed: Counter[str] = Counter()
    lines_removed: Counter[str] = Counter()
    chars_in = chars_out = 0
    kept = []
    examples: dict[str, str] = {}
    for doc in tqdm(docs, desc=f"clean {source.spec}", unit="doc", disable=not progress):
        chars_in += len(doc.text)
        if not doc.text.strip():
            removed["empty"] += 1
            continue
        if s.languages:
            lang = language(doc.text)
            if lang not in s.languages:
                removed[f"language {lang}"] += 1
                continue
        lines = doc.text.splitlines()
        keep = [True] * len(lines)
        for i, line in enumerate(lines):
            reason = line_reason(line, s, boiler)
            if reason:
                keep[i] = False
                lines_removed[reason] += 1
        if contamination is not None:
            for i in contamination.contaminated_lines([line if k else "" for line, k in
                                                       zip(lines, keep, strict=True)]):
                keep[i] = False
                lines_removed["eval-set n-gram"] += 1
                examples.setdefault("eval-set n-gram", lines[i][:200])
        text = collapse([line if k else "" for line, k in zip(lines, keep, strict=True)])
        if len(words(text)) < s.min_doc_words:
            removed["too short after cleaning"] += 1
            continue
        dup = dedup.check(f"{source.spec}::{doc.name}", text)
        if dup is not None:
            removed[dup[0]] += 1
            examples.setdefault(dup[0], f"{doc.name} ~ {dup[1]}")
            continue
        chars_out += len(text)
        kept.append({"text": text, "source": source.spec, "name": doc.name})
    entry = {"source": source.spec, "kind": source.kind, "documents": len(docs), "kept": len(kept),
             "removed": dict(sorted(removed.items())), "lines_removed": dict(sorted(lines_removed.items())),
             "boilerplate_lines_found": len(boiler), "chars_in": chars_in, "chars_out": chars_out,
             "examples": examples}
    return kept, entry


def _write_shards(folder: Path, docs: list[dict], shard_tokens: int) -> list[dict]:
    folder.mkdir(parents=True)
    shards: list[dict] = []
    current: list[dict] = []

    def flush():
        if not current:
            return
        path = folder / f"shard-{len(shards):05d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for d in current:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        shards.append({"file": f"{folder.name}/{path.name}", "documents": len(current),
                       "tokens": sum(d["tokens"] for d in current),
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        current.clear()

    for d in docs:
        current.append(d)
        if sum(x["tokens"] for x in current) >= shard_tokens:
            flush()
    flush()
    return shards


def build(sources: list[Source], out: Path, *, tokenizer: str = "smollm2-135m",
          settings: CleanSettings | None = None, contamination: Contamination | None = None,
          test_fraction: float = 0.05, shard_tokens: int = 1_000_000, seed: int = 0,
          progress: bool = True) -> dict:
    """Build the corpus in `out`; return its report. Bad input raises TaxonError before `out`
    is touched."""
    out = Path(out).expanduser()
    settings = settings or CleanSettings()
    if out.exists() and not is_corpus(out):
        raise TaxonError(f"{out} exists and is not a corpus folder; choose another --out or remove it")
    if not sources:
        raise TaxonError("no corpus sources given; pass folders, .jsonl files or dataset:<card id>")
    if not 0 <= test_fraction < 1:
        raise TaxonError(f"test fraction {test_fraction} must be in [0, 1)")
    from taxon.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    dedup = Deduplicator(settings)
    kept: list[dict] = []
    per_source = []
    for source in sources:
        docs, entry = _clean_source(source, settings, dedup, contamination, seed, progress)
        kept += docs
        per_source.append(entry)
    if not kept:
        raise TaxonError("no document is left after cleaning (" + "; ".join(
            f"{e['source']}: {e['documents']} read, removed {e['removed'] or 'none'}" for e in per_source)
            + "); add text sources or relax the filters (--min-doc-words, --language)")
    for i in tqdm(range(0, len(kept), 256), desc="tokenise", unit="batch", disable=not progress):
        batch = kept[i : i + 256]
        ids = tok([d["text"] for d in batch], add_special_tokens=False)["input_ids"]
        for d, x in zip(batch, ids, strict=True):
            d["tokens"] = len(x) + 1  # with the EOS a stage appends
    test = [d for d in kept if _test_side(d["text"], test_fraction)]
    train = [d for d in kept if not _test_side(d["text"], test_fraction)]
    if not train:
        raise TaxonError("every document fell on the test side; lower --test-fraction")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = _write_shards(tmp / "train", train, shard_tokens)
        if test:
            shards += _write_shards(tmp / "test", test, shard_tokens)
        content = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        splits = ["train", "test"] if test else ["train"]
        totals = {split: {"documents": sum(s["documents"] for s in shards if s["file"].startswith(split)),
                          "tokens": sum(s["tokens"] for s in shards if s["file"].startswith(split))}
                  for split in splits}
        manifest = {"name": out.name, "digest": content, "tokenizer": tokenizer, "splits": totals,
                    "shards": shards}
        report = {"corpus": out.name, "digest": content, "tokenizer": tokenizer,
                  "settings": asdict(settings), "test_fraction": test_fraction,
                  "near_duplicates": dedup.parameters(),
                  "decontamination": None if contamination is None else {
                      "ngram_words": contamination.n, "tasks": contamination.tasks,
                      "test_texts": contamination.texts, "texts_shorter_than_n": contamination.too_short,
                      "distinct_ngrams": len(contamination.grams)},
                  "sources": per_source, "splits": totals}
        card = {"id": f"corpus/{out.name}", "kind": "corpus",
                "description": f"corpus built by taxon corpus build ({content})",
                "splits": splits, "fields": ["text"], "templates": {"text": "{{ text }}"}}
        (tmp / CARD).write_text(yaml.safe_dump(card, sort_keys=False))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        (tmp / "corpus_report.md").write_text(markdown(report))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def markdown(report: dict) -> str:
    """The report as Markdown: one table of documents per source and reason, one of lines."""
    reasons = sorted({r for e in report["sources"] for r in e["removed"]})
    line_reasons = sorted({r for e in report["sources"] for r in e["lines_removed"]})
    nd = report["near_duplicates"]
    out = [f"# Corpus {report['corpus']} ({report['digest']})", "",
           "| source | documents | kept | " + " | ".join(reasons) + " |",
           "|---|---:|---:|" + "---:|" * len(reasons)]
    for e in report["sources"]:
        out.append(f"| {e['source']} | {e['documents']} | {e['kept']} | "
                   + " | ".join(str(e["removed"].get(r, 0)) for r in reasons) + " |")
    out += ["", "Lines removed:", "", "| source | " + " | ".join(line_reasons) + " |",
            "|---|" + "---:|" * len(line_reasons)]
    for e in report["sources"]:
        out.append(f"| {e['source']} | " + " | ".join(str(e["lines_removed"].get(r, 0))
                                                      for r in line_reasons) + " |")
    out += ["", f"Near duplicates: {nd['method']}, num_perm {nd['num_perm']}, {nd['shingle_words']}-word "
            f"shingles, {nd['bands']} bands x {nd['rows']} rows: implied threshold (1/b)^(1/r) = "
            f"{nd['implied_threshold']}; kept as duplicates from estimated Jaccard {nd['threshold']}."]
    dc = report["decontamination"]
    if dc:
        out.append(f"Decontamination: {dc['ngram_words']}-word n-grams of {dc['test_texts']} test texts "
                   f"from {len(dc['tasks'])} eval tasks ({dc['texts_shorter_than_n']} shorter than n, "
                   "not checked).")
    for split, t in report["splits"].items():
        out.append(f"{split}: {t['documents']} documents, {t['tokens']:,} tokens ({report['tokenizer']}).")
    return "\n".join(out) + "\n"
