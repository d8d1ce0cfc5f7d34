"""Every card against its data: the mirror plus hand-written fixtures in Hub schema for what the
mirror lacks (tests/fixtures/data), merged into one temporary folder of symlinks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from taxon.data import cards, check, render
from taxon.data.sources import load_rows

GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}
GLUE_COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


@pytest.fixture(autouse=True)
def _merged(merged_data_dir, monkeypatch):
    monkeypatch.setenv("TAXON_DATA_DIR", str(merged_data_dir))
    monkeypatch.delenv("TAXON_CARDS_DIR", raising=False)


@pytest.fixture(scope="module")
def all_checks(merged_data_dir):
    """`data check` on every card, once for the module (the slow part of this file)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAXON_DATA_DIR", str(merged_data_dir))
        mp.delenv("TAXON_CARDS_DIR", raising=False)
        return {r.card.id: r for r in check.run([])}


def test_data_check_passes_on_every_card(all_checks):
    assert len(all_checks) == len(cards.all_cards()) >= 29
    failed = {cid: r.all_problems() for cid, r in all_checks.items() if r.failed}
    assert not failed
    # Every card has rows here (mirror or fixture) and every one of its splits was checked.
    assert all(r.source == "mirror" for r in all_checks.values())
    for r in all_checks.values():
        assert any(s.rows for s in r.splits), r.card.id
        assert all(s.checked == min(s.rows, check.LIMIT) for s in r.splits if s.rows), r.card.id


def test_data_check_counts_and_overlap(all_checks):
    fpb = {(s.config, s.split): s for s in all_checks["takala/financial_phrasebank"].splits}
    assert fpb[("sentences_50agree", "test")].rows == 970
    assert fpb[("sentences_50agree", "test")].in_train == 0  # the carve keeps copies together
    glue = {(s.config, s.split): s for s in all_checks["nyu-mll/glue"].splits}
    assert glue[("sst2", "train")].rows == 67349
    assert glue[("sst2", "test")].rows == 0  # hidden labels, left out, not a failure
    assert glue[("mnli", "validation_matched")].rows == 3
    wikitext = {(s.config, s.split): s for s in all_checks["Salesforce/wikitext"].splits}
    assert wikitext[("wikitext-2-v1", "train")].rows is None  # not in the mirror: a note only
    assert wikitext[("wikitext-2-v1", "test")].rows == 4358


def _pairs_ok(card, rows, split):
    for row in rows:
        prompt, completion = render.as_pair(card, row)
        assert prompt.strip(), (card.id, split, row)
        if split not in card.unlabelled_splits:
            assert completion.strip(), (card.id, split, row)


SFT_CARDS = sorted(c.id for c in cards.all_cards() if c.templates.prompt is not None)


@pytest.mark.parametrize("card_id", SFT_CARDS)
def test_sft_card_renders_pairs(card_id, merged_data_dir):
    base = cards.get_card(card_id)
    folder = merged_data_dir / card_id
    configs = [c for c in base.configs if (folder / c).is_dir()]
    assert configs, f"no data for {card_id}"
    for config in configs[:3]:  # MMLU's 58 configs share one template
        card = base.for_config(config)
        for split in card.available_splits():
            carved = card.carve and split in (card.carve.train, card.carve.test)
            hub_split = card.carve.source if carved else split
            if not list((folder / config).glob(f"{hub_split}.*")):
                continue
            rows = load_rows(card_id, config, split, limit=20)
            _pairs_ok(card, rows, split)


@pytest.mark.parametrize("config", list(GLUE_LABELS))
def test_glue_config_renders_with_its_own_labels(config):
    card = cards.get_card("glue").for_config(config)
    assert card.labels == GLUE_LABELS[config]
    rows = load_rows("glue", config, "train", limit=3)
    assert set(GLUE_COLUMNS[config]) <= set(rows.column_names)
    for row in rows:
        prompt, completion = render.as_pair(card, row)
        assert completion == " " + GLUE_LABELS[config][row["label"]]
        for column in GLUE_COLUMNS[config]:
            assert row[column] in prompt
    validation = "validation_matched" if config == "mnli" else "validation"
    assert len(load_rows("glue", config, validation)) == (872 if config == "sst2" else 3)


def test_glue_splits_follow_the_config():
    assert len(load_rows("glue", "mnli", "validation_mismatched")) == 3
    from taxon.errors import TaxonError

    with pytest.raises(TaxonError, match="no split 'validation_matched'"):
        load_rows("glue", "rte", "validation_matched")
    with pytest.raises(TaxonError, match="no split 'validation'"):
        load_rows("glue", "mnli", "validation")


def test_carved_qa_and_headline_splits_are_disjoint_and_complete():
    # financial-qa-10K: 7,000 rows on the Hub, 3 of them blank (skip_empty: question, answer).
    for dataset, key, total in (("financial-qa-10k", "question", 6997),
                                ("gold-commodity-news", "news", 10570)):
        train, test = load_rows(dataset, None, "train"), load_rows(dataset, None, "test")
        assert len(train) + len(test) == total
        assert not set(train[key]) & set(test[key])
        assert 0.15 < len(test) / total < 0.25


def test_mmlu_all_has_auxiliary_train_and_subjects_do_not():
    assert "auxiliary_train" in cards.get_card("mmlu").for_config("all").splits
    assert "auxiliary_train" not in cards.get_card("mmlu").for_config("anatomy").splits
    row = load_rows("mmlu", "anatomy", "dev")[0]
    prompt, completion = render.as_pair(cards.get_card("mmlu").for_config("anatomy"), row)
    assert prompt.startswith(row["question"].strip() + "\nA. ")  # the mmlu task adds the header
    assert "\nA. " in prompt and "\nD. " in prompt and prompt.endswith("Answer:")
    assert completion == " " + "ABCD"[row["answer"]]


def test_nested_and_string_columns_render():
    conv = cards.get_card("convfinqa")
    row = load_rows("convfinqa", None, "validation")[0]
    prompt, completion = render.as_pair(conv, row)
    assert completion == " " + row["dialogue"]["conv_answers"][-1]
    assert prompt.endswith(f"Q: {row['dialogue']['conv_questions'][-1]}\nA:")
    assert "None" not in prompt  # table cells the JSON loader filled with null are skipped
    ner = cards.get_card("sec-filings-ner")
    row = load_rows("sec-filings-ner", None, "test")[0]
    _, completion = render.as_pair(ner, row)
    assert completion.startswith(" Silicium de Provence SAS, ORG\nEvergreen Solar Inc, ORG")
    sujet = cards.get_card("sujet-finance-qa-vision")
    row = load_rows("sujet-finance-qa-vision", None, "train")[0]
    prompt, completion = render.as_pair(sujet, row)
    assert "What is the invoice number?" in prompt and completion == " INV-20431"


def test_fiqa_sentiment_verbalises_the_score_in_either_schema():
    card = cards.get_card("fiqa-sa")
    hub = {"_id": "1", "sentence": "s", "target": "T", "aspect": "a", "type": "post"}
    other = {"sentence": "s", "snippets": "[]", "target": "T", "aspects": "[]", "format": "post",
             "label": 0}
    for score, name in ((-0.5, "negative"), (0.0, "neutral"), (0.1, "positive")):
        assert render.as_pair(card, {**hub, "score": score})[1] == f" {name}"
        assert render.as_pair(card, {**other, "sentiment_score": score})[1] == f" {name}"
    assert "financial tweet about T" in render.as_pair(card, {**hub, "score": 0.3})[0]


def test_cli_data_check_named_and_failing(tmp_path, monkeypatch):
    from taxon.cli import app

    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "200")
    r = runner.invoke(app, ["data", "check", "glue", "--config", "rte"])
    assert r.exit_code == 0, r.output
    assert "nyu-mll/glue" in r.output and "rte" in r.output and "ok" in r.output
    # A user card whose templates name a column the rows lack fails, one line per failing card.
    (tmp_path / "bad.yaml").write_text(
        "id: openai/gsm8k\nkind: math\nconfigs: [main]\nsplits: [train, test]\n"
        "templates: {text: '{{ problem }}', prompt: '{{ problem }}', completion: ' {{ answer }}'}\n")
    (tmp_path / "absent.yaml").write_text(
        "id: me/absent\nkind: corpus\ntemplates: {text: '{{ text }}'}\n")
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, ["data", "check", "gsm8k", "glue", "--config", "main"])
    assert r.exit_code != 0  # glue has no config main
    r = runner.invoke(app, ["data", "check", "gsm8k", "me/absent"])
    assert r.exit_code == 2
    failing = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(failing) == 2, r.stderr
    assert failing[0].startswith("openai/gsm8k: main/") and "problem" in failing[0]
    assert failing[1].startswith("me/absent: not available here")
    # Not named: an absent dataset is reported, not failed.
    result = check.check_card(cards.get_card("me/absent"))
    assert result.status == "not available here" and not result.failed


def test_check_finds_bad_labels_and_missing_fields(tmp_path, monkeypatch):
    data = tmp_path / "data" / "me" / "toy" / "default"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 3}\n')
    (data / "test.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "", "label": 1}\n')
    (tmp_path / "toy.yaml").write_text(
        "id: me/toy\nkind: classification\nsplits: [train, test]\nlabel_field: label\n"
        "labels: [neg, pos]\nfields: [text, source]\n"
        "templates: {text: '{{ text }}', prompt: '{{ text }}?', completion: ' {{ label_name }}'}\n")
    monkeypatch.setenv("TAXON_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path))
    result = check.run(["me/toy"])[0]
    assert any("missing column(s) source" in p for p in result.all_problems())
    fixed = (tmp_path / "toy.yaml").read_text().replace("fields: [text, source]", "fields: [text]")
    (tmp_path / "toy.yaml").unlink()
    (tmp_path / "toy_fixed.yaml").write_text(fixed)  # a new file: cards are cached by path
    problems = check.run(["me/toy"])[0].all_problems()
    assert any(p.startswith("default/train: 1 label(s) outside 0..1") for p in problems), problems
    assert any(p.startswith("default/test: 1 row(s) render an empty text") for p in problems)
    by_split = {s.split: s for s in check.run(["me/toy"])[0].splits}
    assert by_split["test"].in_train == 1  # "a" is in both
