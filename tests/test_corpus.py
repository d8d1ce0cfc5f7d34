"""`taxon corpus build`: markup and boilerplate stripped, exact and near duplicates removed, eval
test sentences removed, each counted per source; the corpus is a dataset a stage can mix."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from cli_runner import run_taxon

from taxon.config import DataRef, StageSpec
from taxon.data.cards import get_card
from taxon.data.corpus.read import html_to_text, roff_to_text
from taxon.data.sources import load_rows
from taxon.errors import TaxonError
from taxon.identity import stage_id

REPO_ROOT_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "domain_adaptation.yaml"
VOCAB = ("system kernel network daemon socket process memory buffer driver file path user group "
         "service config option value server client packet route table cache thread signal queue "
         "module package library version install update command shell script terminal").split()


def prose(seed: int, lines: int = 8) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(VOCAB) for _ in range(12)) + "." for _ in range(lines))


def html(body: str) -> str:
    paras = "".join(f"<p>{line}</p>" for line in body.splitlines())
    return (f"<html><head><style>p {{color: red}}</style><script>var x = 'navigation';</script></head>"
            f"<body><nav><a href='/'>Home</a> | <a href='/docs'>Documentation index page</a></nav>"
            f"<div role='main'>{paras}</div>"
            f"<footer>Copyright 2024 the example project, all rights reserved.</footer></body></html>")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, data_dir):
    """A docs folder (HTML, a man page, text) and a jsonl file with planted duplicates and eval
    sentences. Returns (root, what was planted)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    (docs / "man" / "man1").mkdir(parents=True)
    fpb = [r["sentence"] for r in load_rows("takala/financial_phrasebank", "sentences_50agree", "test")]
    planted_eval = [s for s in fpb if len(s.split()) >= 12][:2]
    for i in range(6):
        (docs / f"page{i}.html").write_text(html(prose(i, lines=20)))
    (docs / "page_eval.html").write_text(html(prose(10) + "\n" + planted_eval[0]))
    (docs / "exact_copy.html").write_text(html(prose(1, lines=20)))  # exact duplicate of page1
    near = prose(2, lines=20).split("\n")
    near[3] = near[3].replace(near[3].split()[0], "banana", 1)  # one word changed
    (docs / "near_copy.txt").write_text("\n".join(near))  # near duplicate of page2
    man = ('.TH DEMO 1\n.SH NAME\ndemo \\- show a \\fBdemo\\fR page\n.SH DESCRIPTION\n.PP\n'
           + prose(20).replace("\n", "\n.PP\n"))
    (docs / "man" / "man1" / "demo.1.gz").write_bytes(gzip.compress(man.encode()))
    (docs / "short.txt").write_text("too short\n")
    rows = [{"text": prose(30)}, {"text": prose(3, lines=20)},  # prose(3) duplicates page3 across sources
            {"text": prose(31) + "\n" + planted_eval[1]}]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root, {"eval": planted_eval}


@pytest.fixture(scope="module")
def built(planted, tmp_path_factory):
    root, _ = planted
    out = root / "it"
    r = run_taxon("corpus", "build", root / "docs", root / "rows.jsonl", "--out", out,
                  "--test-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    return out, json.loads((out / "corpus_report.json").read_text())


def test_markup_is_stripped():
    text = html_to_text(html("The kernel schedules every runnable thread fairly."))
    assert text == "The kernel schedules every runnable thread fairly."  # no nav, footer, script
    assert roff_to_text('.TH X 1\n.SH NAME\nx \\- do \\fBthings\\fR\n.\\" a comment\n') \
        .split() == ["NAME", "x", "-", "do", "things"]


def test_duplicates_and_eval_sentences_are_removed_and_counted(built, planted):
    out, report = built
    docs, rows = report["sources"]
    assert docs["documents"] == 11 and rows["documents"] == 3
    assert docs["removed"] == {"exact duplicate": 1, "near duplicate": 1, "too short after cleaning": 1}
    assert rows["removed"] == {"exact duplicate": 1}  # across sources
    assert docs["lines_removed"]["eval-set n-gram"] == 1
    assert rows["lines_removed"]["eval-set n-gram"] == 1
    nd = report["near_duplicates"]
    assert nd["bands"] * nd["rows"] <= nd["num_perm"]
    assert nd["implied_threshold"] == round((1 / nd["bands"]) ** (1 / nd["rows"]), 4)
    assert set(report["decontamination"]["tasks"]) >= {"eval_domain", "eval_general", "gsm8k"}
    kept = [json.loads(line) for split in ("train", "test") for f in sorted((out / split).glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert len(kept) == docs["kept"] + rows["kept"] == 10
    text = "\n".join(d["text"] for d in kept)
    for sentence in planted[1]["eval"]:
        assert sentence not in text
    assert "Copyright" not in text and "Documentation index" not in text and "\\fB" not in text
    assert all(d["tokens"] > 0 for d in kept)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["tokens"] for s in manifest["shards"]) == sum(d["tokens"] for d in kept)
    assert "near duplicate" in (out / "corpus_report.md").read_text()


def test_a_stage_mixes_the_corpus_with_replay(built, tiny_tokenizer):
    from taxon.data import mixture

    out, _ = built
    card = get_card(str(out))
    assert card.kind == "corpus" and len(load_rows(str(out), split="train")) > 0
    stage = StageSpec(objective="pretrain", steps=2, batch_size=2, max_length=32, lora=None,
                      data=(DataRef(dataset=str(out), rate=0.7),),
                      replay=DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation",
                                     rate=0.3))
    ds, summary = mixture.build(stage, tiny_tokenizer, False)
    assert len(ds) >= 4 and summary[f"{out}:default:train"]["rate"] == 0.7
    # the corpus's content is part of the stage's identity
    manifest = out / "manifest.json"
    before = stage_id("p", stage)
    saved = manifest.read_text()
    manifest.write_text(saved.replace(json.loads(saved)["digest"], "0" * 16))
    try:
        assert stage_id("p", stage) != before  # other content, same folder: another stage
    finally:
        manifest.write_text(saved)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    r = run_taxon("corpus", "build", tmp_path / "nope", "--out", tmp_path / "c")
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "c").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("hi\n")
    r = run_taxon("corpus", "build", empty, "--out", tmp_path / "c", "--no-decontaminate")
    assert r.returncode == 2 and "no document is left" in r.stderr
    assert not list(tmp_path.glob("c*"))
    with pytest.raises(TaxonError, match="build it first with `taxon corpus build"):
        get_card("./no/corpus")
