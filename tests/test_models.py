"""Model names: aliases, Hub ids, local folders, the cache, and the offline error."""

from __future__ import annotations

import pytest

from taxon import models
from taxon.errors import TaxonError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh TAXON_CACHE_DIR: nothing converted or built yet."""
    cache = tmp_path / "taxon-cache"
    monkeypatch.setenv("TAXON_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub, and an empty Hugging Face cache (settings are also read at import time)."""
    import huggingface_hub.constants as hub

    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(hf_cache))


def test_resolve_hub_alias(empty_cache):
    r = models.resolve("gpt2")
    assert r.source == "hub"
    assert r.location == "openai-community/gpt2"
    assert r.name == "gpt2"


def test_resolve_cached_alias(empty_cache):
    (empty_cache / "models" / "gpt2").mkdir(parents=True)
    (empty_cache / "models" / "gpt2" / "config.json").write_text("{}")
    r = models.resolve("gpt2")
    assert r.source == "cache"
    assert r.location == str(empty_cache / "models" / "gpt2")


def test_resolve_other_names(empty_cache, tmp_path):
    assert models.resolve("some-org/some-model") == models.Resolved(
        "some-org/some-model", "hub", "some-org/some-model")
    assert models.resolve(str(tmp_path)).source == "local"
    assert models.resolve("tiny").source == "tiny"  # built on first use, not yet


@pytest.mark.parametrize("name", ["no-such-model", "./no/such/folder", "/no/such/folder"])
def test_unknown_model(name):
    with pytest.raises(TaxonError, match="unknown model"):
        models.resolve(name)
    with pytest.raises(TaxonError, match="unknown model"):
        models.load_model(name)


def test_hub_only_model_offline(empty_cache, offline):
    with pytest.raises(TaxonError) as info:
        models.load_model("gpt2")
    msg = str(info.value)
    assert "'gpt2'" in msg
    assert "openai-community/gpt2" in msg
    assert "local folder" in msg  # how to provide it without the Hub
    assert "Hub" in msg


def test_hub_id_offline(empty_cache, offline):
    with pytest.raises(TaxonError, match="no-such-org/no-such-model"):
        models.load_tokenizer("no-such-org/no-such-model")


def test_describe_all_lists_every_alias():
    rows = models.describe_all()
    assert [r[0] for r in rows] == list(models.aliases())
    assert ("gpt2", "openai-community/gpt2") in [(a, h) for a, h, _ in rows]
    assert "tiny" in models.aliases()


def test_tiny_model_matches_its_config(tiny_model):
    model, tokenizer = tiny_model
    cfg = models.aliases()["tiny"]["tiny"]
    assert model.config.hidden_size == cfg["hidden_size"]
    assert model.config.num_hidden_layers == cfg["num_hidden_layers"]
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template is not None  # borrowed from SmolLM2
    assert not model.training
