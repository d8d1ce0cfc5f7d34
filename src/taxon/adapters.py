"""LoRA on a LoRA parent, `adapter: continue`: the parent's adapter keeps training.

The default, `adapter: merge`, needs nothing here: load_model merges the parent's adapter into the
weights and the stage trains a fresh one. With `continue`, the parent's base is loaded (merged
as far as it goes) and the parent's adapter is put on it, trainable. The new checkpoint's
adapter then applies to that same base, so its `taxon_stage.json` names the parent's base, and a
chain of continued stages stays one adapter on one base.
"""

from __future__ import annotations

import json
from pathlib import Path

from taxon.config import StageSpec
from taxon.errors import TaxonError
from taxon.models import STAGE_META, load_model, prepare


def parent_meta(base: str) -> dict:
    """The stage metadata of checkpoint `base`, or {} when `base` is not a stage checkpoint."""
    meta_file = Path(str(prepare(base))) / STAGE_META
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def continue_adapter(stage: StageSpec, base: str):
    """(model with the parent's adapter, trainable; tokenizer; what the adapter applies to)."""
    from peft import PeftConfig, PeftModel

    meta = parent_meta(base)
    if not meta.get("lora"):
        raise TaxonError(
            f"adapter continue: '{base}' is not a LoRA stage checkpoint, so there is no adapter "
            "to continue; use adapter merge (the default)"
        )
    if not meta.get("spec"):  # a composite (taxon.compose) has members, not one stage's LoRA
        raise TaxonError(
            f"adapter continue: '{base}' is a composite of several adapters, which has no single "
            "LoRA to continue; use adapter merge (the default)"
        )
    assert stage.lora is not None  # StageSpec refuses continue without lora
    theirs = (meta["spec"]["lora"]["r"], meta["spec"]["lora"]["alpha"],
              sorted(meta["spec"]["lora"]["target_modules"]))
    ours = (stage.lora.r, stage.lora.alpha, sorted(stage.lora.target_modules))
    if theirs != ours:
        raise TaxonError(
            f"adapter continue: the parent's LoRA has r={theirs[0]}, alpha={theirs[1]}, targets "
            f"{','.join(theirs[2])} but this stage asks for r={ours[0]}, alpha={ours[1]}, targets "
            f"{','.join(ours[2])}; give the stage the parent's LoRA settings or use adapter merge"
        )
    where = str(prepare(base))
    config = PeftConfig.from_pretrained(where)
    config.lora_dropout = stage.lora.dropout  # dropout does not change the adapter's weights
    model, tokenizer = load_model(meta["base"])
    model = PeftModel.from_pretrained(model, where, config=config, is_trainable=True)
    return model, tokenizer, meta["base"]
