"""Composite adapters: two or more LoRA adapters over one base merged into one with peft's
weighted-adapter methods (`linear`, `cat`, `svd`, `ties`, `dare_linear`, `dare_ties`, ... and
their `_svd` variants), in fp32.

A composite folder is written like a LoRA stage checkpoint (the adapter, the tokenizer and
`taxon_stage.json` naming the base, with `lora: true`), so `load_model`, `taxon eval --model`,
`taxon serve` and later stages load it as they load any LoRA stage. Its id (`identity.compose_id`)
hashes the members' stage ids and the merge settings. `full=True` writes the merged model itself
instead (`merge_and_unload`), which transformers loads without peft.

peft's `linear` and `cat` fold each member's scaling (alpha / r) into its A matrix and give the
composite alpha = r (scaling 1), so one member at weight 1 gives back that member's delta
B·A·alpha/r (tests/test_compose.py compares it tensor by tensor).
"""

from __future__ import annotations

from pathlib import Path

import torch

from taxon.config import PRUNING_METHODS, ComposeSpec
from taxon.errors import TaxonError
from taxon.identity import compose_id, model_identity, stage_meta
from taxon.models import STAGE_META, atomic_save, load_model, missing_base

# Methods that add the members' A and B matrices entry by entry, so the ranks must agree (peft).
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def member_meta(folder: str | Path) -> dict:
    """The metadata of a member checkpoint, which must be a LoRA adapter whose base still exists."""
    folder = Path(folder).expanduser()
    meta = stage_meta(folder) if folder.is_dir() else None
    if meta is None:
        raise TaxonError(f"{folder} is not a taxon checkpoint (no {STAGE_META}); name a LoRA stage "
                         "checkpoint or a study experiment whose last stage trains LoRA")
    if not meta.get("lora"):
        raise TaxonError(f"{folder} holds a fully fine-tuned model, not a LoRA adapter; only LoRA "
                         "adapters can be composed")
    if missing_base(meta):
        raise TaxonError(f"{folder} is a LoRA adapter over {meta['base']}, which no longer exists; "
                         "restore it or train the member again")
    return meta


def _lora(meta: dict) -> tuple[int, float, tuple[str, ...]]:
    """(r, alpha, targets) of a member, from its spec (a composite keeps its adapter config's)."""
    if "lora_config" in meta:
        c = meta["lora_config"]
        return c["r"], c["alpha"], tuple(sorted(c["target_modules"]))
    lora = meta["spec"]["lora"]
    return lora["r"], lora["alpha"], tuple(sorted(lora["target_modules"]))


def check_members(metas: list[dict], names: list[str], method: str) -> None:
    """One base and compatible LoRA settings, else one line naming the members that differ."""
    bases = {model_identity(str(m["base"])) for m in metas}
    if len(bases) > 1:
        raise TaxonError(f"members {', '.join(names)} are adapters over different bases "
                         f"({', '.join(str(m['base']) for m in metas)}); compose adapters trained "
                         "from the same model and parent stages")
    settings = [_lora(m) for m in metas]
    if len({s[2] for s in settings}) > 1:
        raise TaxonError(f"members {', '.join(names)} adapt different modules "
                         f"({'; '.join(','.join(s[2]) for s in settings)}); train them with the "
                         "same lora.target_modules")
    if method in SAME_RANK and len({s[0] for s in settings}) > 1:
        raise TaxonError(f"compose method {method} needs members of one LoRA rank, got "
                         f"r={', '.join(str(s[0]) for s in settings)}; use method cat or svd, or "
                         "train the members with one r")


def merge(members: list[str | Path], spec: ComposeSpec):
    """The base (loaded once, fp32) with the composite as its only adapter, `default`; and the
    tokenizer and the members' metadata. DARE's random masks are drawn from `spec.seed`."""
    from peft import PeftModel

    metas = [member_meta(m) for m in members]
    check_members(metas, [str(m) for m in members], spec.method)
    base, tokenizer = load_model(str(metas[0]["base"]), dtype=torch.float32, device="cpu")
    names = [f"member{i}" for i in range(len(members))]
    model = PeftModel.from_pretrained(base, str(members[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], members[1:], strict=True):
        model.load_adapter(str(folder), adapter_name=name)
    kw = {}
    if spec.method in PRUNING_METHODS:
        kw["density"] = spec.density
    if spec.svd_rank is not None:
        kw["svd_rank"] = spec.svd_rank
    torch.manual_seed(spec.seed)  # the DARE masks; the other methods draw nothing
    with torch.no_grad():
        model.base_model.add_weighted_adapter(names, list(spec.member_weights()), "default",
                                              combination_type=spec.method, **kw)
    model.set_adapter("default")  # before the members go, so none of them is the active one
    for name in names:
        model.delete_adapter(name)
    model.eval()
    return model, tokenizer, metas


def composite_meta(metas: list[dict], members: list[str | Path], spec: ComposeSpec, model,
                   composite_id: str | None) -> dict:
    ids = [m.get("id") or model_identity(str(f)) for m, f in zip(metas, members, strict=True)]
    config = model.peft_config["default"]
    return {
        "id": composite_id or compose_id(ids, spec),
        "base": metas[0]["base"],
        "lora": True,
        "compose": {**spec.model_dump(mode="json", exclude={"baseline"}),
                    "member_ids": ids, "member_paths": [str(Path(f).resolve()) for f in members]},
        "lora_config": {"r": config.r, "alpha": config.lora_alpha,
                        "target_modules": sorted(config.target_modules)},
        "spec": None,
        "figures": {},
    }


def write_composite(members: list[str | Path], spec: ComposeSpec, out: Path,
                    composite_id: str | None = None, full: bool = False) -> dict:
    """Merge `members` (LoRA checkpoint folders) into `out`: the composite adapter, or with
    `full` the merged model; written through a temp folder renamed into place. Returns the
    metadata written (`id`: the composite's identity)."""
    model, tokenizer, metas = merge(members, spec)
    meta = composite_meta(metas, members, spec, model, composite_id)
    if full:
        merged = model.merge_and_unload()
        # A whole model: loaded without peft; its metadata keeps the identity but no base to apply.
        atomic_save(merged, tokenizer, out, {**meta, "lora": False, "merged_from": meta["base"]})
        return meta
    atomic_save(model, tokenizer, out, meta)  # the adapter and the metadata naming its base
    return meta


