"""Several LoRA adapters (stage checkpoints or composites) over one base that is loaded once:
`taxon eval` with several adapters and `taxon serve` switch between them with `set_adapter`
instead of loading the base again for each.

An adapter stays unmerged here, so its outputs equal those of the merged model `load_model`
gives up to fp32 rounding (tests/test_compose.py), at the cost of the adapter's own small
matrix products on every forward pass.
"""

from __future__ import annotations

import torch

from taxon.errors import TaxonError
from taxon.identity import model_identity, stage_meta
from taxon.models import load_model, prepare


def adapter_base(location: str) -> str | None:
    """The base a LoRA checkpoint (or composite) applies to, or None for any other model."""
    if location.startswith("api:"):
        return None
    try:
        meta = stage_meta(str(prepare(location)))
    except TaxonError:  # an unknown name: not an adapter (loading it says what is wrong)
        return None
    return str(meta["base"]) if meta and meta.get("lora") else None


def same_base(a: str, b: str) -> bool:
    return a == b or model_identity(a) == model_identity(b)


class AdapterSet:
    """A base model with any number of adapters, one active at a time."""

    def __init__(self, base: str, dtype: torch.dtype = torch.float32, device: str | None = None):
        self.base = base
        self.model, self.tokenizer = load_model(base, dtype=dtype, device=device)
        self.names: dict[str, str] = {}  # adapter location -> peft adapter name
        self.active: str | None = None

    def fits(self, location: str) -> bool:
        """Whether `location` is an adapter over this set's base."""
        base = adapter_base(location)
        return base is not None and same_base(base, self.base)

    def add(self, location: str) -> str:
        """Load the adapter at `location` (once); its peft adapter name."""
        from peft import PeftModel

        if location in self.names:
            return self.names[location]
        name = f"adapter{len(self.names)}"
        folder = str(prepare(location))
        if not self.names:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name)
        else:
            self.model.load_adapter(folder, adapter_name=name)
        self.model.eval()
        self.names[location] = name
        return name

    def use(self, location: str):
        """The model with the adapter at `location` active (loaded first if it is new)."""
        name = self.add(location)
        if self.active != name:
            self.model.set_adapter(name)
            self.active = name
        return self.model
