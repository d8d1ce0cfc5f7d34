"""Per-config overrides: the effective card, malformed overrides, and the callers that must use
the effective card (loader, mixture, evaluation)."""

from __future__ import annotations

import pytest

from taxon.data import cards, render
from taxon.errors import TaxonError

CARD = """\
id: me/pairs
aliases: [pairs]
kind: classification
configs: [single, pair, ranked]
default_config: single
splits: [train, test]
label_field: label
labels: [no_, yes_]
fields: [text]
templates:
  text: "{{ text }}"
  prompt: "Is it so? {{ text }}\\nAnswer:"
  completion: " {{ label_name }}"
overrides:
  pair:
    splits: [train, dev]
    labels: [different, same]
    fields: [a, b]
    templates:
      text: "{{ a }} / {{ b }}"
      prompt: "Same? {{ a }} / {{ b }}\\nAnswer:"
  ranked:
    label_field: null
    labels: null
    templates:
      completion: " {{ rank }}"
"""


@pytest.fixture
def user_cards(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path))

    def write(name: str, text: str):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    return write


def test_for_config_applies_the_override(user_cards):
    user_cards("pairs.yaml", CARD)
    base = cards.get_card("pairs")
    assert base.for_config(None) is base and base.for_config("single") is base
    pair = base.for_config("pair")
    assert pair.config == "pair" and pair.splits == ("train", "dev")
    assert pair.labels == ("different", "same") and pair.label_field == "label"
    assert pair.fields == ("a", "b")
    assert pair.templates.completion == base.templates.completion  # not overridden: kept
    row = {"a": "x", "b": "y", "label": 1}
    assert render.as_text(pair, row) == "x / y"
    assert render.as_pair(pair, row) == ("Same? x / y\nAnswer:", " same")
    ranked = base.for_config("ranked")
    assert ranked.label_field is None and ranked.labels is None  # an override may unset a field
    assert render.as_pair(ranked, {"text": "t", "rank": 3}) == ("Is it so? t\nAnswer:", " 3")
    # The effective card has no overrides; asking it for another config starts from the base.
    assert pair.overrides == {} and pair.for_config("single") is base
    assert pair.for_config("ranked").labels is None
    with pytest.raises(TaxonError, match="no config 'triple'"):
        base.for_config("triple")


@pytest.mark.parametrize("bad,field", [
    ("  pair:\n    lables: [x, y]\n", "overrides.pair.lables"),
    ("  triple:\n    labels: [x, y]\n", "triple"),
    ("  pair:\n    label_field: null\n", "field 'overrides.pair': labels and label_field go together"),
    ("  pair:\n    carve: {source: validation, test_fraction: 0.2, key: text}\n",
     "field 'overrides.pair': carve.source 'validation'"),
])
def test_malformed_override_names_file_and_field(user_cards, bad, field):
    text = CARD[: CARD.index("overrides:")] + "overrides:\n" + bad
    path = user_cards("broken.yaml", text)
    with pytest.raises(TaxonError) as info:
        cards.get_card("pairs")
    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    assert str(path) in msg and field in msg, msg


def test_user_card_replacing_a_builtin_takes_its_aliases(user_cards):
    user_cards("gsm.yaml", "id: openai/gsm8k\nkind: math\nconfigs: [main]\nsplits: [train, test]\n"
               "templates: {text: '{{ question }}'}\n")
    assert cards.get_card("gsm8k").path.endswith("gsm.yaml")
    assert cards.get_card("openai/gsm8k").configs == ("main",)


def test_template_filters():
    assert render.fromjson('[{"question": "q", "answer": "a"}]') == [{"question": "q", "answer": "a"}]
    assert render.fromjson("[{'question': 'q'}]") == [{"question": "q"}]
    assert render.fromjson([1]) == [1]
    assert render.fromjson("Q: plain text") == "Q: plain text"
    tokens = ["Evergreen", "Solar", "Inc", "hired", "John", "Smith", "in", "Boston", "Mass"]
    io = ["I-ORG", "I-ORG", "I-ORG", "O", "I-PER", "I-PER", "O", "I-LOC", "I-LOC"]
    assert render.entities(tokens, io) == [
        {"text": "Evergreen Solar Inc", "type": "ORG"}, {"text": "John Smith", "type": "PER"},
        {"text": "Boston Mass", "type": "LOC"}]
    bio = ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER", "I-PER", "O", "B-LOC", "B-LOC"]
    assert [e["text"] for e in render.entities(tokens, bio)][-2:] == ["Boston", "Mass"]


def test_mixture_and_eval_use_the_config_card(merged_data_dir, monkeypatch, tiny_model):
    from taxon.config import DataRef, StageSpec
    from taxon.data import mixture
    from taxon.evals.evaluate import evaluate_task
    from taxon.evals.tasks import TaskSpec

    monkeypatch.setenv("TAXON_DATA_DIR", str(merged_data_dir))
    model, tok = tiny_model
    stage = StageSpec(objective="sft", data=(DataRef(dataset="glue", config="mnli"),), steps=1,
                      batch_size=3, grad_accum=1)
    ds, summary = mixture.build(stage, tok, chat=False)
    assert summary["glue:mnli:train"]["examples"] == 3
    texts = [tok.decode(ex["input_ids"]) for ex in ds]
    assert all("Premise:" in t for t in texts)
    assert {t.rsplit("Answer:", 1)[1].split(tok.eos_token)[0] for t in texts} == {
        " entailment", " neutral", " contradiction"}
    task = TaskSpec(name="rte", dataset="glue", config="rte", split="validation")
    result = evaluate_task(model, tok, task)
    assert result.n == 3 and result.metrics["per_class"].keys() >= {"entailment", "not_entailment"}


def test_check_streams_from_the_hub_when_no_mirror_has_the_dataset(tmp_path, monkeypatch):
    """No mirror copy, Hub reachable: the first `limit` rows of each Hub split are streamed."""
    import datasets

    from taxon import hub
    from taxon.data import check

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        rows = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}"} for i in range(50)]
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setenv("TAXON_DATA_DIR", str(tmp_path))  # an empty mirror
    monkeypatch.setattr(hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = check.run(["gsm8k"], config="socratic", limit=10)[0]
    assert result.source == "hub" and not result.failed, result.all_problems()
    assert [(s.split, s.rows, s.checked) for s in result.splits] == [("train", 10, 10),
                                                                     ("test", 10, 10)]
    assert result.splits[1].in_train == 10  # the fake serves the same rows for both splits
    assert calls == [("openai/gsm8k", "socratic", "train", True),
                     ("openai/gsm8k", "socratic", "test", True)]
