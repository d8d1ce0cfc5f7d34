"""Cards and sources: the carved FPB test split, unknown datasets, missing data, bad user cards."""

from __future__ import annotations

from collections import defaultdict

import pytest

from taxon.data import cards
from taxon.data.sources import load_rows
from taxon.errors import TaxonError

FPB_CONFIGS = ("sentences_50agree", "sentences_66agree", "sentences_75agree", "sentences_allagree")


@pytest.fixture(scope="module")
def fpb_splits(data_dir):
    """{config: (train rows, test rows)} through taxon's loader."""
    return {c: (load_rows("fpb", c, "train"), load_rows("fpb", c, "test")) for c in FPB_CONFIGS}


@pytest.mark.parametrize("config", FPB_CONFIGS)
def test_fpb_carved_split_is_disjoint_and_complete(fpb_splits, fpb_rows, config):
    train, test = fpb_splits[config]
    train_s, test_s = set(train["sentence"]), set(test["sentence"])
    assert train_s and test_s
    assert not train_s & test_s
    # Every mirror row lands on exactly one side: nothing lost, nothing duplicated.
    assert len(train) + len(test) == len(fpb_rows[config])
    assert train_s | test_s == {r["sentence"] for r in fpb_rows[config]}


def test_fpb_side_is_the_same_across_configs(fpb_splits):
    test_50 = set(fpb_splits["sentences_50agree"][1]["sentence"])
    for config in FPB_CONFIGS[1:]:
        train, test = fpb_splits[config]
        assert set(test["sentence"]) <= test_50, config
        assert not set(train["sentence"]) & test_50, config
    # The nested configs are subsets: every allagree sentence is in 50agree, on the same side.
    all_train, all_test = fpb_splits["sentences_allagree"]
    fifty_train = set(fpb_splits["sentences_50agree"][0]["sentence"])
    assert set(all_train["sentence"]) <= fifty_train
    assert set(all_test["sentence"]) <= test_50


def test_fpb_50agree_test_has_970_rows(fpb_splits):
    assert len(fpb_splits["sentences_50agree"][1]) == 970


def test_fpb_test_share_per_class(fpb_splits, fpb_rows):
    unique_by_class = defaultdict(set)
    for r in fpb_rows["sentences_50agree"]:
        unique_by_class[r["label"]].add(r["sentence"])
    test_by_class = defaultdict(set)
    for r in fpb_splits["sentences_50agree"][1]:
        test_by_class[r["label"]].add(r["sentence"])
    assert set(test_by_class) == {0, 1, 2}
    for label, keys in unique_by_class.items():
        assert abs(len(test_by_class[label]) - 0.2 * len(keys)) <= 1, label


def test_load_rows_limit_is_seeded_subsample(data_dir):
    a = load_rows("fpb", None, "train", limit=20, seed=3)
    b = load_rows("fpb", None, "train", limit=20, seed=3)
    c = load_rows("fpb", None, "train", limit=20, seed=4)
    assert len(a) == 20
    assert a["sentence"] == b["sentence"]
    assert a["sentence"] != c["sentence"]


def test_unknown_dataset():
    with pytest.raises(TaxonError, match="unknown dataset"):
        cards.get_card("no-such-org/no-such-dataset")
    with pytest.raises(TaxonError, match="unknown dataset"):
        load_rows("no-such-org/no-such-dataset")


def test_unknown_split_and_config(data_dir):
    with pytest.raises(TaxonError, match="no split 'validation'"):
        load_rows("fpb", None, "validation")
    with pytest.raises(TaxonError, match="no config 'sentences_90agree'"):
        load_rows("fpb", "sentences_90agree", "train")


def _go_offline(monkeypatch):
    """Offline mode, as a user without network would have it (settings read at import time too)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def test_missing_mirror_file_and_no_hub(tmp_path, monkeypatch):
    _go_offline(monkeypatch)
    monkeypatch.setenv("TAXON_DATA_DIR", str(tmp_path))
    with pytest.raises(TaxonError) as info:
        load_rows("tfns", None, "train")
    msg = str(info.value)
    assert "TAXON_DATA_DIR" in msg
    assert "zeroshot/twitter-financial-news-sentiment" in msg
    assert str(tmp_path) in msg


def test_no_mirror_set_and_no_hub(monkeypatch):
    _go_offline(monkeypatch)
    monkeypatch.delenv("TAXON_DATA_DIR", raising=False)
    with pytest.raises(TaxonError, match="TAXON_DATA_DIR"):
        load_rows("fpb", None, "test")


def _write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


def test_user_card_is_read(tmp_path, monkeypatch):
    _write(tmp_path, "mine.yaml", "id: me/my-corpus\naliases: [mine]\nkind: corpus\n"
           "templates: {text: '{{ body }}'}\n")
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path))
    card = cards.get_card("mine")
    assert card.id == "me/my-corpus"
    assert card.path == str(tmp_path / "mine.yaml")
    assert cards.get_card("fpb").id == "takala/financial_phrasebank"  # built-ins still there


def test_malformed_user_card_bad_field(tmp_path, monkeypatch):
    path = _write(tmp_path, "broken.yaml", "id: me/broken\nkind: banana\n"
                  "templates: {text: '{{ text }}'}\n")
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path))
    with pytest.raises(TaxonError) as info:
        cards.get_card("fpb")
    msg = str(info.value)
    assert str(path) in msg
    assert "'kind'" in msg


def test_malformed_user_card_missing_field(tmp_path, monkeypatch):
    path = _write(tmp_path, "notemplates.yaml", "id: me/no-templates\nkind: corpus\n")
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path))
    with pytest.raises(TaxonError) as info:
        cards.get_card("me/no-templates")
    msg = str(info.value)
    assert str(path) in msg
    assert "'templates'" in msg


def test_malformed_user_card_invalid_yaml(tmp_path, monkeypatch):
    path = _write(tmp_path, "garbled.yaml", "id: [unclosed\nkind: corpus\n")
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path))
    with pytest.raises(TaxonError) as info:
        cards.all_cards()
    assert str(path) in str(info.value)


def test_missing_cards_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXON_CARDS_DIR", str(tmp_path / "nope"))
    with pytest.raises(TaxonError, match="TAXON_CARDS_DIR"):
        cards.get_card("fpb")
