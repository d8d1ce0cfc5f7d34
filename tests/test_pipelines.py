"""Pipeline options on `tiny`: mixing by tokens or examples, the mixed objective, continuing a
parent's LoRA adapter, and a three-stage chain that alternates full and LoRA fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from taxon.config import DataRef, LoraSpec, StageSpec, parse
from taxon.data import mixture
from taxon.errors import TaxonError
from taxon.models import STAGE_META, load_model, resolve_targets
from taxon.train import train_stage

WIKI = {"dataset": "wikitext", "config": "wikitext-2-v1", "split": "validation"}
PROBE = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period."
LORA = LoraSpec(r=4, alpha=8, dropout=0.0)


def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits[0].float().cpu()


class _Capture(TrainerCallback):
    """The trained model's probe logits, taken in memory at the end of training."""

    def __init__(self, tokenizer):
        self.tokenizer, self.logits = tokenizer, None

    def on_train_end(self, args, state, control, model=None, **kw):
        model.eval()
        self.logits = probe_logits(model, self.tokenizer)


def stage(objective, *data, **kw) -> StageSpec:
    # fp32: under bf16 autocast (accelerate wraps the trained model's forward) logits taken in
    # memory would differ from a reloaded fp32 model by bf16 rounding.
    base = {"steps": 2, "batch_size": 2, "lr": 5e-3, "warmup_ratio": 0.0, "max_length": 128,
            "lora": LORA, "precision": "fp32"}
    # Every chain here starts from `tiny`: LoRA targets from its architecture (q/k/v/o).
    return resolve_targets(StageSpec(objective=objective, data=tuple(data), **{**base, **kw}), "tiny")


# ---- mix_by ----------------------------------------------------------------------------------

def test_mix_by_auto_is_tokens_for_pretrain_and_examples_otherwise():
    assert stage("pretrain", DataRef(**WIKI)).by_tokens()
    assert not stage("sft", DataRef(dataset="fpb")).by_tokens()
    assert stage("sft", DataRef(dataset="fpb"), mix_by="tokens").by_tokens()
    assert not stage("pretrain", DataRef(**WIKI), mix_by="examples").by_tokens()


def test_sft_mixed_by_tokens_shares_tokens(tiny_tokenizer):
    # FPB and TFNS pairs differ in length, so shares by tokens and by examples differ.
    data = (DataRef(dataset="fpb", rate=0.25), DataRef(dataset="tfns", rate=0.75))
    by_tok = stage("sft", *data, steps=20, batch_size=4, mix_by="tokens")
    _, summary = mixture.build(by_tok, tiny_tokenizer, chat=True)
    fpb, tfns = summary["fpb:default:train"], summary["tfns:default:train"]
    share = fpb["tokens"] / (fpb["tokens"] + tfns["tokens"])
    assert share == pytest.approx(0.25, abs=0.03)
    by_ex = stage("sft", *data, steps=20, batch_size=4)
    _, summary = mixture.build(by_ex, tiny_tokenizer, chat=True)
    assert summary["fpb:default:train"]["examples"] == 20
    assert summary["tfns:default:train"]["examples"] == 60


def test_pretrain_mixed_by_examples_shares_documents(tiny_tokenizer):
    data = (DataRef(rate=0.5, **WIKI), DataRef(dataset="fpb", rate=0.5))
    st = stage("pretrain", *data, steps=4, batch_size=2, max_length=64, mix_by="examples")
    ds, summary = mixture.build(st, tiny_tokenizer, chat=False)
    wiki, fpb = summary["wikitext:wikitext-2-v1:validation"], summary["fpb:default:train"]
    assert abs(wiki["examples"] - fpb["examples"]) <= 1  # equal documents ...
    assert wiki["tokens"] != fpb["tokens"]  # ... of unequal lengths
    assert all(len(x) == 64 for x in ds["input_ids"])
    assert len(ds) >= st.steps * st.batch_size


# ---- mixed objective -------------------------------------------------------------------------

MIXED = dict(objective="mixed", steps=10, batch_size=2, max_length=64, seed=1,
             data=({"dataset": "wikitext", "config": "wikitext-2-v1", "split": "validation",
                    "as": "text", "rate": 0.3},
                   {"dataset": "fpb", "as": "pair", "rate": 0.7}))


def test_mixed_objective_from_yaml_keys(tiny_tokenizer):
    st = parse(StageSpec, MIXED, "test")
    assert [st.usage(d) for d in st.data] == ["text", "pair"]
    assert st.data[0].as_ == "text" and not st.by_tokens()
    ds, summary = mixture.build(st, tiny_tokenizer, chat=True)
    text, pair = summary["wikitext:wikitext-2-v1:validation"], summary["fpb:default:train"]
    assert (text["examples"], pair["examples"]) == (6, 14)  # 0.3 / 0.7 of 20 sequences
    assert text["as"] == "text" and pair["as"] == "pair"
    assert text["loss_tokens"] == text["tokens"] == 6 * 64  # packed blocks, loss everywhere
    assert 0 < pair["loss_tokens"] < pair["tokens"]  # loss on the completion only
    full = [m for m in ds["completion_mask"] if all(m)]
    assert len(full) == 6 and all(len(m) == 64 for m in full)
    partial = [m for m in ds["completion_mask"] if not all(m)]
    assert len(partial) == 14 and all(m[0] == 0 and m[-1] == 1 for m in partial)
    # The same weights by tokens: the two parts' token counts follow 0.3 / 0.7.
    by_tok = parse(StageSpec, {**MIXED, "mix_by": "tokens"}, "test")
    _, summary = mixture.build(by_tok, tiny_tokenizer, chat=True)
    text, pair = summary["wikitext:wikitext-2-v1:validation"], summary["fpb:default:train"]
    assert text["tokens"] / (text["tokens"] + pair["tokens"]) == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("change, message", [
    ({"data": [{"dataset": "fpb"}]}, "give dataset 'fpb' `as: text`"),
    ({"objective": "sft", "data": [{"dataset": "fpb", "as": "text"}]}, "use objective mixed"),
    ({"data": [{"dataset": "fpb", "as": "prose"}]}, "data.0.as"),
])
def test_mixed_objective_refusals_are_one_line(change, message):
    with pytest.raises(TaxonError) as e:
        parse(StageSpec, {**MIXED, **change}, "study.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_new_fields_at_default_keep_stage_identity():
    """Stages written before mix_by/adapter/as existed keep their hashes (and checkpoints)."""
    st = stage("sft", DataRef(dataset="fpb"))
    assert '"mix_by"' not in st.canonical() and '"as_"' not in st.canonical()
    assert st.canonical() != stage("sft", DataRef(dataset="fpb"), mix_by="tokens").canonical()


# ---- adapters: merge (default) and continue ---------------------------------------------------

@pytest.fixture(scope="module")
def lora_parent(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("pipes") / "parent"
    # A large rate: Adam moves each weight by about lr per step, so the parent's adapter ends
    # far larger than anything the child stages (lr 5e-3) can add in their two steps.
    train_stage(stage("sft", DataRef(dataset="fpb"), lr=5e-2), "tiny", out, desc="parent")
    return out


@pytest.mark.parametrize("adapter", ["continue", "merge"])
def test_lora_on_lora_parent_reloads_as_trained(lora_parent, tmp_path, tiny_tokenizer, adapter):
    """The stage's checkpoint, loaded by load_model, computes exactly what was trained."""
    out = tmp_path / adapter
    capture = _Capture(tiny_tokenizer)
    train_stage(stage("sft", DataRef(dataset="tfns"), adapter=adapter), str(lora_parent), out,
                desc=adapter, callbacks=(capture,))
    meta = json.loads((out / STAGE_META).read_text())
    reloaded = probe_logits(*load_model(str(out), device="cpu"))
    assert torch.allclose(reloaded, capture.logits, atol=1e-4), (reloaded - capture.logits).abs().max()
    parent_logits = probe_logits(*load_model(str(lora_parent), device="cpu"))
    assert (reloaded - parent_logits).abs().max() > 1e-4  # the stage changed the model
    from safetensors.torch import load_file

    ours = load_file(out / "adapter_model.safetensors")
    theirs = load_file(lora_parent / "adapter_model.safetensors")
    lora_b = [k for k in ours if "lora_B" in k]  # zero at initialisation
    bound = 3 * 5e-3 * 2  # what two Adam steps at lr 5e-3 can move a weight, with margin
    assert all(theirs[k].abs().max() > 2 * bound for k in lora_b)
    if adapter == "continue":
        # One adapter on the first stage's base, grown from the parent's weights.
        assert meta["base"] == "tiny" and meta["parent"] == str(lora_parent)
        assert all(0 < (ours[k] - theirs[k]).abs().max() <= bound for k in lora_b)
    else:
        # A fresh adapter on the parent with its adapter merged in.
        assert meta["base"] == str(lora_parent) and "parent" not in meta
        assert all(0 < ours[k].abs().max() <= bound for k in lora_b)


def test_continue_refuses_other_lora_settings_and_full_parents(lora_parent, tmp_path):
    other = stage("sft", DataRef(dataset="tfns"), adapter="continue",
                  lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    with pytest.raises(TaxonError, match=r"parent's LoRA has r=4, alpha=8.*asks for r=8") as e:
        train_stage(other, str(lora_parent), tmp_path / "x")
    assert "\n" not in str(e.value)
    with pytest.raises(TaxonError, match="'tiny' is not a LoRA stage checkpoint"):
        train_stage(stage("sft", DataRef(dataset="tfns"), adapter="continue"), "tiny",
                    tmp_path / "y")
    with pytest.raises(TaxonError, match="adapter continue needs a LoRA stage"):
        parse(StageSpec, {"objective": "sft", "data": [{"dataset": "fpb"}], "lora": None,
                          "adapter": "continue"}, "cli")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---- a sequential pipeline --------------------------------------------------------------------

def test_general_domain_task_chain_full_lora_full(tmp_path, tiny_tokenizer, data_dir):
    """general pretraining (full) -> domain pretraining (LoRA) -> task SFT (full): each stage
    starts from the previous checkpoint, and each checkpoint reloads as it was trained."""
    chain = [
        ("general", stage("pretrain", DataRef(**WIKI), lora=None, max_length=64)),
        ("domain", stage("pretrain", DataRef(dataset="fpb"), max_length=64)),
        ("task", stage("sft", DataRef(dataset="fpb"), lora=None, lr=1e-3)),
    ]
    base, previous = "tiny", probe_logits(*load_model("tiny", device="cpu"))
    for name, spec in chain:
        out = tmp_path / name
        capture = _Capture(tiny_tokenizer)
        train_stage(spec, base, out, desc=name, callbacks=(capture,))
        meta = json.loads((out / STAGE_META).read_text())
        assert meta["base"] == base and meta["lora"] == (spec.lora is not None)
        files = {p.name for p in out.iterdir()}
        assert ("adapter_model.safetensors" in files) == (spec.lora is not None)
        assert ("model.safetensors" in files) == (spec.lora is None)
        now = probe_logits(*load_model(str(out), device="cpu"))
        assert torch.allclose(now, capture.logits, atol=1e-4)
        assert (now - previous).abs().max() > 1e-4
        base, previous = str(out), now
