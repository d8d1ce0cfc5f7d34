"""Models declared by architecture and size (taxon.config.ModelConfig): identity, building, and
training from scratch with the pretraining objective."""

from __future__ import annotations

import pytest

from taxon.config import DataRef, ModelConfig, StageSpec, StudySpec
from taxon.errors import TaxonError
from taxon.identity import model_identity
from taxon.models import architecture, load_model, resolve
from taxon.train import train_stage

SMALL = {"architecture": "llama", "layers": 2, "hidden": 32, "heads": 2, "context": 64}


def name(**kw) -> str:
    return ModelConfig.model_validate({**SMALL, **kw}).name()


def test_every_field_is_part_of_the_identity():
    base = model_identity(name())
    assert base.startswith("config:")
    assert model_identity(name(init_seed=1)) != base
    assert model_identity(name(tie_embeddings=False)) != base
    assert model_identity(name(tokenizer="gpt2-style")) != base
    assert model_identity(name(layers=3)) != base
    # one declaration, one identity: the alias `tiny`, its mapping and its name written out
    tiny = {"architecture": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
            "intermediate": 128}
    study = StudySpec.model_validate({"name": "s", "model": tiny, "experiments": []})
    assert model_identity(study.model) == model_identity("tiny")
    assert model_identity(study.model.replace("layers=2", " layers = 2 ")) == model_identity("tiny")


def test_bad_declarations_are_one_line():
    with pytest.raises(TaxonError, match="hidden 30 is not a multiple of heads 4"):
        model_identity("llama(layers=2,hidden=30,heads=4)")
    with pytest.raises(TaxonError, match="field 'widht'"):
        model_identity("llama(layers=2,hidden=32,heads=2,widht=3)")
    with pytest.raises(ValueError, match="architecture"):
        StudySpec.model_validate({"name": "s", "model": {**SMALL, "architecture": "mamba"},
                                  "experiments": []})


def test_built_with_its_seed_tying_and_tokenizer():
    model, tok = load_model(name(), device="cpu")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert model.config.max_position_embeddings == 64 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    again, _ = load_model(name(init_seed=0, tie_embeddings=False), device="cpu")
    assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()
    other, _ = load_model(name(init_seed=1), device="cpu")
    w0 = model.model.layers[0].self_attn.q_proj.weight
    assert not w0.equal(other.model.layers[0].self_attn.q_proj.weight)
    gpt2, gtok = load_model(name(architecture="gpt2", tokenizer="gpt2-style"), device="cpu")
    assert gpt2.config.model_type == "gpt2" and gtok.chat_template is None
    assert tok.chat_template is not None  # SmolLM2's own
    assert architecture(name(architecture="qwen2")) == "qwen2"
    assert resolve(name()).source == "cache"


def test_trained_from_scratch_with_pretrain(tmp_path, data_dir):
    stage = StageSpec(objective="pretrain", lora=None, steps=3, batch_size=2, lr=3e-3,
                      warmup_ratio=0.0, max_length=64,
                      data=(DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation"),))
    figures = train_stage(stage, name(), tmp_path / "out", desc="scratch")
    assert figures["trainable_params"] == figures["total_params"]  # every weight trains
    assert figures["tokens"] == 3 * 2 * 64
    assert (tmp_path / "out" / "model.safetensors").is_file()
